"""scripts/acceptance_study.py end to end on a CPU (--smoke): a tiny demo target, regenerated data,
two heads, the evaluator and the n-gram baseline, and the results file the GPU run writes."""

import json
import subprocess
import sys

import pytest

from helpers import ROOT, load_script

MT_BENCH = ROOT / "data" / "mt_bench" / "question.jsonl"


@pytest.mark.slow
def test_acceptance_study_smoke(tmp_path):
    work = tmp_path / "study"
    cmd = [sys.executable, "scripts/acceptance_study.py", "--phase", "all", "--smoke", "--work", str(work)]
    if MT_BENCH.is_file():
        cmd += ["--mt-bench", str(MT_BENCH)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((work / "acceptance_study.json").read_text())

    prompt_sets = {"sharegpt_heldout"} | ({"mt_bench"} if MT_BENCH.is_file() else set())
    heads = ["k1-ce-last-regen", "k3-ce-last-orig"]
    # one row per drafter x head x prompt set x T x K, each with the fields the issue asks for
    keys = {(r["drafter"], r["head"], r["prompts"], r["temperature"], r["steps"]) for r in res["rows"]}
    expected = {(d, h, p, T, K) for d, h in [("ngram", None)] + [("mtp", h) for h in heads]
                for p in prompt_sets for T in (0.0, 1.0) for K in (1, 3)}
    assert keys == expected
    for r in res["rows"]:
        assert len(r["per_position_acceptance"]) == r["steps"]
        assert 1.0 <= r["acceptance_length"] <= r["steps"] + 1
        assert r["speedup"] is not None and r["speedup"] > 0
        assert r["lossless"] is (True if r["temperature"] == 0 else None)
        if r["drafter"] == "mtp":
            assert {"head_k", "head_loss", "head_init", "head_data", "head_train_steps"} <= set(r)
    assert res["demo_target"]["heldout_loss"] > 0 and res["demo_target"]["params"] > 0
    assert res["target_output_diversity"], "the target's own output diversity is reported"
    for name in heads:  # the training log's simulated acceptance next to the measured one
        g = res["simulated_vs_measured"][name]
        assert g["simulated"] is not None and g["measured"] is not None
    assert res["commands"] and "--smoke" in res["commands"][0]["command"]
    assert (work / "best_export" / "config.json").is_file()
    # a rerun of a finished phase does nothing and keeps the results
    again = subprocess.run([sys.executable, "scripts/acceptance_study.py", "--phase", "train", "--smoke", "--work", str(work)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "done" in again.stdout


def test_study_refuses_a_missing_mt_bench_file(tmp_path, capsys):
    acceptance_study = load_script("acceptance_study")

    with pytest.raises(SystemExit):
        acceptance_study.parse_args(["--phase", "eval", "--mt-bench", str(tmp_path / "nope.jsonl")])
    assert "no such file" in capsys.readouterr().err
    # the CPU smoke mode runs without MT-Bench (its rows are skipped, not faked)
    a = acceptance_study.parse_args(["--phase", "eval", "--smoke", "--mt-bench", str(tmp_path / "nope.jsonl")])
    assert a.mt_bench is None and a.data == "sharegpt-package"
