"""A conversation as token ids and the labels that say which of them are trained, built from the chat
template the run serves with, so that training sees exactly the tokens the server will render.

Which tokens an assistant turn owns is found by rendering prefixes of the conversation: the prompt
before turn i is the conversation's first i messages rendered with the generation prompt (what the chat
server renders for them), and the turn ends where the first i + 1 messages, rendered without it, end.
That holds only for a template whose renderings of a conversation's prefixes are prefixes of its
rendering, compared as token ids; a template that is not (one that rewrites earlier turns) is refused
with one line naming it, since no mask built from it could be right. Each trained turn includes its
end-of-turn token (the model's eos, as `generation_config.json` names it), so the fine-tuned model
learns to stop; what the template puts after that token (a newline) is not trained.

`loss_on`: assistant (every assistant turn, the default), last_turn (the last assistant turn only) or
all (every token of the conversation).

A plain text (continued pre-training) has no template: its ids are the tokenizer's, as the completions
endpoint tokenizes a prompt, followed by the model's end token, and every token is trained; one longer
than the run's max_length is cut into pieces of that many tokens (encode_texts)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from danlu.errors import DanluError
from danlu.serve.chat.templates import Template

IGNORE = -100  # the label of a token that is not trained (PyTorch's cross-entropy ignore_index)
LOSS_ON = ("assistant", "last_turn", "all")


@dataclass(frozen=True)
class Encoded:
    """One conversation: its token ids and, aligned with them, the token each position is trained to be
    (IGNORE where the loss does not look). The model predicts labels[i] from the ids before i."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trained(self) -> int:
        return sum(label != IGNORE for label in self.labels[1:])


def encode(
    template: Template, messages: list[dict[str, str]], loss_on: str, end_ids: Collection[int]
) -> Encoded:
    """The conversation's ids and labels. Raises DanluError when the template is not prefix-preserving
    for it, or when nothing in it would be trained."""
    if loss_on not in LOSS_ON:
        raise DanluError(f"train.loss_on={loss_on} is not one of {', '.join(LOSS_ON)}", "use assistant")
    ids = template.encode_messages(messages, generation_prompt=False)
    if loss_on == "all":
        return _checked(Encoded(ids, list(ids)), template)
    labels = [IGNORE] * len(ids)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for turn in turns[-1:] if loss_on == "last_turn" else turns:
        start, end = turn_span(template, messages, turn, ids, end_ids)
        labels[start:end] = ids[start:end]
    return _checked(Encoded(ids, labels), template)


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[Encoded]]:
    """Each text's pieces: its ids (the tokenizer's own, with its BOS where it adds one) and the end
    token, cut into pieces of at most max_length tokens, every token trained. A piece of one token (a
    text's end token alone) has nothing to predict and is left out."""
    end = tokenizer.eos_token_id
    encoded = tokenizer(list(texts), verbose=False)["input_ids"] if texts else []
    pieces = []
    for ids in encoded:
        ids = [*ids, end] if end is not None else list(ids)
        cut = (ids[i : i + max_length] for i in range(0, len(ids), max_length))
        pieces.append([Encoded(piece, list(piece)) for piece in cut if len(piece) > 1])
    return pieces


def turn_span(
    template: Template,
    messages: list[dict[str, str]],
    turn: int,
    ids: list[int],
    end_ids: Collection[int],
) -> tuple[int, int]:
    """[start, end) of assistant turn `turn` in the conversation's ids: from the first token after the
    prompt the server would render for the messages before it, to its end-of-turn token (included)."""
    prompt = template.encode_messages(messages[:turn], generation_prompt=True) if turn else []
    through = template.encode_messages(messages[: turn + 1], generation_prompt=False)
    for name, part in (("the prompt before", prompt), ("the conversation through", through)):
        if ids[: len(part)] != part:
            raise DanluError(
                f"the chat template '{template.name}' is not prefix-preserving: {name} message {turn + 1} "
                "is not rendered as the start of the whole conversation, so which tokens are the answer "
                "cannot be told",
                "set model.template to a template that renders earlier turns the same way in every "
                "conversation (chatml, llama3, zephyr, starchat or a Jinja file)",
            )
    if len(through) <= len(prompt):
        raise DanluError(
            f"the chat template '{template.name}' renders the assistant's turn {turn + 1} before its "
            "prompt ends",
            "set model.template to a template whose generation prompt opens the assistant's turn",
        )
    end = next((i + 1 for i in range(len(prompt), len(through)) if through[i] in end_ids), len(through))
    return len(prompt), end


def _checked(encoded: Encoded, template: Template) -> Encoded:
    if encoded.trained == 0:
        raise DanluError(
            f"a conversation has no token to train on under the chat template '{template.name}'",
            "check that the data has assistant turns with text, or set train.loss_on=all",
        )
    return encoded


def show(tokenizer, encoded: Encoded, open_mark: str = "[[", close_mark: str = "]]") -> str:
    """The conversation as text with each run of trained tokens between marks: what `danlu train
    --show-sample` prints and the training log shows for one row."""
    pieces, run, trained = [], [], False
    for i, (token, label) in enumerate(zip(encoded.input_ids, encoded.labels, strict=True)):
        now = i > 0 and label != IGNORE
        if now != trained and run:
            text = tokenizer.decode(run)
            pieces.append(f"{open_mark}{text}{close_mark}" if trained else text)
            run = []
        run.append(token)
        trained = now
    if run:
        text = tokenizer.decode(run)
        pieces.append(f"{open_mark}{text}{close_mark}" if trained else text)
    return "".join(pieces)
