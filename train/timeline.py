"""Where a profiled step leaves the GPU idle, read from a torch.profiler chrome trace.

    prof.export_chrome_trace("step.json.gz")        # profile(activities=[CPU, CUDA], with_stack=True)
    tl = gpu_timeline(load_trace("step.json.gz"))
    print(format_timeline(tl))
    print(profile_gpu(step_fn, "name", trace_dir=None))   # all of it for one call of step_fn (CUDA)

A kernel table sums kernel times; it cannot show the time between kernels, when the GPU waits for
the host (a sync, a slow launch, Python in between). The timeline takes every GPU activity
(kernels, copies, memsets), merges overlapping ones, and reports:
  span_us / busy_us / idle_frac  first GPU activity to the last; time with at least one running;
  gaps    the longest idle stretches, each with the activity before and after it and the host
          frames that were launching the one after (the launch's enclosing CPU ops and Python
          frames, innermost last), which is where the host spent the gap;
  syncs   host calls that wait for the device (stream/device/event synchronize, a copy to the
          host), longest first, with their frames;
  copies  host-to-device and device-to-host copies: count, GPU time, and the frames of the largest.
A trace without CPU events still gives span, busy and gaps (no frames).
"""

from __future__ import annotations

import bisect
import gzip
import json
import shutil
import tempfile
from pathlib import Path

import torch

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cpu_op", "python_function", "user_annotation")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaMemcpyAsync",
                "cudaMemsetAsync", "cudaGraphLaunch", "cudaMemcpy")


def load_trace(path: str | Path) -> list[dict]:
    """The complete ("X") events of a chrome trace written by torch.profiler (.json or .json.gz)."""
    path = Path(path)
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]


def _short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


class _HostFrames:
    """The CPU ops and Python frames enclosing a host time point, per thread, outermost first."""

    def __init__(self, events: list[dict]):
        self.by_thread: dict[tuple, list[dict]] = {}
        for e in events:
            if e.get("cat") in HOST_CATS:
                self.by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
        for evs in self.by_thread.values():
            evs.sort(key=lambda e: e["ts"])
        self.starts = {k: [e["ts"] for e in v] for k, v in self.by_thread.items()}

    def at(self, thread: tuple, t: float, depth: int = 6) -> list[str]:
        evs = self.by_thread.get(thread, [])
        hi = bisect.bisect_right(self.starts.get(thread, []), t)
        enclosing = [e for e in evs[:hi] if e["ts"] + e["dur"] >= t]  # started before t, still running
        names = [e["name"] for e in sorted(enclosing, key=lambda e: (e["ts"], -e["dur"]))]
        # Python frames of this project and the innermost ops say the most; builtins and torch internals less
        keep = [n for n in names if not n.startswith(("<built-in", "torch/", "<frozen")) and "site-packages" not in n]
        return [_short(n) for n in keep[-depth:]]


def gpu_timeline(events: list[dict], top: int = 8, min_gap_us: float = 5.0) -> dict:
    """The timeline summary of one trace (module docstring); times in microseconds."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    if not gpu:
        return {"span_us": 0.0, "busy_us": 0.0, "idle_frac": 0.0, "gaps": [], "syncs": [], "copies": {}}
    host = _HostFrames(events)
    runtime = {}
    for e in events:
        if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {}):
            runtime[e["args"]["correlation"]] = e

    def launch_frames(gpu_event: dict) -> tuple[list[str], float | None]:
        call = runtime.get(gpu_event.get("args", {}).get("correlation"))
        if call is None:
            return [], None
        return host.at((call.get("pid"), call.get("tid")), call["ts"]), call["ts"]

    busy, gaps = 0.0, []
    run_start, run_end, last = gpu[0]["ts"], gpu[0]["ts"] + gpu[0]["dur"], gpu[0]
    for e in gpu[1:]:
        if e["ts"] > run_end:
            busy += run_end - run_start
            gaps.append((e["ts"] - run_end, run_end, last, e))
            run_start = e["ts"]
        if e["ts"] + e["dur"] >= run_end:
            run_end, last = e["ts"] + e["dur"], e
    busy += run_end - run_start
    span = run_end - gpu[0]["ts"]
    gap_rows = []
    for dur, start, before, after in sorted(gaps, key=lambda g: -g[0])[:top]:
        if dur < min_gap_us:
            break
        frames, launched = launch_frames(after)
        gap_rows.append({"us": round(dur, 1), "at_us": round(start - gpu[0]["ts"], 1), "before": _short(before["name"]),
                         "after": _short(after["name"]), "launch_lag_us": None if launched is None else
                         round(launched - start, 1), "host": frames})
    syncs = sorted((e for e in events if e.get("cat") == "cuda_runtime"
                    and (e["name"] in SYNC_CALLS or (e["name"] in ("cudaMemcpyAsync", "cudaMemcpy") and e["dur"] > 20))),
                   key=lambda e: -e["dur"])
    sync_rows = [{"call": e["name"], "us": round(e["dur"], 1), "host": host.at((e.get("pid"), e.get("tid")), e["ts"])}
                 for e in syncs[:top]]
    copies = {}
    for e in gpu:
        if e.get("cat") != "gpu_memcpy":
            continue
        kind = "HtoD" if "HtoD" in e["name"] else "DtoH" if "DtoH" in e["name"] else "DtoD" if "DtoD" in e["name"] else "other"
        c = copies.setdefault(kind, {"count": 0, "us": 0.0, "largest_us": 0.0, "host": []})
        c["count"] += 1
        c["us"] = round(c["us"] + e["dur"], 1)
        if e["dur"] > c["largest_us"]:
            c["largest_us"] = round(e["dur"], 1)
            c["host"] = launch_frames(e)[0]
    return {"span_us": round(span, 1), "busy_us": round(busy, 1), "idle_frac": round(1 - busy / span, 4) if span else 0.0,
            "gaps": gap_rows, "syncs": sync_rows, "copies": copies}


def format_timeline(tl: dict) -> str:
    """A few lines for a log: busy share, the longest gaps, syncs and copies, with their host frames."""
    lines = [f"GPU timeline: span {tl['span_us'] / 1e3:.2f} ms, busy {tl['busy_us'] / 1e3:.2f} ms, "
             f"idle {tl['idle_frac']:.1%}"]
    for g in tl["gaps"]:
        lag = "" if g["launch_lag_us"] is None else f", launched {g['launch_lag_us']:+.0f} us after it began"
        lines.append(f"  gap {g['us']:8.1f} us at +{g['at_us'] / 1e3:.2f} ms: {g['before']} -> {g['after']}{lag}")
        if g["host"]:
            lines.append("      host: " + " > ".join(g["host"]))
    for s in tl["syncs"]:
        lines.append(f"  sync {s['call']} {s['us']:.1f} us" + (": " + " > ".join(s["host"]) if s["host"] else ""))
    for kind, c in tl["copies"].items():
        lines.append(f"  copies {kind}: {c['count']}, {c['us']:.1f} us on the GPU, largest {c['largest_us']:.1f} us"
                     + (": " + " > ".join(c["host"]) if c["host"] else ""))
    return "\n".join(lines)


def profile_gpu(fn, name: str, warmup: int = 2, top: int = 25, trace_dir: str | Path | None = None) -> str:
    """Run `fn` `warmup` times, then once under torch.profiler (CPU, CUDA, Python frames): its CUDA
    kernels by self time, largest first (CPU ops on a machine without CUDA), and the timeline
    above; with `trace_dir`, the chrome trace stays as <trace_dir>/<name>.json.gz."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []), with_stack=True) as prof:
        fn()
        sync()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"  # kernels (ops), not the Python frames above them
    table = prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=70)
    folder = Path(trace_dir) if trace_dir else Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json.gz"
    try:
        prof.export_chrome_trace(str(path))
        return f"{table}\n{format_timeline(gpu_timeline(load_trace(path)))}"
    finally:
        if not trace_dir:
            shutil.rmtree(folder, ignore_errors=True)
