"""The config tree: YAML + dotted overrides, errors that name the key, round trip."""

from pathlib import Path

import pytest
import yaml

from train.config import Config, config_from_dict, load_config, save_config, to_dict

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, Config)


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.max_steps=7", "head.loss=ce+kl", "data.limit=null",
                                                   "train.lr=1e-3", "eval.enabled=false"])
    assert cfg.train.max_steps == 7 and cfg.head.loss == "ce+kl" and cfg.data.limit is None
    assert cfg.train.lr == 1e-3 and cfg.eval.enabled is False


@pytest.mark.parametrize("override, key", [
    ("train.max_step=3", "train.max_step"),          # typo: unknown key
    ("trian.max_steps=3", "trian"),                   # unknown section
    ("train.max_steps=abc", "train.max_steps"),       # wrong type
    ("train.max_steps=0", "train.max_steps"),         # out of range
    ("head.loss=mse", "head.loss"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("data.max_length=2", "data.max_length"),
    ("log.backend=mlflow", "log.backend"),
    ("eval.steps=0", "eval.steps"),
    ("eval.top_p=0", "eval.top_p"),
    ("eval.top_k=0", "eval.top_k"),
    ("eval.min_p=1.5", "eval.min_p"),
    ("eval.sampling=server", "eval.sampling"),
    ("data.enable_thinking=maybe", "data.enable_thinking"),
    ("train.heldout_every=-1", "train.heldout_every"),
    ("train.profile_step=-1", "train.profile_step"),
    ("train.profile_step=100000", "train.profile_step"),  # past train.max_steps: it would never profile
    ("head.compile=maybe", "head.compile"),
    ("eval.token_map=/no/such/hot_vocab.pt", "eval.token_map"),  # a missing map, before training starts
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(ROOT / "configs/tiny.yaml", [override])


@pytest.mark.parametrize("overrides", [
    ["target.compile=true", "data.hidden_states=/tmp/dump", "eval.enabled=false"],  # offline: no layers to compile
    ["target.compile=true", "target.partition=zero3", "eval.enabled=false"],       # partitioned: not compiled
])
def test_target_compile_refused_where_it_cannot_apply(overrides):
    with pytest.raises(ValueError, match=r"target\.compile"):
        load_config(ROOT / "configs/tiny.yaml", overrides)
    assert load_config(ROOT / "configs/tiny.yaml", ["target.compile=true"]).target.compile is True


def test_override_needs_equals_sign():
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["train.max_steps"])


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/tiny.yaml", ["head.num_steps=3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert to_dict(again) == to_dict(cfg)


def test_eval_sampling_resolves_like_the_cli(tmp_path):
    """eval.sampling=model fills unset values from the target's generation_config.json."""
    import json

    from train.evaluate import eval_settings

    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20}))
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"target.path={tmp_path}", "eval.sampling=model", "eval.top_k=5",
                                                   "data.enable_thinking=false"])
    s = eval_settings(cfg)
    assert (s.sampling.temperature, s.sampling.top_p, s.sampling.top_k) == (0.6, 0.95, 5)
    assert s.verify.kind == "target_only" and s.thinking is False and s.token_map is None
    s = eval_settings(load_config(ROOT / "configs/tiny.yaml", [f"target.path={tmp_path}", "eval.rejection_sampling=true"]))
    assert s.sampling.greedy and s.verify.kind == "rejection"


def test_a_repetition_penalty_in_generation_config_is_named(tmp_path, caplog):
    """SGLang's --sampling-defaults model applies it; the evaluator does not, so it says so."""
    import json

    from model.acceptance import resolve_sampling

    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "repetition_penalty": 1.05}))
    with caplog.at_level("WARNING", logger="model.acceptance"):
        sp, _ = resolve_sampling({}, tmp_path, "model")
    assert sp.temperature == 0.7 and "repetition_penalty=1.05" in caplog.text
    caplog.clear()
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "repetition_penalty": 1.0}))
    with caplog.at_level("WARNING", logger="model.acceptance"):
        resolve_sampling({}, tmp_path, "model")
    assert "repetition_penalty" not in caplog.text


def test_every_key_is_classified_for_resume_exactly_once():
    from train.config import RESUME_FIXED, RESUME_SAFE, flat_dict

    keys = set(flat_dict(to_dict(Config())))
    assert not RESUME_FIXED & RESUME_SAFE, RESUME_FIXED & RESUME_SAFE
    assert RESUME_FIXED | RESUME_SAFE == keys, {"unclassified": keys - RESUME_FIXED - RESUME_SAFE,
                                                "unknown": (RESUME_FIXED | RESUME_SAFE) - keys}


def test_resume_conflicts_list_fixed_keys_only(tmp_path):
    from train.config import resume_conflicts

    (tmp_path / "chats.jsonl").write_text("")
    saved = to_dict(load_config(ROOT / "configs/tiny.yaml", [f"data.train={tmp_path / 'chats.jsonl'}"]))
    now = load_config(ROOT / "configs/tiny.yaml", [
        "train.lr=0.5", "train.max_steps=99", "log.backend=tensorboard", "train.output_dir=/x",
        f"data.train={tmp_path}/./chats.jsonl"])  # the same file, spelled differently
    assert resume_conflicts(saved, now) == [("train.lr", 2e-3, 0.5)]
    del saved["head"]["num_steps"]  # a key the checkpoint's config lacks counts as its default (1)
    assert ("head.num_steps", 1, 2) in resume_conflicts(saved, now)
