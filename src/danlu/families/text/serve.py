"""Serving text runs: `{"texts": ["...", ...]}`, each text at most MAX_TEXT_CHARS characters (the model
reads its first max_length tokens; the limit keeps tokenizing a request cheap)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from danlu.families.text.state import TextState

MAX_TEXT_CHARS = 20_000


def request_model(state: TextState, max_rows: int) -> type[BaseModel]:
    class TextRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", title="TextRequest")
        texts: list[str] = Field(
            min_length=1,
            max_length=max_rows,
            description=f"texts ('{state.text_column}'), each up to {MAX_TEXT_CHARS} characters; the model "
            f"reads the first {state.max_length} tokens of each",
        )

    return TextRequest


def request_items(state: TextState, body) -> tuple[list[str], list[dict[str, Any]]]:
    errors = [
        {
            "loc": ["body", "texts", i],
            "msg": f"text of {len(text)} characters is over the limit of {MAX_TEXT_CHARS}",
            "type": "value_error",
        }
        for i, text in enumerate(body.texts)
        if len(text) > MAX_TEXT_CHARS
    ]
    return body.texts, errors


def warmup_items(state: TextState) -> list[str]:
    return ["danlu warm-up " * (state.max_length // 4)]  # a full-length batch: the slowest shape


def description(state: TextState) -> str:
    return f"texts (column '{state.text_column}', up to {state.max_length} tokens)"


def metadata(state: TextState) -> dict[str, Any]:
    return {"column": state.text_column, "max_length": state.max_length, "max_chars": MAX_TEXT_CHARS}


def page_form(state: TextState) -> dict[str, Any]:
    """One text area."""
    return {
        "hint": f"Write or paste a text (up to {MAX_TEXT_CHARS} characters; the model reads its first "
        f"{state.max_length} tokens), then press Predict.",
        "fields": [
            {
                "name": "text",
                "id": "text",
                "label": state.text_column,
                "kind": "textarea",
                "max_chars": MAX_TEXT_CHARS,
            }
        ],
        "request": {"shape": "list", "key": "texts"},
    }
