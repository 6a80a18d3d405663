"""The shape of the code base, checked: no import circles, model/ free of distributed code,
thin scripts, files of one job. See docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import ROOT

PACKAGES = ("model", "data", "train")
MAX_LINES = 600  # beyond this a file must say in its docstring why it is one job


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            name = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            found[name] = path
    return found


def imported_names(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in a file, at any depth (function-level imports too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, [a.name for a in node.names]))
    return out


def project_edges() -> dict[str, set[str]]:
    """module -> the project modules it imports (`from model import x` counts as model.x)."""
    mods = modules()
    edges = {}
    for name, path in mods.items():
        deps = set()
        for module, names in imported_names(path):
            for cand in [module] + [f"{module}.{n}" for n in names]:
                if cand in mods and cand != name:
                    deps.add(cand)
        edges[name] = deps
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle_in_the_packages():
    edges = project_edges()
    assert len(edges) > 30  # the walk saw the packages
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_model_knows_nothing_of_accelerate_or_deepspeed():
    for name, path in modules().items():
        if not name.startswith("model"):
            continue
        for module, _ in imported_names(path):
            assert not module.startswith(("accelerate", "deepspeed", "torch.distributed", "train")), (name, module)


@pytest.mark.parametrize("path", sorted((ROOT / "scripts").glob("*.py")), ids=lambda p: p.name)
def test_scripts_are_thin(path):
    """A script parses arguments and calls the packages: it imports no other script, no private
    name, and does not edit sys.path."""
    scripts = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    text = path.read_text(encoding="utf-8")
    assert "sys.path" not in text, f"{path.name} edits sys.path; install the project (pip install -e .)"
    for module, names in imported_names(path):
        assert module.split(".")[0] not in scripts | {"scripts"}, f"{path.name} imports the script {module}"
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{path.name} imports private names {private} from {module}"


def test_files_hold_one_job():
    """No file outside tests is over MAX_LINES lines unless its docstring says why."""
    for path in list(modules().values()) + sorted((ROOT / "scripts").glob("*.py")):
        lines = path.read_text(encoding="utf-8").count("\n")
        if lines > MAX_LINES:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            assert "one job" in doc, f"{path.relative_to(ROOT)} has {lines} lines; split it or say why it is one job"


def test_the_three_targets_provide_the_target_protocol(tiny_model, tiny_target_dir):
    """FrozenTarget, SharedTarget and PartitionedTarget are interchangeable for training."""
    from model.shared_weights import load_shared_weights
    from model.target import FrozenTarget, Target
    from train.partition import PartitionedTarget

    _, model, _ = tiny_model
    assert isinstance(FrozenTarget(model), Target)
    assert isinstance(load_shared_weights(tiny_target_dir, last_layer=True), Target)
    members = [m for m in dir(Target) if not m.startswith("_")]
    assert {"embed_tokens", "lm_head", "last_layer", "device", "hidden"} <= set(members)
    # PartitionedTarget needs a DeepSpeed engine to build: its class defines the computed members
    # (config, embed_tokens and lm_head are set in __init__, tests/test_partition.py runs it)
    assert all(hasattr(PartitionedTarget, m) for m in ("last_layer", "device", "hidden"))
