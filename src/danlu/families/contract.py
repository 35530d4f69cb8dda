"""The family contract: everything the rest of danlu may ask of a family, as one typed object.

A family's package builds one `Family` (its `FAMILY`), registered by one line in `danlu.families.FAMILIES`.
The trainer, checkpoints, DDP/FSDP/Ray, the run directory, the report, the Predictor, export verification,
held-out records, the server and packaging call only these fields; nothing outside `families/` probes a
family's module or names a family. "Items" are a family's raw rows in memory (a DataFrame, decoded
images, a list of texts); a "part" is a split the trainer batches (`danlu.data.batches.Part`); the
"state" is the family's fitted preprocessing (a `danlu.families.target.FamilyState`, stored as
preprocess.json).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from danlu.errors import DanluError

# Rows per forward pass where a family sets no batch size of its own (tables: small rows, many at once)
DEFAULT_BATCH = 65_536


def _nothing(*args: Any) -> None:
    return None


def _no_stats(part: Any, epochs: int, seconds: float) -> dict[str, Any]:
    return {}


def _every_weight(model_config: Any) -> bool:
    return False


def _whole(model: Any) -> list:
    return []


def repeated_blocks(model: Any) -> list:
    """The elements of the model's largest ModuleList by parameters: a transformer's layers (for
    shard_blocks: FSDP then gathers one layer's parameters at a time)."""
    from torch import nn

    best: list = []
    best_size = 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = list(module), size
    return best


def _no_held_out_stats(state: Any, part: Any) -> dict[str, Any]:
    return {}


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Family:
    """One kind of data, from a source on disk to predictions served over HTTP."""

    # --- identity, and the config values it adds ---------------------------------------------------
    name: str
    state_type: type  # its fitted preprocessing: a FamilyState subclass (to_json / from_json)
    # (DataConfig, ModelConfig) -> the source (and model) are this family's, for data.family: auto
    detect: Callable[[Any, Any], bool]
    model_types: tuple[str, ...]  # the model.type values it builds (besides auto)

    # --- training data ------------------------------------------------------------------------------
    # (DataConfig, device, state or None, cache dir or None, ModelConfig, TrainConfig) -> Dataset: fit the
    # state (unless given, as on resume) and build the parts
    load: Callable[..., Any]
    build_model: Callable[[Any, Any], Any]  # (ModelConfig, state) -> nn.Module, called with a batch's inputs

    # --- items: evaluate, predict, export checks ----------------------------------------------------
    # (spec, state, chunk_rows) -> items of a file or folder, in order; with skips_unreadable, read also
    # takes skipped=[]: rows it cannot read (an image file) are left out and named there
    read: Callable[..., Iterator[Any]]
    as_items: Callable[[Any, Any], Any]  # (state, what the Python API accepts) -> items
    inputs: Callable[[Any, Any], dict]  # (state, items) -> model inputs by name
    targets: Callable[[Any, Any], np.ndarray]  # (state, items) -> true classes or values
    count: Callable[[Any], int]  # items -> rows
    output_frame: Callable[[Any, Any, np.ndarray], Any]  # (state, items, decoded) -> predictions rows

    # --- held-out rows, recorded in the run directory (danlu.data.heldout) ---------------------------
    stored_rows: str  # the file they are stored in (heldout.parquet, heldout.npz)
    store_rows: Callable[[Any], bytes | None]  # items -> file content, or None when they cannot be stored
    read_stored: Callable[[Path], Iterator[Any]]
    nbytes: Callable[[Any], int]  # items -> bytes in memory (rows over a limit are recorded by number)
    select: Callable[[Any, np.ndarray, Any], Any]  # (source, indices, state) -> items
    reopen: Callable[[str, Any, int], Any]  # (spec, DataConfig, chunk_rows) -> the source, opened again

    # --- export and serving -------------------------------------------------------------------------
    exporter: Callable[[Any], Any]  # state -> an ExportSpec (danlu.families.export)
    request_model: Callable[[Any, int], type]  # (state, max_rows) -> the pydantic model of a JSON body
    # (state, body) -> (items, errors); an error of type "too_large" refuses the request whole (413)
    request_items: Callable[[Any, Any], tuple[list, list]]
    warmup_items: Callable[[Any], list]  # state -> one typical item (the server's warm-up)
    metadata: Callable[[Any], dict]  # state -> what /v1/metadata says of the inputs
    page_form: Callable[[Any], dict]  # state -> the web page's form: {"hint", "fields", "request"}
    description: Callable[[Any], str]  # state -> a few words on the inputs, for the API docs

    # --- optional, with the defaults most families keep ---------------------------------------------
    fallback: bool = False  # claims every source no other family claims (tables)
    model_defaults: Mapping[str, Any] = field(default_factory=dict)  # model.* where the config set none
    train_defaults: Mapping[str, Any] = field(default_factory=dict)  # train.* where the config set none
    decay_matrices_only: bool = False  # weight decay on weight matrices only, not on 1-D parameters
    skips_unreadable: bool = False  # read takes skipped= (images: --skip-bad-images)
    predict_batch: int = DEFAULT_BATCH  # rows per forward pass when predicting
    eval_batch: int = DEFAULT_BATCH  # rows per forward pass when evaluating
    # (state, items) -> the Predictor's part; None: one TensorPart of inputs(state, items)
    predict_part: Callable[[Any, Any], Any] | None = None
    # part -> (the same rows in the order that batches best, that order); None: batch in row order
    by_length: Callable[[Any], tuple[Any, np.ndarray]] | None = None
    # spec -> a data file's fingerprint without reading its rows; None: open the source to take it
    file_fingerprint: Callable[[str], dict] | None = None
    # (source, plan) -> held-out rows of a run trained in chunks; None: such runs do not exist
    plan_frames: Callable[[Any, dict], Iterator[Any]] | None = None
    bind: Callable[[Any, Path], None] = _nothing  # (state, run dir): a finished run's own files
    # (model, TrainConfig) after the model is built for training (causal LMs: gradient checkpointing)
    prepare_training: Callable[[Any, Any], None] = _nothing
    # model -> the blocks train.strategy=fsdp shards one by one (a transformer's layers), before the
    # whole model; []: the model is sharded as one
    shard_blocks: Callable[[Any], list] = _whole
    write_artifacts: Callable[[Any, Any, Any], None] = _nothing  # (RunDir, model, state) at the end
    # write_artifacts writes RUN/model.safetensors itself (causal LMs: the merged model, beside RUN/hf)
    writes_weights: bool = False
    # ModelConfig -> checkpoints hold the trainable parameters alone (causal LMs with LoRA: the frozen
    # base is read again from model.pretrained on resume, checked against its fingerprint)
    checkpoint_trainable_only: Callable[[Any], bool] = _every_weight
    # a family whose runs are evaluated and predicted whole, not row by row through the Predictor
    # (causal LMs: token loss and generated answers): (RunDir, family, state, data or None) -> metrics
    evaluate_run: Callable[..., dict] | None = None
    predict_run: Callable[..., int] | None = None  # (RunDir, data, out) -> rows written
    # (Config) -> one training row as the model sees it, for `danlu train --show-sample` (causal LMs: a
    # conversation with its trained tokens marked); None: the family has nothing to show
    sample_text: Callable[[Any], str] | None = None
    report_plots: Callable[..., None] = _nothing  # (RunDir, model, part, state, device): more plots
    # (state, held-out part) -> figures for report.json beside train_stats' (image probes: the
    # image-text model's own zero-shot accuracy on the same rows)
    held_out_stats: Callable[[Any, Any], dict] = _no_held_out_stats
    train_stats: Callable[[Any, int, float], dict] = _no_stats  # (part, epochs, seconds) -> report.json
    # (state, items, decoded, png path) -> `danlu predict --plot`; None: the family draws nothing
    plot_predictions: Callable[..., None] | None = None
    # (state, the upload's files as bytes, in order) -> (items, errors); None: JSON bodies only
    form_items: Callable[[Any, list[bytes]], tuple[list, list]] | None = None
    heavy_requests: bool = False  # decoding a request costs real time (images): never on the event loop
    serve_files: tuple[str, ...] = ()  # run entries serving needs besides weights, config and state
    serve_packages: tuple[str, ...] = ()  # distributions a packaged server needs besides danlu's own

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_defaults", _frozen(self.model_defaults))
        object.__setattr__(self, "train_defaults", _frozen(self.train_defaults))

    def state_from_json(self, text: str) -> Any:
        return self.state_type.from_json(text)

    def check_model_type(self, model_type: str) -> None:
        """model.type must be auto or one this family builds."""
        if model_type != "auto" and model_type not in self.model_types:
            choices = ", ".join(("auto", *self.model_types))
            raise DanluError(f"model.type={model_type} is not a {self.name} model", f"use one of {choices}")

    def inference_part(self, state: Any, items: Any) -> Any:
        """The Predictor's part for items: the family's own, or their inputs held as one TensorPart."""
        if self.predict_part is not None:
            return self.predict_part(state, items)
        import torch

        from danlu.data.batches import Batch, TensorPart

        return TensorPart(Batch(self.inputs(state, items), torch.zeros(self.count(items))))

    def ordered(self, part: Any) -> tuple[Any, np.ndarray | None]:
        """The part in the order that batches best (texts: by length), and how to restore the rows'
        order from it (None when the order is unchanged)."""
        if self.by_length is None:
            return part, None
        ordered, order = self.by_length(part)
        return ordered, np.argsort(order)
