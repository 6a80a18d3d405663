"""Evaluate a drafter: speculative decoding of prompts against plain decoding, in one engine.

    python scripts/eval_acceptance.py --target DIR --mtp DIR --prompts FILE --steps 3
    report = evaluate(target, head, tokenizer, prompts, EvalSettings(steps=3))   # what train/ calls
    report = evaluate_batch_sizes(target, head, tokenizer, prompts, settings, [1, 8, 16])

Each batch of prompts is decoded twice by the same engine (model/engine.py): speculatively and
plainly, with the same sampler. The plain run is the speed baseline and, when greedy, the
lossless reference: speculative output must equal it token for token. The report is
model/report.py's; sampling and the verification rule are model/acceptance.py's (SGLang's).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from model.acceptance import SamplingParams, VerifyRule
from model.drafters import DRAFTERS, build_drafter
from model.engine import Engine, TargetLM
from model.report import batch_size_table, build_report
from model.token_map import load_token_map, token_map_info

log = logging.getLogger(__name__)

IM_END_ID = 151645  # <|im_end|>, the Qwen3 chat end of turn


@dataclass
class EvalSettings:
    """How to decode: the speculative setting (K, drafter, sampling) and the engine's knobs."""

    steps: int = 3  # K draft tokens per verify step
    sampling: SamplingParams = field(default_factory=SamplingParams)  # greedy by default
    verify: VerifyRule = field(default_factory=VerifyRule)  # how drafts are verified when sampling
    batch_size: int = 8
    max_new_tokens: int = 256
    seed: int = 0
    max_len: int | None = None  # KV cache slots; None = longest prompt + max_new_tokens + K + 1
    drafter: str = "mtp"  # mtp | ngram
    baseline: bool = True  # also decode plainly (speed-up and the lossless check)
    cuda_graphs: bool | None = None  # None = on when the target is on CUDA
    experts: str | None = None  # the torch path's experts (None = grouped_mm on CUDA, loop on CPU)
    compile: bool = False  # torch.compile the decode-step layer
    kernels: str | None = None  # triton | torch (None = triton on CUDA when installed)
    thinking: bool | None = None  # how the prompts were rendered (recorded; None = the template's default)
    token_map: str | None = None  # the head drafts among these token ids (SGLang's --speculative-token-map)

    def check(self) -> None:
        """ValueError naming the setting and the fix."""
        if self.steps < 1:
            raise ValueError(f"steps (K) must be >= 1, got {self.steps}")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.drafter not in DRAFTERS:
            raise ValueError(f"unknown drafter {self.drafter!r}; choose one of {DRAFTERS}")
        if self.token_map is not None and self.drafter != "mtp":
            raise ValueError(f"a token map limits an MTP head's drafts; drop it for drafter {self.drafter!r}")


def eos_token_ids(config, tokenizer=None) -> list[int]:
    """<|im_end|>, the tokenizer's eos and the config's eos ids, those inside the vocabulary."""
    ids = {IM_END_ID}
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    cfg_eos = getattr(config, "eos_token_id", None)
    ids.update([cfg_eos] if isinstance(cfg_eos, int) else (cfg_eos or []))
    return sorted(i for i in ids if 0 <= i < config.vocab_size)


def prompt_rows(prompts) -> list[dict]:
    """data.chat.chat_prompts() rows or plain token-id lists -> [{"id", "category", "prompt_ids"}]."""
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, dict):
            rows.append({"id": p.get("id", i), "category": p.get("category"), "prompt_ids": list(p["prompt_ids"])})
        else:
            rows.append({"id": i, "category": None, "prompt_ids": list(p)})
        if not rows[-1]["prompt_ids"]:
            raise ValueError(f"prompt {rows[-1]['id']} is empty")
    if not rows:
        raise ValueError("no prompts to evaluate")
    return rows


@torch.no_grad()
def evaluate(target, head, tokenizer, prompts, settings: EvalSettings | None = None, *, device=None, eos_ids=None,
             progress: bool = True) -> dict:
    """Speculative decoding of `prompts` with the drafter, against plain decoding; the report dict.

    target: FrozenTarget / Qwen3MoeForCausalLM (already on its device) or a TargetLM;
    head: MTPHead (None for drafter="ngram"); prompts: chat_prompts() rows or token-id lists.
    Throughputs count tokens made by decode steps (not the prefill's first token) over the
    decode phase only (prefill excluded), both modes timed the same way.
    """
    from tqdm.auto import tqdm

    s = settings or EvalSettings()
    s.check()
    rows = prompt_rows(prompts)
    tlm = target if isinstance(target, TargetLM) else TargetLM(target, experts=s.experts, compile=s.compile,
                                                                  kernels=s.kernels)
    check_prompt_lengths(rows, tlm.config, s.max_new_tokens)
    if device is not None and torch.device(device).type != tlm.device.type:
        raise ValueError(f"the target is on {tlm.device} but device={device}; load it there first")
    room = s.max_new_tokens + s.steps + 1
    longest = max(len(r["prompt_ids"]) for r in rows)
    max_len = longest + room if s.max_len is None else s.max_len
    for r in rows:
        if len(r["prompt_ids"]) + room > max_len:
            raise ValueError(f"prompt {r['id']!r} has {len(r['prompt_ids'])} tokens; with max_new_tokens="
                             f"{s.max_new_tokens} and K={s.steps} it needs --max-len >= {len(r['prompt_ids']) + room} "
                             f"(got {max_len}); raise --max-len or drop the prompt")
    eos = eos_token_ids(tlm.config, tokenizer) if eos_ids is None else list(eos_ids)
    token_map = None if s.token_map is None else load_token_map(s.token_map, tlm.config.vocab_size)
    draft = build_drafter(s.drafter, head, tlm, experts=s.experts, compile=s.compile, kernels=s.kernels,
                          token_map=token_map)
    batch_size = min(s.batch_size, len(rows))
    engine = Engine(tlm, draft, batch_size=batch_size, max_len=max_len, max_new_tokens=s.max_new_tokens,
                    steps=s.steps, sampling=s.sampling, rule=s.verify, eos_ids=eos, cuda_graphs=s.cuda_graphs)
    torch.manual_seed(s.seed)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["prompt_ids"]))  # less padding
    spec_out, base_out = [None] * len(rows), [None] * len(rows)
    spec_s = base_s = 0.0
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=f"{s.drafter} K={s.steps}", unit="batch", disable=not progress):
        batch = [rows[i]["prompt_ids"] for i in idx]
        out = engine.generate(batch, speculative=True)
        spec_s += out.decode_s
        for i, r in zip(idx, out.rows):
            spec_out[i] = r
        if s.baseline:
            ref = engine.generate(batch, speculative=False)
            base_s += ref.decode_s
            for i, r in zip(idx, ref.rows):
                base_out[i] = r
    return build_report(rows, spec_out, base_out if s.baseline else None, spec_s, base_s, steps=s.steps,
                        sampling=s.sampling.as_dict(),
                        verify_rule=s.verify.as_dict() if not s.sampling.greedy else {"kind": "greedy"},
                        thinking=s.thinking, batch_size=batch_size, max_new_tokens=s.max_new_tokens,
                        drafter=s.drafter, device=str(tlm.device), eos_ids=eos,
                        token_map=None if token_map is None else token_map_info(s.token_map, token_map),
                        kernels=getattr(getattr(tlm, "stack", None), "kernels", None))


def evaluate_batch_sizes(target, head, tokenizer, prompts, settings: EvalSettings, batch_sizes: list[int], *,
                         device=None, eos_ids=None, progress: bool = True) -> dict:
    """`evaluate` at each batch size (same prompts, same seed). The report is the first batch
    size's, plus `by_batch_size`: plain and speculative tok/s per batch size and whether
    speculation is slower there (model/report.py's `batch_size_table`)."""
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be >= 1, got {batch_sizes}")
    tlm = target if isinstance(target, TargetLM) else TargetLM(target, experts=settings.experts,
                                                                  compile=settings.compile, kernels=settings.kernels)
    reports = [evaluate(tlm, head, tokenizer, prompts, dataclasses.replace(settings, batch_size=b), device=device,
                        eos_ids=eos_ids, progress=progress) for b in batch_sizes]
    report = reports[0]
    report["by_batch_size"] = batch_size_table(reports)
    return report


def check_prompt_lengths(rows: list[dict], config, max_new_tokens: int) -> None:
    """Warn when a prompt plus its answer runs past the target's max_position_embeddings: the
    engine would still run (RoPE extrapolates), but the target was not trained there."""
    limit = getattr(config, "max_position_embeddings", None)
    if not limit:
        return
    over = [(r["id"], len(r["prompt_ids"])) for r in rows if len(r["prompt_ids"]) + max_new_tokens > limit]
    if over:
        log.warning("%d prompt(s) plus max_new_tokens=%d run past the target's max_position_embeddings=%d, e.g. "
                    "prompt %r with %d tokens; results there are outside what the target was trained on",
                    len(over), max_new_tokens, limit, over[0][0], over[0][1])
