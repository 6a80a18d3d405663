"""Rewrite the assistant turns of a chat dataset with the target's own outputs (self-distillation).

    # the built-in engine
    python scripts/regenerate_data.py --target /models/Qwen3-30B-A3B --data chats.jsonl \
        --out chats_regen.jsonl --max-new-tokens 256 --temperature 0 --batch-size 64 [--limit N]
    # any OpenAI-compatible server (SGLang, vLLM) serving the same target
    python scripts/regenerate_data.py --server http://127.0.0.1:30000 --concurrency 64 \
        --target /models/Qwen3-30B-A3B --data chats.jsonl --out chats_regen.jsonl --max-new-tokens 256

With --server, --target is read for its tokenizer (prompt lengths against --max-len) and its
generation_config.json (--sampling model) only. A killed run continues when the same command is
run again. What is kept and what changes is data/regenerate.py's docstring; the files written
and the resume rule are data/regen_output.py's. User errors are one `error:` line (exit 1);
--debug or MTP_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from data.chat_server import ChatClient, ServerError
from data.regen_output import check_out_path
from data.regenerate import EngineBackend, RegenSettings, ServerBackend, regenerate_to_file
from data.sources import load_chat_rows
from data.tokenizer import load_tokenizer
from model.acceptance import resolve_sampling
from model.atomic import atomic_write_text

ENGINE_DEFAULTS = {"batch_size": 64, "chunk_rows": None, "device": "cuda" if torch.cuda.is_available() else "cpu"}
SERVER_DEFAULTS = {"concurrency": 8, "model": None, "timeout": 600.0, "attempts": 6}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True,
                   help="Qwen3-MoE model dir (with its tokenizer); with --server only its tokenizer and generation_config.json are read")
    p.add_argument("--data", required=True, help="chat .jsonl/.json/.parquet file or dir, or 'sharegpt-package'")
    p.add_argument("--out", required=True, help="output .jsonl (same row format as the input); may not be, or sit inside, --data")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--sampling", choices=["explicit", "model"], default="explicit",
                   help="model: values not given here come from the target's generation_config.json")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None, help="-1 = all tokens")
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--thinking", choices=["on", "off"], default=None,
                   help="enable_thinking of the chat template (default: the template's own default)")
    p.add_argument("--max-len", type=int, default=2048, help="prompt + answer tokens; longer turns end the conversation")
    p.add_argument("--max-turns", type=int, default=None, help="regenerate at most N assistant turns per conversation")
    p.add_argument("--limit", type=int, default=None, help="read only the first N rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true",
                   help="start over although --out or its state belongs to another run (an existing --out is replaced when done)")
    p.add_argument("--report", default=None, help="also write the report JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also MTP_DEBUG=1)")
    engine = p.add_argument_group("built-in engine (without --server)")
    engine.add_argument("--batch-size", type=int, default=None, help=f"default {ENGINE_DEFAULTS['batch_size']}")
    engine.add_argument("--chunk-rows", type=int, default=None,
                        help="rows regenerated together (default 8 x --batch-size); a resumed run makes its chunk again")
    engine.add_argument("--device", default=None, help=f"default {ENGINE_DEFAULTS['device']}")
    server = p.add_argument_group("OpenAI-compatible server")
    server.add_argument("--server", default=None, metavar="URL", help="e.g. http://127.0.0.1:30000 (SGLang) or :8000 (vLLM)")
    server.add_argument("--model", default=None, help="model name of the requests (default: the first of GET /v1/models)")
    server.add_argument("--concurrency", type=int, default=None,
                        help=f"conversations in flight (default {SERVER_DEFAULTS['concurrency']})")
    server.add_argument("--timeout", type=float, default=None, help=f"seconds per request (default {SERVER_DEFAULTS['timeout']:.0f})")
    server.add_argument("--attempts", type=int, default=None,
                        help=f"tries per request on transient errors, with exponential backoff (default {SERVER_DEFAULTS['attempts']})")
    server.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default $OPENAI_API_KEY)")
    a = p.parse_args(argv)
    own, other = (SERVER_DEFAULTS, ENGINE_DEFAULTS) if a.server else (ENGINE_DEFAULTS, SERVER_DEFAULTS)
    wrong = [k for k in other if getattr(a, k) is not None]
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        verb = "applies" if len(wrong) == 1 else "apply"
        p.error(f"{flags} {verb} only with --server" if a.server is None else f"{flags} {verb} to the built-in engine, not --server")
    for k, v in own.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def run(a) -> int:
    if not Path(a.target).is_dir():
        raise ValueError(f"--target '{a.target}' is not a directory; pass the Qwen3-MoE model dir (with its tokenizer)")
    check_out_path(a.out, a.data)
    sampling, _ = resolve_sampling({"temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k,
                                    "min_p": a.min_p}, a.target, a.sampling)
    s = RegenSettings(a.max_new_tokens, sampling, None if a.thinking is None else a.thinking == "on",
                      a.max_len, a.max_turns, a.seed)
    raws = load_chat_rows(a.data, limit=a.limit)["raw"]
    tokenizer = load_tokenizer(a.target)
    if a.server:
        client = ChatClient(a.server, a.model, a.api_key, timeout_s=a.timeout, attempts=a.attempts)
        client.model = client.model or client.served_model() or Path(a.target).resolve().name
        print(f"regenerating through {client.url} (model {client.model!r}), {a.concurrency} conversations at a time",
              flush=True)
        backend = ServerBackend(client, a.concurrency)
    else:
        backend = EngineBackend(a.target, a.device, a.batch_size, a.chunk_rows)
    # --out is taken (or refused) before the target loads
    report = regenerate_to_file(backend, tokenizer, raws, s, a.out, force=a.force, progress=not a.no_progress)
    if a.report:
        atomic_write_text(a.report, json.dumps(report, indent=2) + "\n")
    done = "already complete (nothing to do); " if report.get("already_complete") else (
        f"resumed at row {report['resumed_from_row']}; " if report["resumed_from_row"] else "")
    print(f"{a.out}: {done}{report['summary']}; {report['turns_regenerated']} turns, {report['generated_tokens']} "
          f"tokens in {report['seconds']:.0f}s; cut: {report['conversations_cut'] or 'none'}", flush=True)
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        return run(a)
    except (ValueError, OSError, ServerError) as exc:  # user, input and server errors: the message says what to do
        if a.debug or os.environ.get("MTP_DEBUG") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
