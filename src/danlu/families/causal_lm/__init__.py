"""Causal language models fine-tuned on conversations (supervised fine-tuning): a local causal-LM
directory or GGUF file (model.pretrained) trained with LoRA or on every weight, on JSONL, JSON or Parquet
conversations (conversations.py), with the loss on the tokens the chat template marks as the assistant's
(tokens.py), or on plain texts, every token (continued pre-training); the finished run is a model
directory (RUN/hf) the chat server and `danlu chat` serve with the same template.

Rows of a causal-LM run are conversations; predictions, evaluation and serving go through the chat engine
(`danlu chat RUN`, `danlu serve RUN`), not the row-by-row Predictor: the Predictor's hooks here say so."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NoReturn

from danlu.config import DataConfig, ModelConfig
from danlu.errors import DanluError
from danlu.families.causal_lm import data, evaluate
from danlu.families.causal_lm.conversations import kind
from danlu.families.causal_lm.models import build_model, prepare_training, trainable_share, write_artifacts
from danlu.families.causal_lm.state import CausalLMState
from danlu.families.contract import Family, repeated_blocks
from danlu.run import HF

log = logging.getLogger("danlu")

# A LoRA fine-tune on a small instruction model: AdamW at 2e-4, no weight decay, 3% linear warm-up then
# cosine decay, 3 epochs of batches of 8 conversations, bf16 autocast where supported. Full fine-tuning
# (model.adapter: none) wants a learning rate about ten times lower: set train.lr.
TRAIN_DEFAULTS = {
    "epochs": 3,
    "batch_size": 8,
    "lr": 2e-4,
    "weight_decay": 0.0,
    "schedule": "cosine",
    "warmup": 0.03,
    "patience": 0,
    "precision": "auto",
    "grad_clip": 1.0,
}
CONVERSATION_FILES = (".jsonl", ".json", ".parquet", ".pq")


def detect(data_config: DataConfig, model: ModelConfig) -> bool:
    """Conversations for a causal LM: model.pretrained is one (a *ForCausalLM directory or a .gguf file)."""
    from danlu.serve.chat.model import is_causal_lm

    train = Path(data_config.train)
    return (
        model.pretrained is not None
        and data_config.text is None
        and (train.suffix.lower() in CONVERSATION_FILES or train.is_dir())  # a folder: Parquet shards
        and is_causal_lm(model.pretrained)
    )


def bind(state: CausalLMState, run_dir: Path) -> None:
    """A finished run reads its tokenizer and model from RUN/hf, not model.pretrained."""
    state.run_hf = Path(run_dir) / HF


def train_stats(part: data.ChatPart, epochs: int, seconds: float) -> dict[str, Any]:
    """report.json's figures of the training data: conversations or texts (and rows: fewer when packed,
    more when texts are cut into pieces), those left out and why, tokens trained per epoch, padding share
    and trained tokens per second."""
    share = part.padding_share()
    trained = part.trained
    return {
        kind(part.texts): part.conversations,
        "rows": part.n_rows,  # packed: rows of several conversations; texts: their pieces
        "left_out": dict(part.skipped),
        "trained_tokens_per_epoch": trained,
        "tokens_per_epoch": int(part.lengths.sum()),
        "padding_share": None if share is None else round(share, 4),
        "trained_tokens_per_second": round(trained * epochs / seconds) if seconds > 0 else None,
    }


def _by_chat(what: str):
    def refuse(*args: Any) -> NoReturn:
        raise DanluError(
            f"{what} works on rows of a table, texts or images; a causal-LM run answers conversations",
            "chat with it: danlu chat RUN, or serve it: danlu serve RUN",
        )

    return refuse


def _log_trainable(model: Any, train: Any) -> None:
    trainable, total = trainable_share(model)
    log.info("training %s of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    prepare_training(model, train)


FAMILY = Family(
    name="causal_lm",
    state_type=CausalLMState,
    detect=detect,
    model_types=("pretrained",),
    model_defaults={"type": "pretrained"},
    train_defaults=TRAIN_DEFAULTS,
    decay_matrices_only=True,
    load=data.load,
    build_model=build_model,
    prepare_training=_log_trainable,
    shard_blocks=repeated_blocks,
    read=data.read,
    as_items=_by_chat("predicting rows"),
    inputs=_by_chat("predicting rows"),
    targets=_by_chat("evaluating rows"),
    count=data.count,
    output_frame=_by_chat("predicting rows"),
    stored_rows="heldout.jsonl",
    store_rows=data.store_rows,
    read_stored=data.read_stored,
    nbytes=data.nbytes,
    select=data.select,
    reopen=data.reopen,
    exporter=_by_chat("danlu export --format onnx|torchscript"),
    request_model=_by_chat("the predictions server"),
    request_items=_by_chat("the predictions server"),
    warmup_items=_by_chat("the predictions server"),
    metadata=_by_chat("the predictions server"),
    page_form=_by_chat("the predictions server"),
    description=_by_chat("the predictions server"),
    predict_batch=8,
    eval_batch=8,
    by_length=data.ChatPart.by_length,
    bind=bind,
    write_artifacts=write_artifacts,
    writes_weights=True,
    checkpoint_trainable_only=lambda model: model.adapter == "lora",  # the adapter; the base is read again
    evaluate_run=evaluate.evaluate_run,
    predict_run=evaluate.predict_run,
    sample_text=data.sample_text,
    train_stats=train_stats,
    serve_files=(HF,),
    serve_packages=("transformers", "tokenizers", "jinja2"),  # the chat server's, as for any chat model
)
