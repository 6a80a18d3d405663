"""Build every Triton kernel of the decode engine and of training for an H100/H200 (sm_90) on a
machine without a GPU, as the kernels' wrappers launch them at the Qwen3-30B-A3B shape.

    python tests/kernel_builds.py > builds.json      # in a process without TRITON_INTERPRET

The wrappers run on CPU tensors (torch.empty: the weights' memory is never touched) with every
launch recorded instead of run; each recorded launch is then compiled by Triton's CUDA compiler
down to a cubin with the ptxas that ships with triton. The CPU interpreter that runs the kernel
tests executes kernels as Python, so it cannot catch what only a GPU build rejects (types of loop
variables, memory semantics of atomics, unsupported ops); this does. Programmatic dependent launch
is forced on, as on Hopper. Output: {label: {"cubin": bytes, "ptx": text}} as JSON, with "error"
in place of both for a kernel that does not build. tests/test_kernels.py runs it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET: the interpreter builds nothing"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

LAUNCHES: list[tuple[str, JITFunction, tuple, dict]] = []
CASE = [""]


def _record(self, *args, grid, warmup, **kwargs):
    LAUNCHES.append((CASE[0], self, args, kwargs))


JITFunction.run = _record  # launches are recorded, never run

from model import attn_kernels, fast_moe, linear_kernels, loss_kernels, moe_kernels  # noqa: E402

for mod in (attn_kernels, linear_kernels, moe_kernels):
    mod.pdl_args = lambda t: {"USE_PDL": True, "launch_pdl": True}

DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64", torch.int32: "i32",
      torch.bool: "i1", torch.uint8: "u8"}
H, NQ, NKV, D, E, I, TOP_K, V = 2048, 32, 4, 128, 128, 768, 8, 151936  # Qwen3-30B-A3B
bf = torch.bfloat16


def e(*shape, dtype=bf):
    return torch.empty(*shape, dtype=dtype)


def launch_all() -> None:
    """The wrappers at a decode step (1 token) and a K=3 verify step at batch 16 (64 tokens),
    with the configs in use; then with the split options on, and with the linear kernel's early
    first tile."""
    qkv_w, o_w, norm = e((NQ + 2 * NKV) * D, H), e(H, NQ * D), e(H)
    gate_up, down, router_w, lm_head = e(E, 2 * I, H), e(E, H, I), e(E, H), e(V, H)
    for B, T in ((1, 1), (16, 4)):
        N, S = B * T, 4096 + 16
        CASE[0] = f"B={B},T={T}"
        x = e(N, H)
        linear_kernels.linear(x, qkv_w, norm_w=norm, eps=1e-6)
        linear_kernels.linear(e(N, NQ * D), o_w)
        linear_kernels.linear(x, lm_head, True)
        cache = e(2, B, NKV, S, D)
        pos = torch.zeros(B, T, dtype=torch.long)
        q = attn_kernels.qk_prep(e(B, T, (NQ + 2 * NKV) * D), e(NQ + NKV, D), e(S, D), e(S, D), cache, pos, 1e-6, NQ, NKV)
        attn_kernels.decode_attention(e(N, NQ, D), cache, pos, NKV)
        h, hn, ids, wts = moe_kernels.router(x, e(N, H), norm, router_w, 1e-6, TOP_K, True)
        moe_kernels.experts(e(N, H), torch.zeros(N, TOP_K, dtype=ids.dtype), e(N, TOP_K, dtype=wts.dtype), e(N, H),
                            gate_up, down)
        del q, h, hn
    CASE[0] = "splits"
    os.environ["MTP_ATTN_SPLIT"] = "512"
    attn_kernels.decode_attention(e(1, NQ, D), e(2, 1, NKV, 4096, D), torch.zeros(1, 1, dtype=torch.long), NKV)
    del os.environ["MTP_ATTN_SPLIT"]
    for kind in ("small", "wide"):
        linear_kernels.CONFIG[kind] = dict(linear_kernels.CONFIG[kind], SPLIT_K=2)
    linear_kernels.linear(e(1, H), qkv_w, norm_w=norm, eps=1e-6)
    linear_kernels.linear(e(1, NQ * D), o_w)
    CASE[0] = "prefetch"  # profile_decode.py --pdl on: the linear kernel's first tile before its wait
    moe_kernels.PDL.update(enabled=True, prefetch=True)
    for kind in ("small", "wide"):
        linear_kernels.CONFIG[kind] = dict(linear_kernels.CONFIG[kind], SPLIT_K=1)
    linear_kernels.linear(e(1, H), qkv_w, norm_w=norm, eps=1e-6)
    CASE[0] = "training"
    loss_kernels.ce_chunk_pass(e(16, V), torch.zeros(16, dtype=torch.long))
    fast_moe.slot_sum(e(64 * TOP_K, H), torch.zeros(64 * TOP_K, dtype=torch.long),
                      torch.zeros(64 * TOP_K, dtype=torch.long), TOP_K)


def build(fn: JITFunction, args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    signature, constexprs = {}, {}
    for p in fn.params:
        v = bound.get(p.name, p.default)
        if p.is_constexpr or v is None:
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + DT[v.dtype]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name}={v!r} of an unexpected type")
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    built = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", 90, 64), options=options)
    return {"cubin": len(built.asm["cubin"]), "ptx": built.asm["ptx"]}


def main() -> int:
    launch_all()
    out = {}
    for case, fn, args, kwargs in LAUNCHES:
        label = f"{fn.__name__}[{case}]"
        while label in out:
            label += "'"
        try:
            out[label] = build(fn, args, kwargs)
        except Exception as err:  # reported per kernel; the test names it
            out[label] = {"error": f"{type(err).__name__}: {str(err)[-1500:]}"}
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
