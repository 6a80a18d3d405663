"""Shared pytest fixtures. Data fixtures below; other fixtures may be added by others."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    """The Qwen3 tokenizer rebuilt offline (data/tokenizer.py); built once, ~10 s."""
    from data.tokenizer import build_qwen3_tokenizer

    return build_qwen3_tokenizer()


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(qwen3_tokenizer, tmp_path_factory):
    """A directory holding qwen3_tokenizer, loadable with AutoTokenizer.from_pretrained."""
    out = tmp_path_factory.mktemp("qwen3_tokenizer")
    qwen3_tokenizer.save_pretrained(str(out))
    return out
