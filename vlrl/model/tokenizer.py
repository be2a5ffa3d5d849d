"""A small byte-level BPE tokenizer with Qwen-VL's special tokens and chat format.

The tiny model must speak the same chat dialect as a real Qwen2.5-VL checkpoint
(ChatML turns, `<|vision_start|><|image_pad|><|vision_end|>` per image) so that
batching, generation and reward code never special-case it. Only the vocabulary
differs: it is learned from the synthetic corpus, so a few thousand tokens cover
it and the embedding table stays small.

Departures from Qwen2.5-VL's own template, both to keep sequences short for the
CPU model: no default system prompt is inserted, and there is no `add_vision_id`
/ video branch. Real checkpoints keep their own template (see `batching.py`,
which computes the assistant mask from rendered prefixes, so it needs no
`{% generation %}` markers in any template).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

# The Qwen2.5-VL special tokens, in Qwen's order. Grounding tokens are kept so a
# recipe written for a real checkpoint's box format tokenizes the same way.
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    VISION_START,
    VISION_END,
    "<|vision_pad|>",
    IMAGE_PAD,
    VIDEO_PAD,
)

# Qwen2's pre-tokenization split: one token per digit (so arithmetic sees digits),
# words with one leading non-letter, punctuation runs, newlines, spaces.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML with Qwen-VL image placeholders. String content and lists of
# {"type": "text"|"image"} items are both accepted; an item with an "image" or
# "image_url" key also counts as an image, as in Qwen's template.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerBase:
    """Learn a byte-level BPE on `texts` and wrap it as a transformers tokenizer.

    The vocabulary may come out smaller than `vocab_size` when the corpus has
    fewer distinct merges; the 256 byte symbols are always present, so any text
    (a real user prompt included) still encodes.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {256 + len(SPECIAL_TOKENS) + 1}")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Chat markup is learned too, so "user\n" / "assistant\n" become single tokens.
    tok.train_from_iterator(_with_chat_markup(texts), trainer=trainer)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (IM_END, PAD_TOKEN)],
        model_max_length=4096,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _with_chat_markup(texts: Iterable[str]) -> Iterable[str]:
    for text in texts:
        yield text
        yield "system\nuser\nassistant\n"
