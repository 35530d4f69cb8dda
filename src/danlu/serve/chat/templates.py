"""Chat templates: the tokenizer's own, a built-in (`--template starchat|chatml|llama3|zephyr`), or a Jinja
file. A rendered prompt is tokenized without adding special tokens: the template already holds them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from danlu.errors import DanluError

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
            self.source, self.name = path.read_text(), path.name

    def render(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                normalize(messages), chat_template=self.source, tokenize=False, add_generation_prompt=True
            )
        except DanluError:
            raise
        except Exception as exc:  # a template's own raise_exception(), or a broken Jinja file
            raise DanluError(
                f"the chat template failed: {exc}".splitlines()[0], "check the messages"
            ) from None

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text, adding no special tokens (the template has them: no double BOS)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
