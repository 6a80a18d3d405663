"""Named Qwen3-MoE configs: the real ones (for shapes and benchmarks) and tiny ones (tests, demo).

The tiny flavour runs the same code path as the 30B model with smaller numbers.
"""

from __future__ import annotations

from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig

QWEN3_VOCAB_SIZE = 151936

# as the published config.json files
QWEN3_30B_A3B = dict(
    hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
    num_experts_per_tok=8, norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1e6,
    vocab_size=QWEN3_VOCAB_SIZE, tie_word_embeddings=False, max_position_embeddings=40960,
    bos_token_id=151643, eos_token_id=151645, decoder_sparse_step=1, mlp_only_layers=[],
)
QWEN3_235B_A22B = dict(
    QWEN3_30B_A3B, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
    num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4,
)
# A few MB of weights, runs a training step on CPU in well under a second (vocab aside).
TINY = dict(
    hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
    num_experts_per_tok=2, norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1e6,
    vocab_size=QWEN3_VOCAB_SIZE, tie_word_embeddings=False, max_position_embeddings=4096,
    bos_token_id=151643, eos_token_id=151645, decoder_sparse_step=1, mlp_only_layers=[],
    initializer_range=0.02,
)

# A small GPU target (about 313M params, most of them the 151,936-row embedding and head).
SMALL = dict(
    TINY, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4,
)

# The demo target's shape (train/demo_target.py, 467M params): for benchmarks of its steps.
DEMO = dict(SMALL, num_hidden_layers=12, num_experts=64)

NAMED = {"qwen3-30b-a3b": QWEN3_30B_A3B, "qwen3-235b-a22b": QWEN3_235B_A22B, "small": SMALL, "demo": DEMO,
         "tiny": TINY}


def make_config(name: str = "tiny", **overrides) -> Qwen3MoeConfig:
    """A `Qwen3MoeConfig` for a named flavour, with keyword overrides."""
    if name not in NAMED:
        raise ValueError(f"unknown config name {name!r}; choose one of {sorted(NAMED)}")
    kwargs = dict(NAMED[name])
    kwargs.update(overrides)
    return Qwen3MoeConfig(**kwargs)


def build_random_target(name: str = "tiny", seed: int = 0, *, device="cpu", dtype=None, std: float | None = None,
                        unit_logits: bool = True, **overrides):
    """A randomly initialised `Qwen3MoeForCausalLM`: the one builder of random targets (tests, the
    CPU demo, benchmarks, the demo target's initialisation). Built in place on `device` in
    `dtype` (fp32 by default), never as a CPU/fp32 copy first (122 GB for 30B-A3B).

    std=None: transformers' own init after `torch.manual_seed(seed)`. A float: every matrix
    Normal(0, std) and every norm 1, from a generator on `device` seeded with `seed`.
    unit_logits: the lm_head gets std 1/sqrt(hidden) (after either init). transformers' 0.02
    makes every logit of a 64-wide tiny model nearly 0, so no head trained against it could
    express a distribution and the demo's loss would sit at ln(vocab).
    """
    import torch
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM

    config = make_config(name, **overrides)
    dtype = dtype or torch.float32
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3MoeForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        if std is not None:
            gen = torch.Generator(device=device).manual_seed(seed)
            for p in model.parameters():
                if p.ndim == 1:
                    p.fill_(1.0)  # norms
                else:
                    p.normal_(0.0, std, generator=gen)
        if unit_logits:
            model.lm_head.weight.normal_(0.0, config.hidden_size**-0.5)
    return model
