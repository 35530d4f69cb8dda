"""Chat templates: the tokenizer's own, a built-in (`--template starchat|chatml|llama3|zephyr`), or a Jinja
file. A rendered prompt is tokenized without adding special tokens: the template already holds them.

Message content is text, never control tokens: a user who types `<|im_end|>\n<|im_start|>system` must not
open a system turn. The template's own tags are tokenized as the special tokens they are; a special
token's text inside a message's content is tokenized as plain text (`encode_messages`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from danlu.errors import DanluError, read_user_text

ROLES = ("system", "user", "assistant")

BUILTIN = {
    # the tutorials' tags
    "starchat": (
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
        "{{ m.content }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "zephyr": (
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
}
# what stands for a message's content while finding where contents lie in a rendered conversation
MARKER = "\x00danlu-content-{}\x00"
MARKERS = re.compile("\x00danlu-content-(\\d+)\x00")
# the strings that end an assistant turn in each built-in, used as stop strings
BUILTIN_STOPS = {"starchat": ["<|end|>"], "chatml": ["<|im_end|>"], "llama3": ["<|eot_id|>"], "zephyr": []}


def content_text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise DanluError(
                    f"{where}.content[{i}] is not a text part", 'use {"type": "text", "text": "..."}'
                )
            texts.append(part["text"])
        return "".join(texts)
    raise DanluError(f"{where}.content must be a string or a list of text parts", "send the message as text")


def normalize(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Messages as {"role", "content": str}; unknown roles and empty lists are errors."""
    if not messages:
        raise DanluError("messages is empty", "send at least one message")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise DanluError(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}", "fix the role")
        out.append({"role": role, "content": content_text(message.get("content", ""), f"messages[{i}]")})
    return out


class Template:
    """Renders messages to the prompt text the model was trained on."""

    def __init__(self, tokenizer, choice: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.name = "model"
        self.stops: list[str] = []
        if choice is None:
            if not getattr(tokenizer, "chat_template", None):
                raise DanluError(
                    "this model has no chat template",
                    f"pass --template with one of {', '.join(BUILTIN)} or a Jinja file",
                )
            self.source = None
        elif choice in BUILTIN:
            self.source, self.name, self.stops = BUILTIN[choice], choice, BUILTIN_STOPS[choice]
        else:
            path = Path(choice)
            if not path.is_file():
                raise DanluError(
                    f"--template '{choice}' is neither a built-in nor a file",
                    f"use one of {', '.join(BUILTIN)} or a Jinja file",
                )
            self.source, self.name = read_user_text(path), path.name

    @classmethod
    def of_source(cls, tokenizer, source: str, name: str) -> Template:
        """A template from its Jinja source (a fine-tuned run's stored one), named for messages."""
        template = cls.__new__(cls)
        template.tokenizer, template.source, template.name = tokenizer, source, name
        template.stops = BUILTIN_STOPS.get(name, [])
        return template

    @property
    def jinja(self) -> str:
        """The Jinja source this template renders with."""
        return self.source if self.source is not None else self.tokenizer.chat_template

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool = True) -> str:
        return self._render(normalize(messages), generation_prompt)

    def _render(self, normalized: list[dict[str, str]], generation_prompt: bool = True) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                normalized,
                chat_template=self.source,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        except DanluError:
            raise
        except Exception as exc:  # a template's own raise_exception(), or a broken Jinja file
            raise DanluError(
                f"the chat template failed: {exc}".splitlines()[0], "check the messages"
            ) from None

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text, adding no special tokens (the template has them: no double BOS).
        Special tokens' text anywhere in it becomes those tokens: for a conversation, use encode_messages."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_messages(self, messages: list[dict[str, Any]], generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation, with every special token's text inside a message's
        content tokenized as text. Without such text in any message these are encode(render(messages)).
        generation_prompt: end with the opening of an assistant turn (a prompt to answer); False for a
        conversation to train on, which ends with its last message."""
        normalized = normalize(messages)
        text = self._render(normalized, generation_prompt)
        specials = self._specials()
        if not any(token in m["content"] for m in normalized for token in specials):
            return self.encode(text)  # nothing to forge: the tokenizer's own ids, exactly
        spans = self._content_spans(normalized, text, generation_prompt)
        if spans is None:
            found = next(t for m in normalized for t in specials if t in m["content"])
            raise DanluError(
                f"a message holds the model's control token {found!r}, and this chat template changes "
                "message text, so danlu cannot keep it as text",
                "remove the control token from the message",
            )
        return self._encode_with_text(text, spans, specials)

    def _specials(self) -> dict[str, int]:
        """The tokenizer's special tokens (control tokens) by their text."""
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        return {token.content: int(i) for i, token in added.items() if getattr(token, "special", False)}

    def _encode_with_text(
        self, text: str, spans: list[tuple[int, int]], specials: dict[str, int]
    ) -> list[int]:
        """The tokenizer's ids, except that special tokens inside `spans` (message content) are text. A
        tokenizer cuts the text at its special tokens and tokenizes each piece between them on its own;
        this cuts it at the template's special tokens only, and tokenizes each piece with special tokens
        read as text."""
        pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        ids: list[int] = []
        start = 0
        for match in pattern.finditer(text):
            if any(lo <= match.start() < hi for lo, hi in spans):
                continue  # a user's text that looks like a control token: it stays in the piece
            ids += self._plain(text[start : match.start()])
            ids.append(specials[match.group()])
            start = match.end()
        return ids + self._plain(text[start:])

    def _content_spans(
        self, messages: list[dict[str, str]], text: str, generation_prompt: bool = True
    ) -> list[tuple[int, int]] | None:
        """Where each message's content lies in the rendered `text`: the conversation is rendered again
        with a marker in place of each content, and the markers replaced by the contents must give `text`
        back (as they do for templates that put content in as it is, or trimmed). None when they do not."""
        marked = [{**m, "content": MARKER.format(i)} for i, m in enumerate(messages)]
        skeleton = self._render(marked, generation_prompt)
        pieces = MARKERS.split(skeleton)  # text, index, text, index, ..., text
        for shape in (lambda content: content, str.strip):
            spans, parts, at = [], [], 0
            for k, piece in enumerate(pieces):
                if k % 2:
                    piece = shape(messages[int(piece)]["content"])
                    spans.append((at, at + len(piece)))
                parts.append(piece)
                at += len(piece)
            if "".join(parts) == text:
                return spans
        return None

    def _plain(self, piece: str) -> list[int]:
        if not piece:
            return []
        return self.tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
