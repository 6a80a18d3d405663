"""Run the speculative-decoding evaluator after training (config section `eval`).

Prompts come from `eval.prompts` (any source `data.chat.chat_prompts` reads) or, by default, from
the held-out slice of `data.train`: each held-out conversation up to its first assistant token.
The prompts used are saved as `eval_prompts.jsonl` (token ids) next to the report, so that
`scripts/eval_acceptance.py --prompts <run>/eval_prompts.jsonl` repeats the same measurement on
the exported weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from data.chat import chat_prompts
from model.evaluate import EvalSettings, evaluate
from model.mtp_weights import load_head
from model.report import format_report


def heldout_prompts(heldout_ds, limit: int) -> list[dict]:
    """Held-out rows cut before their first assistant token (the template's assistant header and
    empty think block stay in the prompt, as with add_generation_prompt + enable_thinking=False)."""
    prompts = []
    for i in range(len(heldout_ds)):
        row = heldout_ds[i]
        mask = row["loss_mask"]
        first = next((j for j, m in enumerate(mask) if m), None)
        if first is None or first < 2:
            continue
        prompts.append({"id": f"heldout-{i}", "category": None, "prompt_ids": list(row["input_ids"][:first])})
        if len(prompts) == limit:
            break
    if not prompts:
        raise ValueError("eval: the held-out slice holds no usable prompt; set eval.prompts or raise data.holdout")
    return prompts


def run_eval(cfg, target, tokenizer, head_dir: Path, heldout_ds, report_path: Path) -> dict:
    if cfg.eval.prompts:
        prompts = chat_prompts(cfg.eval.prompts, tokenizer, limit=cfg.eval.num_prompts)
    else:
        prompts = heldout_prompts(heldout_ds, cfg.eval.num_prompts)
    device = target.device
    head = load_head(head_dir, target.config, device, target.lm_head.weight.dtype)
    settings = EvalSettings(steps=cfg.eval.steps, temperature=cfg.eval.temperature, batch_size=cfg.eval.batch_size,
                            max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.train.seed)
    report = evaluate(target, head, tokenizer, prompts, settings)
    report_path = Path(report_path)
    report["head"] = str(head_dir)
    report_path.write_text(json.dumps(report, indent=2))
    with open(report_path.parent / "eval_prompts.jsonl", "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"id": p["id"], "category": p.get("category"), "prompt_ids": p["prompt_ids"]}) + "\n")
    print(format_report(report), flush=True)
    del head
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report
