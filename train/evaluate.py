"""Run the speculative-decoding evaluator after training (config section `eval`).

Prompts come from `eval.prompts` (any source `data.chat.chat_prompts` reads) or, by default, from
the held-out slice of `data.train`: each held-out conversation's messages before its first
assistant turn, rendered as a server renders them (`data.enable_thinking`). The prompts used are
saved as `eval_prompts.jsonl` (token ids) next to the report, so that
`scripts/eval_acceptance.py --prompts <run>/eval_prompts.jsonl` repeats the same measurement on
the exported weights. Sampling: `eval.sampling`, `eval.temperature`, ... (model/acceptance.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from data.chat import chat_prompts
from model.acceptance import VerifyRule, resolve_sampling
from model.atomic import atomic_file, atomic_write_text
from model.evaluate import EvalSettings, evaluate
from model.mtp_weights import load_head
from model.report import format_report


def heldout_prompts(cfg, tokenizer, heldout_ds, limit: int) -> list[dict]:
    """The first `limit` held-out conversations' prompts: their raw rows (the dataset's `row`
    column) rendered up to the first assistant turn with the generation prompt."""
    if heldout_ds is None or len(heldout_ds) == 0:
        raise ValueError("eval: the held-out slice is empty; set eval.prompts or raise data.holdout")
    rows = heldout_ds["row"][:limit]
    prompts = chat_prompts(cfg.data.train, tokenizer, limit=cfg.data.limit, enable_thinking=cfg.data.enable_thinking,
                           rows=rows)
    for p, r in zip(prompts, rows):
        p["id"] = f"heldout-{r}"
    return prompts


def eval_settings(cfg) -> EvalSettings:
    """The evaluator's settings from the `eval` section (sampling resolved against the target)."""
    e = cfg.eval
    sampling, _ = resolve_sampling({"temperature": e.temperature, "top_p": e.top_p, "top_k": e.top_k,
                                    "min_p": e.min_p}, cfg.target.path, e.sampling)
    rule = VerifyRule("rejection" if e.rejection_sampling else "target_only",
                      threshold_single=e.accept_threshold_single, threshold_acc=e.accept_threshold_acc)
    return EvalSettings(steps=e.steps, sampling=sampling, verify=rule, batch_size=e.batch_size,
                        max_new_tokens=e.max_new_tokens, seed=cfg.train.seed, thinking=cfg.data.enable_thinking,
                        token_map=e.token_map)


def run_eval(cfg, target, tokenizer, head_dir: Path, heldout_ds, report_path: Path) -> dict:
    if cfg.eval.prompts:
        prompts = chat_prompts(cfg.eval.prompts, tokenizer, limit=cfg.eval.num_prompts,
                               enable_thinking=cfg.data.enable_thinking)
    else:
        prompts = heldout_prompts(cfg, tokenizer, heldout_ds, cfg.eval.num_prompts)
    device = target.device
    head = load_head(head_dir, target.config, device, target.lm_head.weight.dtype)
    report = evaluate(target, head, tokenizer, prompts, eval_settings(cfg))
    report_path = Path(report_path)
    report["head"] = str(head_dir)
    atomic_write_text(report_path, json.dumps(report, indent=2))
    with atomic_file(report_path.parent / "eval_prompts.jsonl") as f:
        for p in prompts:
            f.write(json.dumps({"id": p["id"], "category": p.get("category"), "prompt_ids": p["prompt_ids"]}) + "\n")
    print(format_report(report), flush=True)
    del head
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report
