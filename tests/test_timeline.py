"""train/timeline.py on synthetic chrome traces: busy time, idle gaps and the host frames behind them."""

import gzip
import json

import pytest

from train.timeline import format_timeline, gpu_timeline, load_trace


def X(name, cat, ts, dur, tid=1, **args):
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}


def trace():
    """Host: mtp_loss runs 0..400 us, an item() sync 100..290 inside it, then a launch at 300.
    GPU: k1 10..100, k2 (overlapping) 50..120, a 180 us gap, k3 300..350, a copy 360..370."""
    return [
        X("model/loss.py(301): mtp_loss", "python_function", 0, 400),
        X("aten::item", "cpu_op", 100, 190),
        X("cudaStreamSynchronize", "cuda_runtime", 110, 170),
        X("aten::mm", "cpu_op", 295, 10),
        X("cudaLaunchKernel", "cuda_runtime", 300, 4, correlation=3),
        X("aten::copy_", "cpu_op", 340, 30),
        X("cudaMemcpyAsync", "cuda_runtime", 345, 25, correlation=4),
        X("k1", "kernel", 10, 90, tid=7, correlation=1),
        X("k2", "kernel", 50, 70, tid=8, correlation=2),
        X("k3_gemm", "kernel", 300, 50, tid=7, correlation=3),
        X("Memcpy HtoD (Pageable -> Device)", "gpu_memcpy", 360, 10, tid=7, correlation=4),
        {"ph": "i", "name": "marker", "ts": 5},  # not a complete event: ignored
    ]


def test_busy_gaps_and_the_launch_frames_of_the_kernel_after_a_gap():
    tl = gpu_timeline(trace())
    assert tl["span_us"] == 360 and tl["busy_us"] == 110 + 50 + 10  # k1+k2 merged, k3, the copy
    assert tl["idle_frac"] == pytest.approx(1 - 170 / 360, abs=1e-4)
    first = tl["gaps"][0]
    assert first["us"] == 180 and first["before"] == "k2" and first["after"] == "k3_gemm"
    assert first["launch_lag_us"] == 180  # launched when the gap ended: the host was the hold-up
    assert first["host"] == ["model/loss.py(301): mtp_loss", "aten::mm"]
    assert [g["us"] for g in tl["gaps"]] == [180, 10]
    assert tl["syncs"][0]["call"] == "cudaStreamSynchronize" and tl["syncs"][0]["host"][-1] == "aten::item"
    assert tl["copies"]["HtoD"] == {"count": 1, "us": 10, "largest_us": 10,
                                    "host": ["model/loss.py(301): mtp_loss", "aten::copy_"]}
    text = format_timeline(tl)
    assert "idle 52.8%" in text and "k2 -> k3_gemm" in text and "host: model/loss.py(301): mtp_loss > aten::mm" in text


def test_a_trace_file_round_trips_and_a_cpu_only_trace_has_no_timeline(tmp_path):
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": trace()}, f)
    assert gpu_timeline(load_trace(path))["busy_us"] == 170
    cpu_only = [e for e in trace() if e.get("cat") in ("cpu_op", "python_function")]
    assert gpu_timeline(cpu_only) == {"span_us": 0.0, "busy_us": 0.0, "idle_frac": 0.0, "gaps": [], "syncs": [],
                                      "copies": {}}


def test_profile_gpu_runs_a_function_and_keeps_its_trace_when_asked(tmp_path):
    import torch

    from train.timeline import profile_gpu

    calls = []

    def step():
        calls.append(1)
        torch.ones(64, 64) @ torch.ones(64, 64)

    text = profile_gpu(step, "demo", warmup=1, trace_dir=tmp_path / "traces")
    assert len(calls) == 2 and "aten::mm" in text and "GPU timeline:" in text
    assert load_trace(tmp_path / "traces" / "demo.json.gz")  # a readable trace stays
    assert "GPU timeline:" in profile_gpu(step, "gone", warmup=0) and not list(tmp_path.glob("**/gone.json.gz"))
