"""The text family: CSV, Parquet or JSONL with a text column and a target, fine-tuning a local Hugging
Face encoder (BERT, MiniLM, RoBERTa, DistilBERT...) with a classification or regression head."""

from __future__ import annotations

from pathlib import Path

from danlu.config import DataConfig, ModelConfig
from danlu.families.contract import Family, repeated_blocks
from danlu.families.tabular import TABLE_ROWS
from danlu.families.text import codec, serve
from danlu.families.text.data import TextPart, load
from danlu.families.text.export import TextExport
from danlu.families.text.models import build_model, write_hf
from danlu.families.text.state import TextState
from danlu.run import HF

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


def detect(data: DataConfig, model: ModelConfig) -> bool:
    return data.text is not None


def bind(state: TextState, run_dir: Path) -> None:
    """A finished run reads its tokenizer and encoder config from RUN/hf, not model.pretrained."""
    state.run_hf = Path(run_dir) / HF


def write_artifacts(run, model, state: TextState) -> None:
    """RUN/hf: the fine-tuned model and tokenizer for AutoModelForSequenceClassification.from_pretrained."""
    write_hf(model, state, run.weights, run.hf)


def train_stats(part: TextPart, epochs: int, seconds: float) -> dict:
    """report.json's figures of the training data: padding share of the training batches (as built by
    this process) and text tokens (padding not counted) per second of training."""
    share = part.padding_share()
    tokens = int(part.lengths.sum())
    return {
        "padding_share": None if share is None else round(share, 4),
        "tokens_per_epoch": tokens,
        "tokens_per_second": round(tokens * epochs / seconds) if seconds > 0 else None,
    }


# Texts are table rows: files are read, and held-out rows stored, as the tabular family does.
FAMILY = Family(
    name="text",
    state_type=TextState,
    detect=detect,
    model_types=("pretrained",),
    model_defaults={"type": "pretrained"},
    train_defaults=TRAIN_DEFAULTS,
    decay_matrices_only=True,
    shard_blocks=repeated_blocks,
    load=load,
    build_model=build_model,
    as_items=codec.as_items,
    inputs=codec.inputs,
    targets=codec.targets,
    count=codec.count,
    **TABLE_ROWS,
    exporter=TextExport,
    request_model=serve.request_model,
    request_items=serve.request_items,
    warmup_items=serve.warmup_items,
    metadata=serve.metadata,
    page_form=serve.page_form,
    description=serve.description,
    predict_batch=64,
    eval_batch=128,
    predict_part=codec.predict_part,
    by_length=TextPart.by_length,
    bind=bind,
    write_artifacts=write_artifacts,
    train_stats=train_stats,
    serve_files=(HF,),
    # the tokenizer and the encoder's architecture come from transformers
    serve_packages=("transformers", "tokenizers"),
)
