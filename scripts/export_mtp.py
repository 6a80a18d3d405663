"""Export a trained MTP head for SGLang speculative decoding (NEXTN).

    python scripts/export_mtp.py --checkpoint runs/tiny/final --target artifacts/tiny-target \
        --out artifacts/tiny-mtp [--merge] [--dtype bf16|fp16|fp32] [--quantize none|fp8] [--force]

--checkpoint: a training `checkpoint-<step>/` or `final/` dir, an earlier export, or a
.safetensors file. Default output: a draft dir for `--speculative-draft-model-path`. With
--merge: a copy of the target (weights hard-linked) plus an `mtp` shard. Prints the SGLang launch
command. For a block-FP8 target (Qwen3-*-FP8) the default is a bf16 draft without
quantization_config, served with `--speculative-draft-model-quantization unquant`; `--quantize fp8`
quantizes the MTP layer's attention and experts to the target's block scheme instead (needed for
--merge into an FP8 target). See docs/export.md.
"""

from __future__ import annotations

import argparse
import json


from model.export import DEFAULT_MAX_SHARD_BYTES, DTYPES, EXPORT_INFO_NAME, QUANTIZE, export_mtp
from model.mtp_weights import verify_export
from model.target import load_target_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint-<step>/, final/, an export dir, or a .safetensors file")
    p.add_argument("--check", metavar="DIR", help="only verify an existing export's mtp.* names and shapes against --target")
    p.add_argument("--target", required=True, help="local Qwen3-MoE model dir the head was trained for")
    p.add_argument("--out", help="output dir (built in a temp dir next to it, then renamed)")
    p.add_argument("--merge", action="store_true", help="write a copy of the target with an added mtp shard instead of a draft dir")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype of the exported tensors (default bf16)")
    p.add_argument("--quantize", default="none", choices=QUANTIZE,
                   help="fp8: the MTP layer's attention and experts in the block-FP8 target's scheme, with weight_scale_inv "
                        "tensors (default none: every tensor in --dtype)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES, help="shard size limit (default 5 GiB)")
    p.add_argument("--acceptance-length", type=float, default=None, help="measured acceptance length, recorded in export_info.json")
    p.add_argument("--token-map", default=None, metavar="FILE",
                   help="a draft vocabulary (scripts/build_token_map.py), copied into the export; the SGLang command "
                        "passes it as --speculative-token-map")
    args = p.parse_args(argv)
    if not args.check and not (args.checkpoint and args.out):
        p.error("--checkpoint and --out are required (or --check DIR to verify an export)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.check:
        try:
            count = verify_export(args.check, load_target_config(args.target))
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
        print(f"{args.check}: {count} mtp.* tensors, names and shapes match what SGLang loads for {args.target}, "
              "and config.json's quantization matches the tensors")
        return
    try:
        out = export_mtp(
            args.checkpoint, args.target, args.out, merge=args.merge, dtype=args.dtype, quantize=args.quantize,
            force=args.force,
            max_shard_bytes=args.max_shard_bytes, acceptance_length=args.acceptance_length, token_map=args.token_map,
        )
    except (ValueError, FileNotFoundError) as exc:  # user and input errors: the message says what to fix
        raise SystemExit(f"error: {exc}") from None
    with open(out / EXPORT_INFO_NAME, encoding="utf-8") as f:
        info = json.load(f)
    kind = "merged target" if args.merge else "draft dir"
    quant = f", attention and experts {info['quantization']}" if info["quantization"] else ""
    print(f"wrote {kind} {out}: {info['num_tensors']} mtp.* tensors, {info['num_parameters']:,} parameters, "
          f"{info['dtype']}{quant}")
    if info["target_quantization"] and not info["quantization"]:
        print(f"the target is {info['target_quantization']}; this draft is {info['dtype']} with no quantization_config, "
              "so SGLang must not quantize it: the command passes --speculative-draft-model-quantization unquant")
    if info.get("token_map"):
        print(f"token map: {info['token_map']['size']:,} draft token ids in {out / info['token_map']['path']}; "
              "SGLang takes it with --tp 1 only (sgl-project/sglang#4328)")
    print("serve with SGLang:")
    print(f"  {info['sglang_command']}")


if __name__ == "__main__":
    main()
