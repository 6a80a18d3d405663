"""The docs name real tests: every `tests/test_x.py::name` of docs/reliability.md exists."""

from __future__ import annotations

import re

from helpers import ROOT


def test_every_test_named_in_reliability_md_exists():
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    named = []
    for line in text.splitlines():
        current = None
        # `tests/test_x.py::name`, and `::other` after it in the same cell means the same file
        for file, name in re.findall(r"`(tests/test_\w+\.py)?::(test_\w+)`", line):
            current = file or current
            assert current, f"{line!r}: `::{name}` without a file before it"
            named.append((current, name))
    assert len(named) > 10
    missing = [f"{f}::{n}" for f, n in named if not re.search(rf"^def {n}\(", (ROOT / f).read_text(), re.MULTILINE)]
    assert not missing, missing
