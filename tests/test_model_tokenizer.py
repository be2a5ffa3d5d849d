"""The tiny tokenizer: byte-level round trips, Qwen-VL special tokens, chat template."""

import pytest

from vlrl.model.tokenizer import SPECIAL_TOKENS, train_tokenizer

CORPUS = [
    "What number is shown?",
    "\\boxed{482}",
    "Add the numbers in the image, then multiply by 3.",
    "7 + 5 = 12. 12 * 3 = 36. \\boxed{36}",
    "What color is the circle?",
    "\\boxed{red}",
] * 50


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=512)


@pytest.mark.parametrize(
    "text",
    ["7 + 5 = 12. 12 * 3 = 36. \\boxed{36}", "unseen: Zürich façade 東京 🙂\n\ttabs", "", "  leading and trailing  "],
)
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(tok):
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    for t, i in zip(SPECIAL_TOKENS, ids):
        assert tok.encode(t, add_special_tokens=False) == [i]
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    # Special tokens inside text stay atomic.
    enc = tok.encode("a<|image_pad|><|image_pad|>b", add_special_tokens=False)
    assert enc.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 2


def test_digits_are_separate_tokens(tok):
    pieces = tok.convert_ids_to_tokens(tok.encode("12345", add_special_tokens=False))
    assert pieces == list("12345")


def test_vocab_bounded(tok):
    assert 256 + len(SPECIAL_TOKENS) <= len(tok) <= 512
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(CORPUS, vocab_size=100)


def test_chat_template_string_and_list_content(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What number is shown?"}]},
        {"role": "assistant", "content": "\\boxed{482}"},
    ]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What number is shown?<|im_end|>\n"
        "<|im_start|>assistant\n\\boxed{482}<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "system" not in prompt  # no default system prompt in the tiny template


def test_chat_template_two_images_in_order(tok):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "image"}, {"type": "text", "text": "B"}, {"type": "image"}]}]
    out = tok.apply_chat_template(msgs, tokenize=False)
    img = "<|vision_start|><|image_pad|><|vision_end|>"
    assert out == f"<|im_start|>user\nA{img}B{img}<|im_end|>\n"
