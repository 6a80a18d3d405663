"""The one config tree: YAML mapped 1:1 onto dataclasses, dotted overrides, validation here only.

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=50", "head.num_steps=3"])

Defaults live in the dataclasses below and nowhere else. An unknown key or a bad value raises a
`ValueError` that names the key. The resolved tree is saved as `config.yaml` next to every
checkpoint, so a run can always be reproduced (and resumed) from its own output directory.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class TargetConfig:
    path: str = "artifacts/tiny-target"  # local HF dir or hub id of a Qwen3-MoE model
    tokenizer: str | None = None  # defaults to target.path
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    # torch.compile the target's decoder layers (GPU only; 1.58x on the 30B-A3B target forward in
    # docs/BENCHMARKS.md after ~15 s of compiling; each new sequence length compiles again until
    # torch marks it dynamic)
    compile: bool = False
    # none: every rank holds the whole target. zero3: its decoder layers are split across ranks by
    # a DeepSpeed ZeRO-3 inference engine, embed_tokens and lm_head stay whole on every rank
    # (train/partition.py; needs `accelerate launch` with a DeepSpeed config; docs/training.md)
    partition: str = "none"


@dataclass
class HeadConfig:
    init: str = "last_layer"  # last_layer | random | PATH to MTP weights (export dir, checkpoint)
    num_steps: int = 1  # k recursive steps trained (docs/training.md)
    step_decay: float = 0.6  # step j weight ~ step_decay**(j-1), normalised (FastMTP)
    loss: str = "ce"  # ce | kl | ce+kl
    kl_weight: float = 1.0
    loss_chunk_size: int = 4096  # tokens per chunk of the vocabulary projection
    activation_checkpointing: bool = False
    # torch.compile the head's step (fuse, decoder layer, norm) in training; GPU only, not under
    # ZeRO-3 (docs/training.md, "Speed")
    compile: bool = False


@dataclass
class DataConfig:
    train: str = "sharegpt-package"  # JSON/JSONL/parquet path, hub id, or sharegpt-package
    limit: int | None = None  # rows read from the source (None = all)
    holdout: int = 0  # rows held out from `train` for the final evaluation
    max_length: int = 2048
    num_proc: int = 1
    bucket_multiplier: int = 50
    hidden_states: str | None = None  # dir written by scripts/dump_hidden_states.py; training then skips the target forward
    # the chat template's enable_thinking when rendering rows (null: the template's default, as a
    # server renders a request that does not set it; Qwen3's hybrid models then think). false drops
    # rows' reasoning; true/null keep it inside the <think> block and train on it
    enable_thinking: bool | None = None


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 1000  # optimizer steps
    micro_batch_size: int = 4  # sequences per rank per forward
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    warmup_steps: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    resume: str = "auto"  # auto (newest complete checkpoint) | none | PATH to checkpoint-<step>
    save_every: int = 500  # optimizer steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    # optimizer steps between held-out evaluations written to metrics.jsonl (a training curve);
    # 0 = only at the end. Needs data.holdout > 0 to do anything.
    heldout_every: int = 0
    # >0: profile optimizer steps profile_step .. profile_step+2 (torch.profiler, CPU and CUDA) and
    # write <output_dir>/profile-step<N>.txt (docs/training.md, "Speed")
    profile_step: int = 0


@dataclass
class LogConfig:
    backend: str = "none"  # wandb | tensorboard | none (metrics.jsonl is always written)
    project: str = "qwen3-moe-mtp"
    run_name: str | None = None


@dataclass
class EvalConfig:
    enabled: bool = False  # run the speculative evaluator after training
    prompts: str | None = None  # prompt source; None = the held-out slice of data.train
    num_prompts: int = 16
    max_new_tokens: int = 64
    steps: int = 3
    # sampling as in scripts/eval_acceptance.py: "model" fills the unset values (null) from the
    # target's generation_config.json (SGLang's --sampling-defaults model); "explicit": greedy unless set
    sampling: str = "explicit"
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None  # -1 = all tokens
    min_p: float | None = None
    rejection_sampling: bool = False  # p/q verification of sampled drafts instead of SGLang's default rule
    accept_threshold_single: float = 1.0  # SGLang's --speculative-accept-threshold-single
    accept_threshold_acc: float = 1.0  # SGLang's --speculative-accept-threshold-acc
    batch_size: int = 8
    min_acceptance_length: float | None = None  # export only if reached (when set)
    # a draft vocabulary (scripts/build_token_map.py): the evaluation drafts among its token ids and
    # the export ships it, so the printed SGLang command passes it as --speculative-token-map
    token_map: str | None = None


@dataclass
class ExportConfig:
    enabled: bool = True  # export mtp.* weights at the end of training
    out: str | None = None  # default: <output_dir>/export
    dtype: str = "bf16"
    merge: bool = False
    # none | fp8: fp8 quantizes the MTP layer's attention and experts to a block-FP8 target's scheme
    # (docs/export.md, FP8 targets); none writes a plain draft (for an FP8 target: bf16, served with
    # --speculative-draft-model-quantization unquant)
    quantize: str = "none"


@dataclass
class Config:
    target: TargetConfig = field(default_factory=TargetConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# --------------------------------------------------------------------------- building

def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check/convert one leaf value against its annotated type; ValueError names the key."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{key}: bad value {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key}: expected a string, got {value!r}")
    raise AssertionError(f"unsupported annotation {typ} for {key}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ValueError(f"unknown config key(s): {', '.join(where + k for k in unknown)}; valid: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, data[f.name] or {}, key)
        else:
            kwargs[f.name] = _coerce(key, data[f.name], typ)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value`; the value is read as YAML (so 3 is an int, true a bool, null None)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (optional), apply dotted overrides, build and validate the tree."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"config file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def config_from_dict(tree: dict) -> Config:
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every cross-field and range check, in one place."""

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ValueError(f"{key}: {msg}")

    need(cfg.target.dtype in ("auto", "bf16", "fp32"), "target.dtype", "must be auto, bf16 or fp32")
    need(bool(cfg.target.path), "target.path", "must name a Qwen3-MoE model dir or hub id")
    need(cfg.target.partition in ("none", "zero3"), "target.partition", "must be none or zero3")
    if cfg.target.compile:
        need(cfg.target.partition == "none" and not cfg.data.hidden_states, "target.compile",
             "compiles the whole target's decoder layers; it applies to online training with "
             "target.partition=none only")
    if cfg.target.partition == "zero3":
        need(not cfg.data.hidden_states, "target.partition",
             "zero3 partitions the target's decoder layers, which offline training (data.hidden_states) never "
             "loads; use target.partition=none with data.hidden_states")
        need(not cfg.eval.enabled, "eval.enabled",
             "the speculative evaluator runs the target on rank 0 alone, which a partitioned target "
             "(target.partition=zero3) cannot do; set eval.enabled=false (the held-out loss and accuracy "
             "are still computed on all ranks) and evaluate the export with scripts/eval_acceptance.py")
    need(cfg.head.num_steps >= 1, "head.num_steps", "must be >= 1")
    need(0 < cfg.head.step_decay <= 1, "head.step_decay", "must be in (0, 1]")
    need(cfg.head.loss in ("ce", "kl", "ce+kl"), "head.loss", "must be ce, kl or ce+kl")
    need(cfg.head.kl_weight >= 0, "head.kl_weight", "must be >= 0")
    need(cfg.head.loss_chunk_size >= 0, "head.loss_chunk_size", "must be >= 0 (0 = no chunking)")
    need(bool(cfg.head.init), "head.init", "must be last_layer, random or a path to MTP weights")
    need(cfg.data.max_length >= 3, "data.max_length", "must be >= 3 (a next-next-token label needs 3 tokens)")
    need(cfg.data.limit is None or cfg.data.limit > 0, "data.limit", "must be > 0 or null")
    need(cfg.data.holdout >= 0, "data.holdout", "must be >= 0")
    need(cfg.data.num_proc >= 1, "data.num_proc", "must be >= 1")
    need(cfg.train.max_steps >= 1, "train.max_steps", "must be >= 1")
    need(cfg.train.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1 (DeepSpeed rejects 0)")
    need(cfg.train.grad_accum >= 1, "train.grad_accum", "must be >= 1 (DeepSpeed rejects 0)")
    need(cfg.train.lr > 0, "train.lr", "must be > 0")
    need(cfg.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    need(cfg.train.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = no clipping)")
    need(cfg.train.save_every >= 0, "train.save_every", "must be >= 0")
    need(cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    need(cfg.train.log_every >= 1, "train.log_every", "must be >= 1")
    need(0 <= cfg.train.profile_step <= cfg.train.max_steps, "train.profile_step",
         f"must be between 0 (no profile) and train.max_steps={cfg.train.max_steps}")
    need(cfg.train.heldout_every >= 0, "train.heldout_every", "must be >= 0 (0 = held-out metrics only at the end)")
    need(bool(cfg.train.resume), "train.resume", "must be auto, none or a checkpoint path")
    need(cfg.log.backend in ("wandb", "tensorboard", "none"), "log.backend", "must be wandb, tensorboard or none")
    need(cfg.eval.steps >= 1, "eval.steps", "must be >= 1")
    need(cfg.eval.num_prompts >= 1, "eval.num_prompts", "must be >= 1")
    need(cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
    need(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    need(cfg.eval.sampling in ("explicit", "model"), "eval.sampling", "must be explicit or model")
    need(cfg.eval.temperature is None or cfg.eval.temperature >= 0, "eval.temperature", "must be >= 0 or null")
    need(cfg.eval.top_p is None or 0 < cfg.eval.top_p <= 1, "eval.top_p", "must be in (0, 1] or null")
    need(cfg.eval.top_k is None or cfg.eval.top_k == -1 or cfg.eval.top_k >= 1, "eval.top_k", "must be >= 1, -1 (all) or null")
    need(cfg.eval.min_p is None or 0 <= cfg.eval.min_p < 1, "eval.min_p", "must be in [0, 1) or null")
    need(cfg.eval.accept_threshold_single > 0 and cfg.eval.accept_threshold_acc > 0, "eval.accept_threshold_single",
         "the accept thresholds must be > 0")
    need(not (cfg.eval.rejection_sampling and (cfg.eval.accept_threshold_single, cfg.eval.accept_threshold_acc) != (1.0, 1.0)),
         "eval.rejection_sampling", "the accept thresholds apply to the target-only rule; leave them at 1.0")
    need(
        not (cfg.eval.enabled and cfg.eval.prompts is None and cfg.data.holdout == 0),
        "eval.prompts", "eval.enabled needs eval.prompts or data.holdout > 0 (the held-out slice)",
    )
    need(cfg.data.hidden_states is None or bool(cfg.data.hidden_states), "data.hidden_states", "must be a dump dir or null")
    need(
        not (cfg.data.hidden_states and cfg.eval.enabled), "eval.enabled",
        "offline training (data.hidden_states) loads no target layers, so the speculative evaluator cannot run in "
        "the same process; set eval.enabled=false and evaluate the export with scripts/eval_acceptance.py",
    )
    need(cfg.eval.token_map is None or Path(cfg.eval.token_map).is_file(), "eval.token_map",
         f"{cfg.eval.token_map} does not exist; build one with scripts/build_token_map.py or set null")
    need(cfg.export.dtype in ("bf16", "fp16", "fp32"), "export.dtype", "must be bf16, fp16 or fp32")
    need(cfg.export.quantize in ("none", "fp8"), "export.quantize", "must be none or fp8")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flat_dict(tree: dict) -> dict[str, Any]:
    """`{"train": {"lr": 1e-4}}` -> `{"train.lr": 1e-4}` (two levels: section.key)."""
    return {f"{section}.{key}": value for section, values in tree.items() for key, value in (values or {}).items()}


# --------------------------------------------------------------------------- resuming

# Every key of Config, classified for `train.resume`: FIXED keys change the trajectory (what is
# trained on, in which order, with which optimizer and schedule, from which target), so a
# resumed run must keep the checkpoint's values; SAFE keys change how the run is driven, logged,
# evaluated or exported, and may differ. tests/test_config.py checks that every key is in
# exactly one of the two sets. train.max_steps is safe, but a value below the checkpoint's
# step is refused (train/checkpoint.py); a new value re-stretches the cosine schedule from the
# resumed step on.
RESUME_FIXED = frozenset({
    "target.path", "target.tokenizer", "target.dtype", "target.attn_implementation", "target.trust_remote_code",
    "head.init", "head.num_steps", "head.step_decay", "head.loss", "head.kl_weight",
    "data.train", "data.limit", "data.holdout", "data.max_length", "data.bucket_multiplier", "data.hidden_states",
    "data.enable_thinking",  # changes the rendered rows
    "train.micro_batch_size", "train.grad_accum", "train.lr", "train.weight_decay", "train.adam_beta1",
    "train.adam_beta2", "train.warmup_steps", "train.grad_clip", "train.seed",
})
RESUME_SAFE = frozenset({
    "target.compile", "target.partition",  # how the frozen target runs, not what it computes
    "head.loss_chunk_size", "head.activation_checkpointing", "head.compile",  # memory/speed, same loss
    "data.num_proc",
    "train.output_dir", "train.max_steps", "train.resume", "train.save_every", "train.keep_checkpoints",
    "train.log_every", "train.heldout_every", "train.profile_step",
    "log.backend", "log.project", "log.run_name",
    "eval.enabled", "eval.prompts", "eval.num_prompts", "eval.max_new_tokens", "eval.steps", "eval.sampling",
    "eval.temperature", "eval.top_p", "eval.top_k", "eval.min_p", "eval.rejection_sampling",
    "eval.accept_threshold_single", "eval.accept_threshold_acc", "eval.batch_size", "eval.min_acceptance_length",
    "eval.token_map",
    "export.enabled", "export.out", "export.dtype", "export.merge", "export.quantize",
})
# values that name a local path: compared as resolved paths, so `x.jsonl` and `./x.jsonl` agree
_PATH_KEYS = ("target.path", "target.tokenizer", "head.init", "data.train", "data.hidden_states")


def _same_value(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if key in _PATH_KEYS and isinstance(old, str) and isinstance(new, str) and Path(old).exists():
        return Path(old).resolve() == Path(new).resolve()
    return False


def resume_conflicts(saved: dict, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every RESUME_FIXED key that differs.
    `saved` is a checkpoint's config.yaml as read; a key it lacks counts as its default."""
    defaults, old, new = flat_dict(to_dict(Config())), flat_dict(saved), flat_dict(to_dict(cfg))
    return [(key, old.get(key, defaults[key]), new[key]) for key in sorted(RESUME_FIXED)
            if not _same_value(key, old.get(key, defaults[key]), new[key])]


def save_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
