"""danlu: take a PyTorch model through its whole life on your own machines.

Public API (imported lazily, so `danlu --help` never waits for torch):
    train(config) -> Run, evaluate(run_dir, data=None) -> dict, load(run_dir) -> Predictor (a model
    directory: its encoder), embed(model, inputs, out) (`danlu embed`), zero_shot(model, images, out,
    labels) (`danlu predict CLIP_MODEL IMAGES --labels`),
    predict_file(run_dir, data, out) -> rows (`danlu predict`), show_sample(config) -> str,
    tune(config, space, trials=...) -> TuneResult (`danlu tune`), runs(folder) -> rows and
    compare(run_a, run_b) -> dict (`danlu runs`),
    serve(run_dir_or_model, ...), export_gguf(model_dir, quantize) -> dict, quickstart(...) -> Run, Run,
    Predictor, DanluError, __version__
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "train": "danlu.api",
    "evaluate": "danlu.api",
    "load": "danlu.api",
    "embed": "danlu.api",
    "zero_shot": "danlu.api",
    "predict_file": "danlu.api",
    "show_sample": "danlu.api",
    "tune": "danlu.api",
    "runs": "danlu.api",
    "compare": "danlu.api",
    "quickstart": "danlu.api",
    "Run": "danlu.api",
    "Predictor": "danlu.predictor",
    "DanluError": "danlu.errors",
    "Config": "danlu.config",
    "export_gguf": "danlu.export.gguf",
    "load_config": "danlu.config",
}
__all__ = ["__version__", "serve", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if (
        name == "serve"
    ):  # the danlu.serve package, which is callable: danlu.serve(...) is danlu.serve.start.serve
        return import_module("danlu.serve")
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'danlu' has no attribute {name!r}")
