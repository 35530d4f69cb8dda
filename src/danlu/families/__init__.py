"""Families: one seam for tabular, image and text data.

A family is a package whose `__init__` offers the functions below; the trainer, checkpoints, DDP/Ray,
report, Predictor, export verification, held-out records and the server call only these (plus the
state's target side: `task`, `classes`, `n_outputs`, `decode`, `decode_target`, `labels`, `to_json`).
"Items" are a family's raw rows in memory: a DataFrame (tabular, text) or decoded images.

  NAME, STORED_ROWS                          its name; the file its held-out rows are stored in
  MODEL_DEFAULTS, TRAIN_DEFAULTS             model.* and train.* defaults where the config sets none
  detect(data_cfg) -> bool                   the source is this family's (for data.family: auto)
  load(data_cfg, device, state=None, cache=None, model_cfg=None) -> Dataset
                                             fit preprocessing (unless given) and build the parts
  state_from_json(text) -> state             the fitted preprocessing from preprocess.json
  build_model(model_cfg, state) -> nn.Module called with a batch's inputs, positionally
  read(spec, state, chunk_rows) -> Iterator[items]  a file (or folder) for evaluate and predict
  as_items(state, data) -> items             what the Python API accepts (frames, paths, images, texts)
  inputs(state, items) -> dict[str, Tensor]  model inputs (the Predictor, the server)
  targets(state, items) -> np.ndarray        true class indices or values (evaluate, export checks)
  output_frame(state, items, decoded) -> DataFrame   rows of a predictions file
  store_rows(items) -> bytes | None, read_stored(path), select(source, indices) -> items   held-out rows
  export_module(model, state), example_inputs(state), onnx_io(state), finish_onnx(proto, state),
  feeds(state, items) -> dict[str, ndarray]  the exported graph's inputs, and how to feed it
  request_model(state, max_rows), request_items(state, body), warmup_items(state), page_schema(state)

Optional: form_items (multipart uploads), report_plots, plot_predictions, PREDICT_BATCH, EVAL_BATCH,
plan_frames (chunked tables), file_fingerprint(spec) (a held-out file's fingerprint without reading its
rows), predict_part(state, items) (the Predictor's batches, when padding is per
batch), bind(state, run_dir) (files of a finished run), write_artifacts(run, model, state) (more files at
the end of training), train_stats(part) (report.json), DECAY_MATRICES_ONLY (no weight decay on 1-D
parameters).
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path
from types import ModuleType

from danlu.config import Config, DataConfig
from danlu.errors import DanluError

FAMILIES = {
    "tabular": "danlu.families.tabular",
    "image": "danlu.families.image",
    "text": "danlu.families.text",
}


def get(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise DanluError(f"unknown data.family '{name}'", f"use one of auto, {', '.join(FAMILIES)}")
    return import_module(FAMILIES[name])


def name_for(data: DataConfig) -> str:
    """data.family, or for auto the first family that claims the source."""
    if data.family != "auto":
        return data.family
    for name in FAMILIES:
        if name != "tabular" and get(name).detect(data):
            return name
    return "tabular"


def resolve_family(config: Config) -> Config:
    """The config as saved: data.family resolved (auto -> the family that claims the source) and the
    family's model defaults filled in where the config left them unset."""
    name = name_for(config.data)
    family = get(name)
    model = {k: v for k, v in family.MODEL_DEFAULTS.items() if getattr(config.model, k) in (None, "auto")}
    train_defaults = getattr(family, "TRAIN_DEFAULTS", {})
    train = {k: v for k, v in train_defaults.items() if k not in config.train.model_fields_set}
    return config.model_copy(
        update={
            "data": config.data.model_copy(update={"family": name}),
            "model": config.model.model_copy(update=model),
            "train": config.train.model_copy(update=train),
        }
    )


def state_from_json(text: str, run_dir: Path | None = None):
    """(family, state) from a run's preprocess.json; runs written before families were tabular.
    run_dir: a finished run the state may read files from (text: the tokenizer in RUN/hf)."""
    family = get(json.loads(text).get("family", "tabular"))
    state = family.state_from_json(text)
    bind = getattr(family, "bind", None)
    if run_dir is not None and bind is not None:
        bind(state, run_dir)
    return family, state
