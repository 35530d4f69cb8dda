"""danlu: take a PyTorch model through its whole life on your own machines.

Public API (imported lazily, so `danlu --help` never waits for torch):
    train(config) -> Run, evaluate(run_dir, data=None) -> dict, load(run_dir) -> Predictor (a model
    directory: its encoder), embed(model, inputs, out) (`danlu embed`), zero_shot(model, images, out,
    labels) (`danlu predict CLIP_MODEL IMAGES --labels`),
    predict_file(run_dir, data, out) -> rows (`danlu predict`), show_sample(config) -> str,
    tune(config, space, trials=...) -> TuneResult (`danlu tune`), runs(folder) -> rows and
    compare(run_a, run_b) -> dict (`danlu runs`),
    serve(run_dir_or_model, ...), export(run_or_model, ...) -> dict (`danlu export`: a run, a causal LM
    as GGUF, an encoder's towers), export_gguf(model_dir, quantize) -> dict, package(source, out, ...) ->
    dict (`danlu package`), doctor() -> dict (`danlu doctor`),
    export_environment(fmt) -> str (`danlu env export`), chat(model, ...) -> Chat (`danlu chat`),
    quickstart(...) -> Run, Run, Predictor, DanluError, __version__
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
    "doctor": "danlu.api",
    "package": "danlu.api",
    "export_environment": "danlu.env.freeze",
    "chat": "danlu.serve.chat.session",
    "Chat": "danlu.serve.chat.session",
    "Run": "danlu.api",
    "Predictor": "danlu.predictor",
    "DanluError": "danlu.errors",
    "Config": "danlu.config",
    "export_gguf": "danlu.export.gguf",
    "load_config": "danlu.config",
}
_CALLABLE_PACKAGES = ("serve", "export")  # danlu.serve(...) and danlu.export(...): the packages are callable
__all__ = ["__version__", *_CALLABLE_PACKAGES, *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _CALLABLE_PACKAGES:
        return import_module(f"danlu.{name}")
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'danlu' has no attribute {name!r}")
