"""scripts/acceptance_study.py: the pieces on their own (plan order, loop-aware acceptance, the
projection, goals, sampling, steps from tokens) and the whole study end to end on a CPU (--smoke):
a tiny demo target, regenerated data, two heads with a training curve, the evaluator and the
n-gram baseline at greedy and recommended sampling, an FP8 copy of the target, and the results
file the GPU run writes."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import ROOT, load_script
from model.acceptance import VerifyRule
from train.study import DEFAULT_HEADS, eval_plan, row_key, study_samplings, train_plan
from train.config import load_config, save_config
from train.study_results import drafter_text, goals, head_info, loop_numbers, markdown, projection, top1_ceiling

MT_BENCH = ROOT / "data" / "mt_bench" / "question.jsonl"
STEP_TIMES = ROOT / "docs" / "results" / "eval_speed_persistent.json"


def row(drafter, head, prompts, sampling, K, al, **extra):
    return {"drafter": drafter, "head": head, "target": "bf16", "prompts": prompts, "sampling_name": sampling, "K": K,
            "acceptance_length": al, "loop_share": None, **extra}


def test_eval_plan_puts_the_goals_rows_first():
    plan = eval_plan([1, 2, 3], ["mt_bench", "sharegpt_heldout"], ["h1", "h3"])
    keys = [item if item == "fp8" else (item["prompts"], item["sampling_name"], item["K"], item["head"]) for item in plan]
    assert keys[:12] == [(p, s, K, h) for p, s, K in [("mt_bench", "greedy", 3), ("mt_bench", "greedy", 1),
                                                      ("mt_bench", "recommended", 3), ("mt_bench", "recommended", 1)]
                         for h in (None, "h1", "h3")]
    assert keys[12] == "fp8"  # the FP8 item after the MT-Bench rows of the goals' K, before the held-out set
    assert keys[13][:3] == ("sharegpt_heldout", "greedy", 3)
    assert all(k[2] == 2 for k in keys[-12:] if k != "fp8")  # K = 2 last
    rows = [i for i in plan if i != "fp8"]
    assert len(rows) == 3 * 2 * 2 * 3 and len({row_key(r) for r in rows}) == len(rows)
    assert all(r["drafter"] == ("ngram" if r["head"] is None else "mtp") and r["target"] == "bf16" for r in rows)
    # no MT-Bench file: no FP8 item (it runs on MT-Bench); no K = 3: neither
    assert "fp8" not in eval_plan([1, 3], ["sharegpt_heldout"], ["h1"]) and "fp8" not in eval_plan([1], ["mt_bench"], ["h1"])
    # with a token-map size: its item right after the FP8 item; without MT-Bench or heads, none
    mapped = eval_plan([1, 2, 3], ["mt_bench", "sharegpt_heldout"], ["h1", "h3"], token_map_size=32768)
    assert mapped[12:14] == ["fp8", "token_map"] and "token_map" not in plan
    assert "token_map" not in eval_plan([1, 3], ["sharegpt_heldout"], ["h1"], 32768) + eval_plan([1, 3], ["mt_bench"], [], 32768)


def test_loop_numbers_pool_the_non_looping_prompts():
    eos = [7]
    loop = [1, 2] * 20 + [7]  # ends in a loop once the EOS is stripped
    plain = list(range(100, 140)) + [7]
    short = [5, 6, 7]  # shorter than the loop window: never a loop
    per_prompt = [{"output_token_ids": loop, "accept_histogram": [0, 0, 0, 10]},
                  {"output_token_ids": plain, "accept_histogram": [4, 2, 0, 0]},
                  {"output_token_ids": short, "accept_histogram": [1, 0, 1, 0]}]
    got = loop_numbers(per_prompt, eos, greedy=True)
    assert got["loop_share"] == pytest.approx(1 / 3) and got["num_prompts_loop"] == 1 and got["num_prompts_nonloop"] == 2
    assert got["accept_histogram_nonloop"] == [5, 2, 1, 0]
    assert got["acceptance_length_nonloop"] == pytest.approx((5 * 1 + 2 * 2 + 1 * 3) / 8)
    assert got["acceptance_length_loop"] == pytest.approx(4.0)
    assert all(v is None for v in loop_numbers(per_prompt, eos, greedy=False).values())


def test_projection_combines_acceptance_with_the_measured_step_times(tmp_path):
    st = {"date": "2026-11-29T18:17:08", "gpu": "H200", "config": "qwen3-30b-a3b",
          "decode_tok_s": {"1": 300.0, "8": 900.0},
          "spec_step_ms": {"K=1": {"1": 3.5, "8": 9.0}, "K=3": {"1": 4.0, "8": 12.0}},
          "verify_step_ms": {"K=1": {"1": 3.2, "8": 8.5}, "K=3": {"1": 3.6, "8": 10.0}}}
    (tmp_path / "speed.json").write_text(json.dumps(st))
    rows = [row("mtp", "h3", "mt_bench", "greedy", 3, 3.2), row("ngram", None, "mt_bench", "greedy", 3, 2.0),
            row("mtp", "h3", "mt_bench", "recommended", 3, 2.4), row("mtp", "h3", "mt_bench", "greedy", 2, 2.9)]
    p = projection(rows, "h3", str(tmp_path / "speed.json"), [1, 8, 16])
    e = {(x["drafter"], x["sampling_name"], x["K"], x["batch"]): x for x in p["entries"]}
    # K=2 has no step time, K=1 no row, batch 16 no step time: only what was measured
    assert set(e) == {("mtp", "greedy", 3, 1), ("mtp", "greedy", 3, 8), ("ngram", "greedy", 3, 1),
                      ("ngram", "greedy", 3, 8), ("mtp", "recommended", 3, 1), ("mtp", "recommended", 3, 8)}
    assert e["mtp", "greedy", 3, 8]["projected_tok_s"] == pytest.approx(3.2 * 8 / 12.0 * 1000)
    assert e["mtp", "greedy", 3, 1]["projected_speedup"] == pytest.approx(3.2 / 4.0 * 1000 / 300.0)
    assert e["ngram", "greedy", 3, 1]["step_ms"] == 3.6  # n-gram: the verify step alone
    assert p["step_times"]["date"] == st["date"] and "command_note" in p["step_times"]
    assert any("random weights" in s for s in p["assumptions"]) and "projection" in p["label"]
    assert projection(rows, "h3", str(tmp_path / "none.json"), [1])["skipped"]

    demo = {"heldout_loss": 3.5}
    rows += [row("mtp", "h3", "mt_bench", "greedy", 1, 1.9), row("ngram", None, "mt_bench", "recommended", 3, 1.5),
             row("ngram", None, "mt_bench", "greedy", 1, 1.5, loop_share=0.25, num_prompts=80, max_new_tokens=256)]
    g = goals(rows, "h3", p, demo)
    # K=3 3.2 >= 3.0, K=1 1.9 >= 1.85, 2.4 / 1.5 >= 1.5x n-gram, 2.67x >= 1.8x; loops 25% > 20%; loss 3.5 <= 3.6
    assert [x["pass"] for x in g] == [True, True, True, True, False, True]
    assert [x["threshold"] for x in g] == [3.0, 1.85, 1.5, 1.8, 0.2, 3.6]
    assert g[2]["value"] == pytest.approx(1.6) and g[3]["value"] == pytest.approx(3.2 / 4.0 * 1000 / 300.0)
    assert all({"value", "op", "threshold", "source"} <= set(x) for x in g)
    assert goals([], None, projection([], None, str(tmp_path / "none.json"), [1]), {})[0]["pass"] is None

    # the best head with a token map: projected with the step times measured with a map that size
    st["spec_step_ms_token_map"] = {"32768": {"K=3": {"1": 3.5, "8": 11.0}}}
    (tmp_path / "speed.json").write_text(json.dumps(st))
    rows += [row("mtp", "h3@token-map-32768", "mt_bench", "greedy", 3, 3.1, token_map_size=32768),
             row("mtp", "h3@token-map-32768", "mt_bench", "greedy", 1, 1.8, token_map_size=32768)]
    p = projection(rows, "h3", str(tmp_path / "speed.json"), [1, 8])
    mapped = [x for x in p["entries"] if x["token_map"]]
    assert {(x["head"], x["K"], x["batch"]) for x in mapped} == {("h3@token-map-32768", 3, 1), ("h3@token-map-32768", 3, 8)}
    m1 = next(x for x in mapped if x["batch"] == 1)
    assert m1["step_ms"] == 3.5 and m1["projected_speedup"] == pytest.approx(3.1 / 3.5 * 1000 / 300.0)
    g = goals(rows, "h3", p, demo)
    assert g[3]["value"] == pytest.approx(3.2 / 4.0 * 1000 / 300.0)  # the goal itself: the whole vocabulary
    assert "32,768-id token map" in g[4]["goal"] and g[4]["value"] == pytest.approx(m1["projected_speedup"])
    assert len(g) == 7 and g[4]["threshold"] == 1.8
    st.pop("spec_step_ms_token_map")  # a step-times file from before token maps: no mapped entries
    (tmp_path / "speed.json").write_text(json.dumps(st))
    assert not any(x["token_map"] for x in projection(rows, "h3", str(tmp_path / "speed.json"), [1])["entries"])


def test_top1_ceiling_estimates_the_best_any_top1_drafter_reaches(tmp_path):
    """1 + sum_k prod_{j<=k} m_j over a T > 0 row's top-token acceptance m: per row in the markdown,
    and over n-gram's acceptance length beside goal 3 (also for a results file written before it)."""
    def rec(drafter, head, K, al, mode):
        return {**row(drafter, head, "mt_bench", "recommended", K, al, per_position_mode_acceptance=mode,
                      per_position_acceptance=[0.3] * K, speedup=0.6, lossless=None),
                "sampling": {"temperature": 0.7, "top_p": 0.8, "top_k": 20}}

    assert top1_ceiling(rec("mtp", "h3", 2, 1.3, [0.5, 0.4])) == pytest.approx(1 + 0.5 + 0.5 * 0.4)
    assert top1_ceiling(rec("mtp", "h3", 3, 1.3, [0.5, 0.4, 0.5])) == pytest.approx(1.8)
    assert top1_ceiling(row("mtp", "h3", "mt_bench", "greedy", 3, 2.4, per_position_mode_acceptance=None)) is None
    assert top1_ceiling(row("mtp", "h3", "mt_bench", "recommended", 3, 1.3)) is None  # written before it existed
    assert top1_ceiling(rec("mtp", "h3", 3, 1.3, [])) is None
    assert top1_ceiling(rec("mtp", "h3", 3, 1.0, [0.5, None, None])) is None  # positions never reached

    greedy = {**row("mtp", "h3", "mt_bench", "greedy", 3, 2.4), "per_position_acceptance": [0.7, 0.6, 0.5],
              "per_position_mode_acceptance": None, "sampling": {"temperature": 0}, "speedup": 1.1, "lossless": True}
    rows = [greedy, rec("mtp", "h3", 3, 1.5, [0.5, 0.4, 0.5]), rec("ngram", None, 3, 1.2, [0.3, 0.2, 0.4])]
    g = goals(rows, "h3", projection(rows, "h3", str(tmp_path / "none.json"), [1]), {})
    assert g[2]["value"] == pytest.approx(1.25) and g[2]["ceiling"] == pytest.approx(1.8 / 1.2)
    assert "top-1 drafter" in g[2]["ceiling_note"] and "estimate" in g[2]["ceiling_note"]
    assert all("ceiling" not in x for i, x in enumerate(g) if i != 2)

    res = {"complete": True, "demo_target": dict.fromkeys(("params", "params_embedding_and_head", "tokens_trained",
                                                           "train_seconds", "heldout_loss")),
           "target_output_diversity": {}, "heads": {}, "curve": {"png": None}, "rows": rows, "fp8": None,
           "projection": {"skipped": "no step times"}, "simulated_vs_measured": {}, "goals": g, "best_head": "h3"}
    md = markdown(res)
    assert "(top token 0.50 / 0.40 / 0.50; ceiling ~1.80)" in md and "(top token 0.30 / 0.20 / 0.40; ceiling ~1.38)" in md
    assert "0.70 / 0.60 / 0.50 |" in md  # greedy: no top token, no ceiling
    assert "| 1.250 (top-1 ceiling (est.) 1.500) | >= 1.5 |" in md and g[2]["ceiling_note"] in md
    # a file written before goal 3 carried the ceiling: the markdown works it out from the rows
    old = {**res, "goals": [{k: v for k, v in x.items() if k not in ("ceiling", "ceiling_note")} for x in g]}
    assert markdown(old) == md


def test_recommended_sampling_is_the_targets_or_qwen3s(tmp_path):
    rec, source = study_samplings(tmp_path)["recommended"]  # no generation_config.json
    assert (rec.temperature, rec.top_p, rec.top_k) == (0.7, 0.8, 20) and source["from"].startswith("fallback")
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                                                 "do_sample": True}))
    got = study_samplings(tmp_path)
    rec, source = got["recommended"]
    assert (rec.temperature, rec.top_p, rec.top_k) == (0.6, 0.95, 20) and source["from"] == "generation_config.json"
    assert got["greedy"][0].greedy


def test_train_plan_turns_tokens_into_steps(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "data.json").write_text(json.dumps({"mean_length": {"regen": 700.0, "orig": 650.0}}))
    a = SimpleNamespace(train_tokens=25_000_000, train_batch_size=32, curve_points=10)
    plan = train_plan(a, tmp_path, "k3-ce-random-regen")
    assert plan["max_steps"] == math.ceil(25e6 / (32 * 700)) == 1117
    assert plan["heldout_every"] == 112 and plan["max_steps"] // plan["heldout_every"] <= 10
    assert plan["planned_tokens"] == round(1117 * 32 * 700) >= 25_000_000
    assert train_plan(a, tmp_path, "k3-ce-last-orig")["mean_length"] == 650.0


def test_a_mix_head_needs_the_sampled_passes(tmp_path, capsys):
    """The *-mix heads train on greedy + sampled answers: asked for without them, the study says
    which flag makes them, before anything runs (phase all) or before training starts."""
    from train.study import phase_train

    script = load_script("acceptance_study")
    with pytest.raises(SystemExit):
        script.parse_args(["--phase", "all", "--heads", "k3-ce-random-mix"])
    assert "add --sampled-passes 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--phase", "data", "--sampled-passes", "-1"])
    assert "--sampled-passes must be >= 0" in capsys.readouterr().err
    a = script.parse_args(["--phase", "all", "--heads", "k3-ce-random-mix", "--sampled-passes", "1", "--work", str(tmp_path)])
    assert a.sampled_passes == 1
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "data.json").write_text(json.dumps({"holdout": 5, "mean_length": {"regen": 700.0, "orig": 650.0}}))
    with pytest.raises(SystemExit, match="run --phase data --sampled-passes 1"):
        phase_train(a, tmp_path)
    assert not list((tmp_path / "heads").iterdir())  # no head started
    (tmp_path / "data" / "data.json").write_text(json.dumps({"mean_length": {"regen": 700.0, "mix": 520.0}}))
    plan = train_plan(a, tmp_path, "k3-ce-random-mix")
    assert plan["mean_length"] == 520.0
    # checkpoints of a run on the one-pass mix, then a second pass changed the mix: stop up front
    (tmp_path / "heads" / "k3-ce-random-mix" / "checkpoint-40").mkdir(parents=True)
    (tmp_path / "heads" / "k3-ce-random-mix.plan.json").write_text(json.dumps(dict(plan, mean_length=480.0, max_steps=9)))
    with pytest.raises(SystemExit, match=r"k3-ce-random-mix has checkpoints .*mean_length 480.0 -> 520.0.*Remove"):
        phase_train(a, tmp_path)
    assert [p.name for p in (tmp_path / "heads").iterdir() if p.suffix == ".log"] == []  # nothing launched


def test_a_head_stopped_by_the_budget_reports_its_checkpoint(tmp_path):
    """head_info reads what ran: the run's config.yaml, the newest checkpoint's state (no final/),
    the plan file and the held-out records of metrics.jsonl."""
    run = tmp_path / "heads" / "k3-ce-random-regen"
    for step in (4, 12):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(
            json.dumps({"step": step, "tokens_seen": 1000 * step, "train_seconds": 2.0 * step}))
    cfg = load_config(ROOT / "configs/tiny.yaml", ["head.num_steps=3", "head.init=random", "train.max_steps=20",
                                                   "train.heldout_every=4", f"data.train={tmp_path}/train_regen.jsonl"])
    save_config(cfg, run / "config.yaml")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 4, "loss": 1.0}, {"kind": "heldout", "step": 4, "tokens_seen": 4000, "heldout_loss": 2.0,
                                   "heldout_acc": [0.5, 0.4, 0.3], "heldout_simulated_acceptance_length": 1.76}]))
    (tmp_path / "heads" / "k3-ce-random-regen.plan.json").write_text(json.dumps(
        {"train_tokens": 25000, "mean_length": 600.0, "planned_tokens": 26400}))
    h = head_info(tmp_path, "k3-ce-random-regen")
    assert not h["finished"] and (h["steps"], h["max_steps"], h["tokens_seen"]) == (12, 20, 12000)
    assert (h["k"], h["init"], h["data"], h["heldout_every"]) == (3, "random", "regen", 4)
    assert h["planned_tokens"] == 26400 and h["train_tokens_requested"] == 25000
    assert [p["step"] for p in h["curve"]] == [4] and h["curve"][0]["tokens_seen"] == 4000
    assert h["heldout_simulated_acceptance_length"] is None  # no final held-out pass
    assert "stopped at step 12/20" in drafter_text({"drafter": "mtp", "head": "k3-ce-random-regen"},
                                                   {"k3-ce-random-regen": h})


@pytest.mark.slow
def test_acceptance_study_smoke(tmp_path):
    work = tmp_path / "study"
    cmd = [sys.executable, "scripts/acceptance_study.py", "--phase", "all", "--smoke", "--work", str(work),
           "--mt-bench", str(MT_BENCH), "--sampled-passes", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for phase in ("target", "data", "train", "eval"):
        assert f"phase {phase}: " in proc.stdout  # each phase's wall time is printed
    res = json.loads((work / "acceptance_study.json").read_text())
    heads = list(DEFAULT_HEADS)
    assert res["complete"] and res["rows_done"] == res["rows_planned"] == 3 * 2 * 2 * 2 + 2 + 4

    # rows: drafter x head x prompt set x sampling x K on the target, each saying how it ran
    keys = {(r["drafter"], r["head"], r["prompts"], r["sampling_name"], r["K"]) for r in res["rows"]
            if r["target"] == "bf16" and not r.get("token_map_size")}
    assert keys == {(d, h, p, s, K) for d, h in [("ngram", None)] + [("mtp", h) for h in heads]
                    for p in ("mt_bench", "sharegpt_heldout") for s in ("greedy", "recommended") for K in (1, 3)}
    for r in res["rows"]:
        greedy = r["sampling_name"] == "greedy"
        assert set(r["sampling"]) == {"temperature", "top_p", "top_k", "min_p"} and r["thinking"] is False
        assert r["verify_rule"] == ({"kind": "greedy"} if greedy else VerifyRule().as_dict())
        assert (r["sampling"]["temperature"] == 0) is greedy and r["temperature"] == r["sampling"]["temperature"]
        assert r["sampling_source"]["from"]
        assert len(r["per_position_acceptance"]) == r["K"] and 1.0 <= r["acceptance_length"] <= r["K"] + 1
        mode = r["per_position_mode_acceptance"]  # the target's top token at the same positions (T > 0)
        assert mode is None if greedy else (len(mode) == r["K"] and 0 < mode[0] <= 1)
        assert r["speedup"] > 0 and r["lossless"] is (True if greedy else None)
        assert r["max_new_tokens"] == 40 and r["batch_size"] >= 1 and r["seconds"] > 0
        if greedy:  # loop-aware numbers
            assert r["num_prompts_loop"] + r["num_prompts_nonloop"] == r["num_prompts"]
            assert r["loop_share"] == pytest.approx(r["num_prompts_loop"] / r["num_prompts"])
            if r["num_prompts_nonloop"]:
                h = r["accept_histogram_nonloop"]
                assert r["acceptance_length_nonloop"] == pytest.approx(sum((n + 1) * c for n, c in enumerate(h)) / sum(h))
        else:
            assert r["loop_share"] is None and r["acceptance_length_nonloop"] is None
    rec = res["settings"]["eval"]["samplings"]["recommended"]
    assert rec["params"]["temperature"] > 0 and rec["source"]["from"]
    assert res["settings"]["eval"]["thinking"] == ["False"] and res["settings"]["eval"]["K"] == [1, 3]

    # data: the mean training-row length that turned --train-tokens into steps
    data = res["settings"]["data"]
    assert data["mean_length"]["regen"] > 0 and data["holdout"] >= 1 and data["regeneration"]["thinking"] is False
    # the mix data: the held-out rows first, the greedy answers, then one sampled pass at the recommended sampling
    assert data["sampled_passes"] == 1 and data["train_sampled"] >= 1
    how = data["sampled_regeneration"]["settings"][0]
    assert how["sampling"] == rec["params"] and how["seed"] == 1 and how["data"] == data["regeneration"]["data"]
    D = work / "data"
    mix = [json.loads(line) for line in (D / "train_mix.jsonl").read_text().splitlines()]
    greedy = [json.loads(line) for line in (D / "train_regen.jsonl").read_text().splitlines()]
    assert mix[: len(greedy)] == greedy and len(mix) == len(greedy) + data["train_sampled"]
    assert mix[len(greedy):] != greedy[data["holdout"]:][: len(mix) - len(greedy)]  # sampled, not greedy again
    assert data["training_rows"]["mix"] == data["training_rows"]["regen"] + data["train_sampled"]
    for name in heads:
        h = res["heads"][name]
        assert h["finished"] and h["init"] == "random" and h["data"] == "regen" and h["k"] == int(name[1])
        assert h["max_steps"] == math.ceil(1500 / (2 * data["mean_length"]["regen"])) == h["steps"]
        assert h["train_tokens_requested"] == 1500 and h["planned_tokens"] >= 1500
        assert 0.3 < h["tokens_seen"] / h["planned_tokens"] < 3
        every = h["heldout_every"]
        assert every == max(1, math.ceil(h["max_steps"] / 3))
        steps = [p["step"] for p in h["curve"]]
        assert steps == [s for s in range(every, h["max_steps"], every)] + [h["max_steps"]]
        assert all(p["tokens_seen"] > 0 and p["heldout_simulated_acceptance_length"] >= 1 for p in h["curve"])
        assert res["curve"]["points"][name] == h["curve"]
        g = res["simulated_vs_measured"][name]
        assert g["simulated"] is not None and g["measured"] is not None
    assert (work / "acceptance_study_curve.png").stat().st_size > 1000 and res["curve"]["png"]

    # FP8: the best head on a block-FP8 copy of the target, as a bf16 and as an FP8 draft
    best = res["best_head"]
    assert best in heads and (work / "best_export" / "config.json").is_file()
    fp8 = res["fp8"]
    assert fp8["best_head"] == best and fp8["block"] == [128, 128]
    assert all(v is not None for v in fp8["acceptance_length"].values()) and len(fp8["acceptance_length"]) == 3
    assert "quantization_config" in json.loads((work / "fp8" / "target" / "config.json").read_text())
    assert "quantization_config" in json.loads((work / "fp8" / "draft-fp8" / "config.json").read_text())
    assert "quantization_config" not in json.loads((work / "fp8" / "draft-bf16" / "config.json").read_text())
    fp8_rows = [r for r in res["rows"] if r["target"] == "fp8"]
    assert {r["head"] for r in fp8_rows} == {f"{best}@fp8-target/bf16-draft", f"{best}@fp8-target/fp8-draft"}
    assert all(r["lossless"] is True and r["K"] == 3 for r in fp8_rows)

    # token map: the best head drafting among the 32,768 most frequent tokens of its training answers
    mapped = [r for r in res["rows"] if r.get("token_map_size")]
    assert {(r["head"], r["sampling_name"], r["K"]) for r in mapped} == {
        (f"{best}@token-map-32768", s, K) for s in ("greedy", "recommended") for K in (1, 3)}
    assert all(r["token_map"]["size"] == 32768 and r["lossless"] is (True if r["sampling_name"] == "greedy" else None)
               for r in mapped)
    tm = res["token_map"]
    assert tm["size"] == 32768 and 0.9 < tm["coverage"] <= 1.0 and tm["head"] == best and Path(tm["path"]).is_file()
    assert "Token map:" in (work / "acceptance_study.md").read_text()

    # projection at the real shape, from the shipped bench_decode.py results
    proj = res["projection"]
    st = json.loads(STEP_TIMES.read_text())
    assert proj["step_times"]["date"] == st["date"] and proj["assumptions"]
    got = {(e["drafter"], e["sampling_name"], e["K"], e["batch"]) for e in proj["entries"]}
    assert got == {(d, s, K, B) for d in ("mtp", "ngram") for s in ("greedy", "recommended") for K in (1, 3)
                   for B in (1, 8, 16)}
    e = next(e for e in proj["entries"] if (e["drafter"], e["sampling_name"], e["K"], e["batch"]) == ("mtp", "greedy", 3, 1))
    assert e["projected_speedup"] == pytest.approx(e["acceptance_length"] / st["spec_step_ms"]["K=3"]["1"] * 1000
                                                   / st["decode_tok_s"]["1"])

    # goals: every one with a value, a threshold and a verdict
    assert len(res["goals"]) == 6 and all(g["value"] is not None and isinstance(g["pass"], bool) for g in res["goals"])
    assert res["demo_target"]["heldout_loss"] > 0 and res["demo_target"]["params"] > 0
    assert res["target_output_diversity"] and res["phase_seconds"]
    # every phase that ran is timed, the eval that wrote the file too (its line in
    # phase_times.jsonl comes only after the file is written)
    assert [p["phase"] for p in res["phase_seconds"]] == ["target", "data", "train", "eval"]
    assert res["phase_seconds"][-1]["until"] == "results written" and res["phase_seconds"][-1]["seconds"] > 0
    assert res["phase_seconds"][-1]["command"] == res["commands"][-1]["command"]
    assert res["commands"] and "--smoke" in res["commands"][0]["command"]
    md = (work / "acceptance_study.md").read_text()
    assert md == markdown(res) and "non-looping" in md and "Projection" in md and "| goal |" in md
    assert f"`mix` adds {data['train_sampled']:,} sampled answers (1 pass at T 0.7" in md

    # a rerun of a finished phase does nothing and keeps the results
    n_rows = len((work / "eval" / "rows.jsonl").read_text().splitlines())
    for phase, says in (("data", "exists"), ("train", "done"), ("eval", "wrote")):
        again = subprocess.run([sys.executable, "scripts/acceptance_study.py", "--phase", phase, "--smoke", "--work",
                                str(work), "--mt-bench", str(MT_BENCH)], cwd=ROOT, capture_output=True, text=True,
                               timeout=900)
        assert again.returncode == 0 and says in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
        lines = again.stdout.splitlines()
        assert not any(line.startswith(("+ ", "eval: ngram", "eval: mtp")) for line in lines)  # nothing ran
    assert len((work / "eval" / "rows.jsonl").read_text().splitlines()) == n_rows
    # more sampled passes: only the missing one runs; the greedy and first sampled answers stay
    kept = {n: (D / n).stat().st_mtime_ns for n in ("regen_train.jsonl", "regen_train_sampled1.jsonl")}
    more = subprocess.run([sys.executable, "scripts/acceptance_study.py", "--phase", "data", "--smoke", "--work", str(work),
                           "--sampled-passes", "2"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert more.returncode == 0 and "has 1 sampled passes; adding 1" in more.stdout, more.stdout[-2000:] + more.stderr[-2000:]
    assert [line for line in more.stdout.splitlines() if line.startswith("+ ")] == [
        next(line for line in more.stdout.splitlines() if "regen_train_sampled2.jsonl" in line and line.startswith("+ "))]
    assert kept == {n: (D / n).stat().st_mtime_ns for n in kept} and "--seed 2" in more.stdout
    assert json.loads((D / "data.json").read_text())["sampled_passes"] == 2
    assert json.loads((work / "acceptance_study.json").read_text())["rows"] == res["rows"]
    again = subprocess.run([sys.executable, "scripts/acceptance_study.py", "--phase", "markdown", "--results",
                            str(work / "acceptance_study.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout == md
    # a copy of the results (with its plot beside it) names its own plot, not the work dir's
    copy = tmp_path / "copied"
    copy.mkdir()
    shutil.copy(work / "acceptance_study.json", copy / "study.json")
    shutil.copy(work / "acceptance_study_curve.png", copy / "study_curve.png")
    moved = subprocess.run([sys.executable, "scripts/acceptance_study.py", "--phase", "markdown", "--results",
                            str(copy / "study.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert moved.returncode == 0 and f"plot: `{copy / 'study_curve.png'}`" in moved.stdout
    assert moved.stdout.replace(str(copy / "study_curve.png"), str(work / "acceptance_study_curve.png")) == md

    # a spent budget leaves the last (least important) rows missing, and says so; a rerun adds them,
    # and redoes a row whose head was evaluated from other weights (a checkpoint, before training went on)
    rows_file = work / "eval" / "rows.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert all(r["prompts"] == "sharegpt_heldout" and r["sampling_name"] == "recommended" for r in rows[-2:])
    assert all(r["weights"] == (None if r["drafter"] == "ngram" else str(work / "heads" / r["head"].split("@")[0] / "final"))
               for r in rows)
    stale = next(r for r in rows if r["drafter"] == "mtp")
    stale["weights"] = str(work / "heads" / stale["head"] / "checkpoint-4")
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:-2]))
    eval_cmd = [sys.executable, "scripts/acceptance_study.py", "--phase", "eval", "--smoke", "--work", str(work),
                "--mt-bench", str(MT_BENCH)]
    subprocess.run(eval_cmd + ["--eval-budget-s", "0"], cwd=ROOT, check=True, capture_output=True, timeout=900)
    part = json.loads((work / "acceptance_study.json").read_text())
    assert not part["complete"] and part["rows_done"] == n_rows - 2 and "Incomplete" in markdown(part)
    again = subprocess.run(eval_cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=900)
    redone = [line for line in again.stdout.splitlines() if line.startswith(("eval: ngram", "eval: mtp"))]
    assert len(redone) == 3 and stale["head"] in redone[0], redone
    full = json.loads((work / "acceptance_study.json").read_text())
    assert full["complete"] and {row_key(r) for r in full["rows"]} == {row_key(r) for r in res["rows"]}
    assert all(r["weights"] != stale["weights"] for r in full["rows"])


def test_study_refuses_a_missing_mt_bench_file(tmp_path, capsys):
    acceptance_study = load_script("acceptance_study")

    with pytest.raises(SystemExit):
        acceptance_study.parse_args(["--phase", "eval", "--mt-bench", str(tmp_path / "nope.jsonl")])
    assert "no such file" in capsys.readouterr().err
    # the CPU smoke mode runs without MT-Bench (its rows are skipped, not faked)
    a = acceptance_study.parse_args(["--phase", "eval", "--smoke", "--mt-bench", str(tmp_path / "nope.jsonl")])
    assert a.mt_bench is None and a.data == "sharegpt-package"
    a = acceptance_study.parse_args(["--phase", "eval"])
    assert a.heads == DEFAULT_HEADS and a.train_tokens == 25_000_000 and a.eval_batch_size == 16
    assert a.mt_bench == "data/mt_bench/question.jsonl" and a.step_times == "docs/results/eval_speed_persistent.json"
    assert (ROOT / a.step_times).is_file() and a.num_train is None  # None: every training chat
    for flag in ("--num-train", "--regen-batch-size"):
        with pytest.raises(SystemExit):
            acceptance_study.parse_args(["--phase", "data", flag, "0"])
        assert f"{flag} must be >= 1" in capsys.readouterr().err
    assert a.token_map_size == 32768 and acceptance_study.parse_args(["--phase", "eval", "--token-map-size", "0"])
    with pytest.raises(SystemExit):
        acceptance_study.parse_args(["--phase", "eval", "--token-map-size", "-1"])
    assert "--token-map-size must be >= 0" in capsys.readouterr().err


def test_train_overrides_reach_every_head_but_not_the_studys_own_keys(tmp_path):
    from train.study import STUDY_KEYS, train_command

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "data.json").write_text(json.dumps({"holdout": 5, "mean_length": {"regen": 700.0}}))
    script = load_script("acceptance_study")
    a = script.parse_args(["--phase", "train", "--work", str(tmp_path), "--train-overrides", "head.compile=true"])
    plan = train_plan(a, tmp_path, "k1-ce-random-regen")
    cmd = train_command(a, tmp_path, "k1-ce-random-regen", 29600, plan)
    assert cmd[-1] == "head.compile=true"
    study_keys = {c.split("=", 1)[0] for c in cmd[cmd.index("configs/gpu_small.yaml") + 2: -1]}
    assert study_keys == set(STUDY_KEYS)  # the refused keys are exactly the ones the study sets
    for bad in (["train.max_steps=3"], ["head.bogus=1"], ["nokey"]):
        with pytest.raises(SystemExit):
            script.parse_args(["--phase", "train", "--train-overrides", *bad])
