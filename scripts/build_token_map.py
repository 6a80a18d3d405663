"""Build a draft vocabulary (token map): the token ids a head drafts among, most frequent first.

    python scripts/build_token_map.py --target /models/Qwen3-30B-A3B --data regen.jsonl \
        --size 32768 --out runs/a3b/hot_vocab_32k.pt
    python scripts/eval_acceptance.py --target ... --mtp ... --token-map runs/a3b/hot_vocab_32k.pt
    python -m sglang.launch_server ... --speculative-token-map runs/a3b/hot_vocab_32k.pt

Counts the assistant tokens of the chats (rendered and cut at --max-length as training renders
them, the loss mask's tokens: what the target writes) and keeps the --size most frequent ids
(ties: lower id first; unseen ids fill up in id order). Count on the target's own answers
(scripts/regenerate_data.py's output) where you have them: those are the tokens drafts must
match. Writes --out (a 1-D int64 tensor, what SGLang's --speculative-token-map loads) and
--out + ".json": size, the share of the counted tokens the map covers, the data and settings.
Each draft step then reads --size lm_head rows instead of the vocabulary's (151,936 for Qwen3).
User errors are one `error:` line (exit 1); --debug or MTP_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from data.chat import token_map_from_chats
from data.tokenizer import load_tokenizer
from model.atomic import atomic_write_text
from model.target import load_target_config
from model.token_map import save_token_map


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="Qwen3-MoE model dir (its config's vocab_size and its tokenizer)")
    p.add_argument("--data", required=True, help="chat .jsonl/.json/.parquet file or dir, or 'sharegpt-package'")
    p.add_argument("--out", required=True, help="the token map (.pt)")
    p.add_argument("--size", type=int, default=32768, help="token ids in the map (default 32768)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --target)")
    p.add_argument("--max-length", type=int, default=4096, help="tokens per conversation, as data.max_length")
    p.add_argument("--thinking", choices=["on", "off"], default=None,
                   help="enable_thinking of the chat template, as data.enable_thinking (default: the template's)")
    p.add_argument("--limit", type=int, default=None, help="read only the first N rows")
    p.add_argument("--num-proc", type=int, default=1, help="tokenizing processes")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also MTP_DEBUG=1)")
    a = p.parse_args(argv)
    for name in ("size", "max_length", "num_proc"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(a, name)})")
    if a.limit is not None and a.limit < 1:
        p.error(f"--limit must be >= 1 (got {a.limit})")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        V = load_target_config(a.target).vocab_size
        if a.size > V:
            raise ValueError(f"--size {a.size} is more than the target's vocabulary ({V}); use a smaller map or none")
        tokenizer = load_tokenizer(a.tokenizer or a.target)
        thinking = None if a.thinking is None else a.thinking == "on"
        ids, info = token_map_from_chats(a.data, tokenizer, V, a.size, a.max_length, enable_thinking=thinking,
                                         limit=a.limit, num_proc=a.num_proc)
        save_token_map(ids, a.out)
        info.update(target=a.target, date=datetime.datetime.now().isoformat(timespec="seconds"))
        atomic_write_text(f"{a.out}.json", json.dumps(info, indent=2))
    except (ValueError, OSError) as exc:  # user and input errors: the message says what to do
        if a.debug or os.environ.get("MTP_DEBUG") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"data: {info['skip_summary']}")
    print(f"token map: {a.out} ({a.size:,} of {V:,} ids); it covers {info['coverage']:.2%} of the "
          f"{info['assistant_tokens']:,} assistant tokens of {info['rows']:,} rows "
          f"({info['distinct_tokens_seen']:,} distinct ids seen)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
