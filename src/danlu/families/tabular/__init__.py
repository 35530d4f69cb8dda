"""The tabular family: CSV, Parquet, NPZ, NPY and synthetic tables, in memory or in chunks; an MLP or the
user's own module; exports with the preprocessing inside. See danlu.families for what each hook does."""

from __future__ import annotations

from danlu.config import DataConfig
from danlu.families.tabular.codec import (
    as_items,
    count,
    feeds,
    file_fingerprint,
    inputs,
    output_frame,
    read,
    read_stored,
    reopen,
    select,
    store_rows,
    targets,
)
from danlu.families.tabular.data import load, plan_frames
from danlu.families.tabular.export import TabularExport as exporter
from danlu.families.tabular.models import DEFAULTS as MODEL_DEFAULTS
from danlu.families.tabular.models import build_model
from danlu.families.tabular.preprocess import Preprocessor
from danlu.families.tabular.serve import description, features, request_items, request_model, warmup_items

NAME = "tabular"
STORED_ROWS = "heldout.parquet"


def detect(data: DataConfig) -> bool:
    """Tables are the default: every source no other family claims."""
    return True


def state_from_json(text: str) -> Preprocessor:
    return Preprocessor.from_json(text)


def page_schema(pre: Preprocessor) -> dict:
    return {"kind": "tabular", "features": features(pre)}


__all__ = [
    "MODEL_DEFAULTS",
    "NAME",
    "STORED_ROWS",
    "as_items",
    "build_model",
    "count",
    "description",
    "detect",
    "exporter",
    "features",
    "feeds",
    "file_fingerprint",
    "inputs",
    "load",
    "output_frame",
    "page_schema",
    "plan_frames",
    "read",
    "read_stored",
    "reopen",
    "request_items",
    "request_model",
    "select",
    "state_from_json",
    "store_rows",
    "targets",
    "warmup_items",
]
