"""scripts/eval_acceptance.py end to end on a tiny target saved to disk (CPU), and its errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM

from model.configs import make_config
from model.head import MTPHead

from helpers import ROOT, load_script

eval_acceptance = load_script("eval_acceptance")

REPORT_FIELDS = {
    "acceptance_length", "per_position_acceptance", "per_position_acceptance_unconditional",
    "accept_histogram", "num_prompts", "generated_tokens", "verify_steps", "spec_tokens_per_s",
    "baseline_tokens_per_s", "speedup", "lossless", "steps", "temperature", "per_category", "per_prompt",
}
PROMPT_FIELDS = {"num_prompt_tokens", "output_token_ids", "verify_steps", "acceptance_length", "category"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_head(cfg, path: Path, seed=0):
    head = MTPHead(cfg)
    head.init_random(seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path / "head.safetensors"))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tok_mod = pytest.importorskip("data.tokenizer")
    tmp = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    cfg = make_config("tiny")  # the real vocabulary: prompts come from the real tokenizer
    Qwen3MoeForCausalLM(cfg).save_pretrained(tmp / "target")
    tok_mod.build_qwen3_tokenizer(tmp / "target")
    write_head(cfg, tmp / "ckpt")
    write_head(make_config("tiny", hidden_size=32), tmp / "bad-head")
    questions = ["Write a haiku about rain.", "What is 7 times 8?", "Name three rivers.", "Say hi."]
    with open(tmp / "prompts.jsonl", "w") as f:
        for i, q in enumerate(questions):
            f.write(json.dumps({"question_id": i + 1, "category": ["writing", "math"][i % 2], "turns": [q]}) + "\n")
    (tmp / "empty.jsonl").write_text("")
    return tmp


def cli(files, *extra, target=None, mtp=None):
    return ["--target", str(target or files / "target"), "--mtp", str(mtp or files / "ckpt"),
            "--prompts", str(files / "prompts.jsonl"), "--device", "cpu", "--max-new-tokens", "6",
            "--batch-size", "3", *extra]


def test_cli_writes_full_report(files):
    report, plot = files / "report.json", files / "plot.png"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_acceptance.py"),
                          *cli(files, "--steps", "2", "--report", str(report), "--plot", str(plot))],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "acceptance length" in res.stdout
    rep = json.loads(report.read_text())
    assert REPORT_FIELDS <= set(rep)
    assert rep["num_prompts"] == 4 and rep["steps"] == 2 and len(rep["accept_histogram"]) == 3
    assert len(rep["per_position_acceptance"]) == 2 and rep["lossless"] is True
    assert set(rep["per_category"]) == {"writing", "math"}
    assert all(PROMPT_FIELDS <= set(row) for row in rep["per_prompt"])
    assert all(len(row["output_token_ids"]) <= 6 for row in rep["per_prompt"])
    assert plot.stat().st_size > 0


@pytest.mark.parametrize("case, match", [
    ("k0", "--steps must be >= 1"),
    ("missing_target", "does not exist"),
    ("missing_head", "does not exist"),
    ("empty_prompts", "no usable prompts|empty|no rows"),
    ("mismatched_head", "head|hidden|shape"),
    ("max_len", "prompt 1 .*--max-len"),
    ("token_map_missing", "--token-map .*does not exist.*build_token_map"),
    ("token_map_ngram", "--token-map limits an MTP head"),
])
def test_cli_bad_input(files, case, match):
    args = {
        "k0": cli(files, "--steps", "0"),
        "missing_target": cli(files, target=files / "nope"),
        "missing_head": cli(files, mtp=files / "nope"),
        "empty_prompts": cli(files) + ["--prompts", str(files / "empty.jsonl")],
        "mismatched_head": cli(files, mtp=files / "bad-head"),
        "max_len": cli(files, "--max-len", "12"),
        "token_map_missing": cli(files, "--token-map", str(files / "nope.pt")),
        "token_map_ngram": cli(files, "--drafter", "ngram", "--token-map", str(files / "prompts.jsonl")),
    }[case]
    with pytest.raises(SystemExit) as exc:
        eval_acceptance.main(args)
    assert exc.value.code != 0

    assert re.search(match, str(exc.value.code), re.IGNORECASE), exc.value.code


def test_bench_decode_cpu_smoke(tmp_path):
    """scripts/bench_decode.py end to end on the tiny config (the GPU run uses the same code)."""
    bench_decode = load_script("bench_decode")
    out = tmp_path / "bench.json"
    rc = bench_decode.main(["--config", "tiny", "--device", "cpu", "--batch-sizes", "1,2", "--ks", "1,2",
                            "--ctx", "8", "--iters", "2", "--hf-tokens", "3", "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and not res["errors"], res["errors"]
    assert res["complete"] and "kernels check" in res["stages_done"]  # partial files say complete: false
    assert set(res["decode_tok_s"]) == {"1", "2"} and set(res["verify_step_ms"]) == {"K=1", "K=2"}
    assert set(res["hf_generate_tok_s"]) == {"1", "2"} and res["lossless_check"]["torch"]["mismatching_rows"] == 0
    assert res["kernels_check"]["torch"]["1"]["verify_vs_hf_rel_err"] < 1e-4
    for key in ("hf_static_compile_tok_s", "hbm_floor_ms", "gpu", "date", "torch", "transformers"):
        assert key in res
    assert "| batch |" in res["markdown"]
    # the speculative step with a 32,768-id draft vocabulary (the default --token-map-sizes)
    assert set(res["spec_step_ms_token_map"]["32768"]) == {"K=1", "K=2"}
    assert set(res["spec_step_ms_token_map"]["32768"]["K=2"]) == {"1", "2"} and "token map 32,768" in res["markdown"]


def test_hbm_floor_counts_the_kv_cache_each_row_reads():
    """The floor grows by the K and V bytes of every cached slot, layer and row (bf16)."""
    from model.configs import make_config
    from model.decode_bench import hbm_floor_ms

    cfg = make_config("qwen3-30b-a3b")
    kv_bytes = cfg.num_hidden_layers * 8 * 4000 * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    grown = hbm_floor_ms(cfg, 8, 1, 4.3, ctx=4000) - hbm_floor_ms(cfg, 8, 1, 4.3)
    assert grown == pytest.approx(kv_bytes / 4.3e12 * 1e3, rel=1e-9)
    assert hbm_floor_ms(cfg, 1, 1, 4.3, ctx=4096) == pytest.approx(1.415 + 0.094, abs=0.01)  # ms, batch 1


@pytest.mark.parametrize("sizes", ["abc", "0", "999999"])
def test_bench_decode_refuses_bad_token_map_sizes(sizes):
    bench_decode = load_script("bench_decode")
    with pytest.raises(SystemExit, match="--token-map-sizes"):
        bench_decode.main(["--config", "tiny", "--device", "cpu", "--token-map-sizes", sizes])


def test_profile_decode_cpu_smoke(tmp_path):
    """scripts/profile_decode.py runs on the tiny config and writes its per-(mode, batch) rows."""
    profile_decode = load_script("profile_decode")
    out = tmp_path / "profile.json"
    assert profile_decode.main(["--config", "tiny", "--device", "cpu", "--batch-sizes", "1", "--modes", "eager:torch:loop",
                                "--ctx", "8", "--iters", "2", "--profile-steps", "1", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    with pytest.raises(SystemExit, match="unknown"):
        profile_decode.main(["--config", "tiny", "--device", "cpu", "--tune-kernels", "gemm"])
    assert [(r["mode"], r["batch"]) for r in runs] == [("eager:torch:loop", 1)] and runs[0]["step_ms"] > 0


@pytest.mark.parametrize("pick", ["first", "sum"])
def test_profile_decode_tune_keeps_one_config_for_every_batch_size(pick, monkeypatch):
    """--tune-pick first keeps the fastest tile at the first batch size; sum keeps the one that is
    best over all of them. Timings are faked (the real ones need CUDA graphs): the first config is
    fastest at batch 1 and 3x slower at batch 2, the second nearly as fast at 1 and fastest at 2."""
    from model import moe_kernels

    profile_decode = load_script("profile_decode")
    model = profile_decode.build_target("tiny", "cpu", 0.02)
    n = len(model.model.layers)
    fake = {0: (1.0, 3.0), 1: (1.05, 1.0)}  # config index -> us at batch 1, 2 (the rest: 5 us)
    calls = []

    def graph_ms(fn):  # tune() times every config at batch 1 then batch 2
        i, b = divmod(len(calls), 2)
        calls.append(i)
        return fake.get(i, (5.0, 5.0))[b] * n / 1e3

    monkeypatch.setattr(profile_decode, "graph_ms", graph_ms)
    monkeypatch.setitem(moe_kernels.CONFIG, "down", dict(moe_kernels.CONFIG["down"]))
    res = profile_decode.tune(model, [1, 2], 8, ["down"], pick)
    grid = profile_decode.GRID["down"]
    assert len(calls) == 2 * len(grid)
    kept = grid[0] if pick == "first" else grid[1]
    assert moe_kernels.CONFIG["down"] == kept and res["2"]["down"]["kept"] == kept
    assert res["1"]["down"]["best"] == grid[0] and res["2"]["down"]["best"] == grid[1]
    assert res["2"]["down"]["kept_us"] == pytest.approx(3.0 if pick == "first" else 1.0)


def test_profile_decode_split_grid_is_the_config_in_use_then_the_splits(monkeypatch):
    """--tune-grid splits times the config in use first, then only the grid's split configs, and
    keeps a split config only when it is faster (timings faked: the third config is fastest)."""
    from model import linear_kernels

    profile_decode = load_script("profile_decode")
    model = profile_decode.build_target("tiny", "cpu", 0.02)
    monkeypatch.setitem(linear_kernels.CONFIG, "wide", dict(linear_kernels.CONFIG["wide"]))
    in_use = dict(linear_kernels.CONFIG["wide"])
    configs = profile_decode.tune_grid("wide", "splits")
    assert configs[0] == in_use and len(configs) > 1 and all(c["SPLIT_K"] > 1 for c in configs[1:])
    assert profile_decode.tune_grid("attention", "splits")[1:] and all(
        c["SPLIT_S"] > 0 for c in profile_decode.tune_grid("attention", "splits")[1:])
    calls = []

    def graph_ms(fn):
        calls.append(1)
        return 1.0 if len(calls) == 3 else 2.0

    monkeypatch.setattr(profile_decode, "graph_ms", graph_ms)
    seen = []  # main() writes --out after each kernel: a run cut short keeps what it timed
    res = profile_decode.tune(model, [1], 8, ["wide"], "first", grid="splits",
                              on_kernel=lambda out: seen.append(out["1"]["wide"]["kept"]))
    assert len(calls) == len(configs) and linear_kernels.CONFIG["wide"] == configs[2] and seen == [configs[2]]
    assert res["1"]["wide"]["was"] == in_use and len(res["1"]["wide"]["all"]) == len(configs)


def test_cli_sampling_from_generation_config_thinking_and_batch_sizes(files, tmp_path):
    """--sampling model takes the target's generation_config.json values (flags win), the report
    records the sampling, the rule and the thinking mode, per-prompt prompt ids are the served
    rendering, and --batch-sizes gives one row per batch size."""
    import shutil

    from data.tokenizer import load_tokenizer

    target = tmp_path / "target"
    shutil.copytree(files / "target", target)
    (target / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20}))
    report = tmp_path / "r.json"
    assert eval_acceptance.main(cli(files, "--steps", "2", "--sampling", "model", "--min-p", "0.01", "--thinking",
                                    "off", "--batch-sizes", "1,2", "--report", str(report), target=target)) == 0
    rep = json.loads(report.read_text())
    assert rep["sampling"] == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.01}
    assert rep["sampling_source"] == {"temperature": "generation_config.json", "top_p": "generation_config.json",
                                      "top_k": "generation_config.json", "min_p": "explicit"}
    assert rep["verify_rule"] == {"kind": "target_only", "threshold_single": 1.0, "threshold_acc": 1.0}
    assert rep["thinking"] is False and rep["lossless"] is None
    assert [r["batch_size"] for r in rep["by_batch_size"]] == [1, 2]
    assert all({"spec_tokens_per_s", "baseline_tokens_per_s", "speedup", "speculation_slower"} <= set(r)
               for r in rep["by_batch_size"])
    for key in ("acceptance_length", "acceptance_length_per_request_mean", "spec_accept_length_meta_mean"):
        assert rep[key] is not None and rep[key] >= 1.0
    tok = load_tokenizer(str(target))
    first = {"role": "user", "content": "Write a haiku about rain."}
    want = tok.apply_chat_template([first], tokenize=True, add_generation_prompt=True, enable_thinking=False)["input_ids"]
    assert next(p for p in rep["per_prompt"] if p["id"] == 1)["prompt_token_ids"] == want
    # an explicit temperature overrides the model's; p/q rejection sampling is recorded
    assert eval_acceptance.main(cli(files, "--steps", "2", "--sampling", "model", "--temperature", "1.0",
                                    "--rejection-sampling", "--report", str(report), target=target)) == 0
    rep = json.loads(report.read_text())
    assert rep["sampling"]["temperature"] == 1.0 and rep["sampling"]["top_k"] == 20
    assert rep["verify_rule"]["kind"] == "rejection" and rep["thinking"] is None
