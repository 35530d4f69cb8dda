"""Serving sequences: {"sequences": [[number, ...], ...]}, each exactly `length` finite numbers."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tests.toy_family.state import SequenceState


def request_model(state: SequenceState, max_rows: int) -> type[BaseModel]:
    class SequenceRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False, title="SequenceRequest")
        sequences: list[list[float]] = Field(
            min_length=1, max_length=max_rows, description=f"sequences of {state.length} numbers"
        )

    return SequenceRequest


def request_items(state: SequenceState, body) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    errors = [
        {
            "loc": ["body", "sequences", i],
            "msg": f"has {len(s)} numbers, not {state.length}",
            "type": "value_error",
        }
        for i, s in enumerate(body.sequences)
        if len(s) != state.length
    ]
    return [np.asarray(s, dtype=np.float32) for s in body.sequences], errors


def warmup_items(state: SequenceState) -> list[np.ndarray]:
    return [np.zeros(state.length, dtype=np.float32)]


def metadata(state: SequenceState) -> dict[str, Any]:
    return {"length": state.length}


def page_form(state: SequenceState) -> dict[str, Any]:
    field = {
        "name": "sequence",
        "id": "sequence",
        "kind": "numbers",
        "placeholder": f"{state.length} numbers",
    }
    return {
        "hint": f"Type {state.length} numbers, separated by commas, then press Predict.",
        "fields": [field],
        "request": {"shape": "list", "key": "sequences"},
    }


def description(state: SequenceState) -> str:
    return f"sequences of {state.length} numbers"
