"""Text items (a DataFrame with the text column, and the target when known; or a list of texts) to model
inputs and targets. Reading files, prediction files and storing held-out rows are the tabular family's:
texts are table rows."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from danlu.errors import DanluError
from danlu.families.text.data import TextPart, part_of
from danlu.families.text.state import TextState


def count(items: pd.DataFrame | list[str]) -> int:
    return len(items)


def as_items(state: TextState, data: Any) -> pd.DataFrame:
    """A text, a list (or array) of texts, a DataFrame or a dict of columns with the text column."""
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, Mapping):
        return pd.DataFrame(data)
    if isinstance(data, str):
        data = [data]
    texts = list(data)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise DanluError(
            f"item {bad} is a {type(texts[bad]).__name__}, not a text", "pass a string or a list of strings"
        )
    return pd.DataFrame({state.text_column: texts})


def predict_part(state: TextState, items: pd.DataFrame | list[str]) -> TextPart:
    """The Predictor's batches: tokenized here, padded per batch, in the items' order."""
    return part_of(as_items(state, items), state, None, labelled=False)


def inputs(state: TextState, items: pd.DataFrame | list[str]) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of all items, padded to the longest."""
    part = predict_part(state, items)
    return next(part.batches(max(part.n_rows, 1))).inputs


def targets(state: TextState, items: pd.DataFrame) -> np.ndarray:
    if state.target not in items.columns:
        raise DanluError(
            f"these texts have no target column '{state.target}'",
            "evaluate a file with the text and the target column",
        )
    return state.decode_target(state.encode_target(items[state.target].reset_index(drop=True)))


def chunks(items: pd.DataFrame | list[str], rows: int) -> Iterator[pd.DataFrame | list[str]]:
    """The items in slices of `rows`, in order."""
    for start in range(0, len(items), rows):
        yield (
            items.iloc[start : start + rows]
            if isinstance(items, pd.DataFrame)
            else items[start : start + rows]
        )


def feeds(state: TextState, items) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in inputs(state, items).items()}
