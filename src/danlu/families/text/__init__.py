"""The text family: CSV, Parquet or JSONL with a text column and a target, fine-tuning a local Hugging
Face encoder (BERT, MiniLM, RoBERTa, DistilBERT...) with a classification or regression head. See
danlu.families for what each hook does."""

from __future__ import annotations

from pathlib import Path

from danlu.config import DataConfig
from danlu.families.text.codec import (
    as_items,
    count,
    feeds,
    file_fingerprint,
    inputs,
    output_frame,
    predict_part,
    read,
    read_stored,
    reopen,
    select,
    store_rows,
    targets,
)
from danlu.families.text.data import load
from danlu.families.text.export import TextExport as exporter
from danlu.families.text.models import build_model, write_hf
from danlu.families.text.serve import description, page_schema, request_items, request_model, warmup_items
from danlu.families.text.state import TextState
from danlu.run import HELDOUT_ROWS, HF

NAME = "text"
STORED_ROWS = HELDOUT_ROWS
MODEL_DEFAULTS = {"type": "pretrained"}
# The fine-tuning recipe of BERT-style encoders: AdamW at 5e-5 with weight decay 0.01 on weight matrices
# only, 10% linear warm-up then linear decay, batch 32, 3 epochs, bf16 autocast where supported.
TRAIN_DEFAULTS = {
    "epochs": 3,
    "batch_size": 32,
    "lr": 5e-5,
    "weight_decay": 0.01,
    "schedule": "linear",
    "warmup": 0.1,
    "patience": 0,
    "precision": "auto",
}
DECAY_MATRICES_ONLY = True
PREDICT_BATCH = 64
EVAL_BATCH = 128


def detect(data: DataConfig) -> bool:
    return data.text is not None


def state_from_json(text: str) -> TextState:
    return TextState.from_json(text)


def bind(state: TextState, run_dir: Path) -> None:
    """A finished run reads its tokenizer and encoder config from RUN/hf, not model.pretrained."""
    state.run_hf = Path(run_dir) / HF


def write_artifacts(run, model, state: TextState) -> None:
    """RUN/hf: the fine-tuned model and tokenizer for AutoModelForSequenceClassification.from_pretrained."""
    write_hf(model, state, run.weights, run.hf)


def train_stats(part, epochs: int, seconds: float) -> dict:
    """report.json's figures of the training data: padding share of the training batches (as built by
    this process) and text tokens (padding not counted) per second of training."""
    share = part.padding_share()
    tokens = int(part.lengths.sum())
    return {
        "padding_share": None if share is None else round(share, 4),
        "tokens_per_epoch": tokens,
        "tokens_per_second": round(tokens * epochs / seconds) if seconds > 0 else None,
    }


__all__ = [
    "DECAY_MATRICES_ONLY",
    "EVAL_BATCH",
    "MODEL_DEFAULTS",
    "NAME",
    "PREDICT_BATCH",
    "STORED_ROWS",
    "TRAIN_DEFAULTS",
    "as_items",
    "bind",
    "build_model",
    "count",
    "description",
    "detect",
    "exporter",
    "feeds",
    "file_fingerprint",
    "inputs",
    "load",
    "output_frame",
    "page_schema",
    "predict_part",
    "read",
    "read_stored",
    "reopen",
    "request_items",
    "request_model",
    "select",
    "state_from_json",
    "store_rows",
    "targets",
    "train_stats",
    "warmup_items",
    "write_artifacts",
]
