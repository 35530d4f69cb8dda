"""A run's model with its preprocessing as ONNX or TorchScript (optionally int8), verified against the torch
model on held-out rows before the file appears."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from danlu import __version__
from danlu.errors import DanluError
from danlu.evaluation.metrics import MetricStream
from danlu.export import check_run_options
from danlu.predictor import Predictor
from danlu.run import (
    RunDir,
    atomic_write,
    atomic_write_json,
    export_record_path,
    export_target,
)

FP32_TOLERANCE = 1e-4  # max abs difference: probabilities, or regression values in units of the target's std
HEADLINE = {"classification": "accuracy", "regression": "r2"}


def metadata(predictor: Predictor, spec: Any) -> dict[str, str]:
    """What a consumer needs besides the graph, as strings (ONNX metadata_props / TorchScript extra file)."""
    state = predictor.state
    return {
        "danlu_version": __version__,
        "family": predictor.family.name,
        "task": state.task,
        "target": state.target,
        **spec.metadata(),
        "classes": json.dumps(state.classes),
        "output": spec.output_name(),
    }


def _build(predictor: Predictor, fmt: str, quantize: str | None) -> tuple[bytes, Any]:
    spec = predictor.family.exporter(predictor.state)
    module, meta = spec.module(predictor.model), metadata(predictor, spec)
    if fmt == "onnx":
        from danlu.export.onnx import onnx_bytes, quantize_int8
        from danlu.runners import OnnxRunner

        data = onnx_bytes(module, spec, meta)
        if quantize:
            data = quantize_int8(data)
        return data, OnnxRunner(data, spec)
    from danlu.export.torchscript import torchscript_bytes
    from danlu.runners import TorchScriptRunner

    data = torchscript_bytes(module, spec, meta, int8=bool(quantize))
    return data, TorchScriptRunner(data, spec)


def verify(predictor: Predictor, runner: Any, run_dir: str | Path) -> dict[str, Any]:
    """Run the torch model and the exported one on the run's held-out rows (as recorded in the run
    directory; for a run that held none out, its recorded sample of training rows): the largest
    difference, and the headline metric of both."""
    from danlu.data import heldout

    family, state = predictor.family, predictor.state
    split, chunks = heldout.items(RunDir(run_dir), family, state)
    reference, exported = MetricStream(state.task, state.classes), MetricStream(state.task, state.classes)
    scale = 1.0 if state.task == "classification" else state.head.std
    max_diff = 0.0
    for items in chunks:
        if not family.count(items):
            continue
        y = family.targets(state, items)
        expected, got = predictor.decoded(items), runner.run(items)
        max_diff = max(max_diff, float(np.abs(got.astype(np.float64) - expected).max()) / scale)
        reference.update(y, expected)
        exported.update(y, got)
    key = HEADLINE[state.task]
    before, after = reference.result()[key], exported.result()[key]
    return {
        "split": "train" if split == "none" else split,
        "rows": reference.n,
        "max_abs_diff": max_diff,
        "metric": key,
        "torch": before,
        "exported": after,
        "metric_drop": None if before is None or after is None else before - after,
    }


def export_run(
    run_dir: str | Path,
    fmt: str = "onnx",
    quantize: str | None = None,
    out: str | Path | None = None,
    max_metric_drop: float = 0.01,
    trust_model_code: bool = False,
) -> dict[str, Any]:
    """Export a finished run and verify it; the file is written only when verification passes.

    fp32 exports must match the torch model within FP32_TOLERANCE on every held-out row; int8 exports
    may lose at most `max_metric_drop` of the headline metric (accuracy or R^2) on the held-out split.

    Raises:
        DanluError: unknown format, an unexportable model, or a failed verification (with the figures).
    """
    check_run_options(fmt, quantize)
    path = export_target(run_dir, fmt, quantize, out)
    predictor = Predictor.load(run_dir, "cpu", trust_model_code=trust_model_code)
    data, runner = _build(predictor, fmt, quantize)
    check = verify(predictor, runner, run_dir)
    result = {
        "path": str(path),
        "format": fmt,
        "quantize": quantize,
        "bytes": len(data),
        "danlu_version": __version__,
        **check,
    }
    if quantize is None and check["max_abs_diff"] > FP32_TOLERANCE:
        raise DanluError(
            f"the {fmt} export differs from the torch model by {check['max_abs_diff']:.2e} "
            f"(over {FP32_TOLERANCE:g}) on {check['rows']} {check['split']} rows; nothing was written",
            "report this with the run's config.yaml; a custom model may use an op that exports differently",
        )
    if quantize is not None and check["metric_drop"] is None:
        raise DanluError(
            f"int8 cannot be verified: {check['metric']} is undefined on the {check['rows']} "
            f"{check['split']} row(s); nothing was written",
            "train with more held-out rows (data.test_fraction), or use the fp32 export",
        )
    if quantize is not None and check["metric_drop"] > max_metric_drop:
        raise DanluError(
            f"int8 lowers {check['metric']} from {check['torch']:.4f} to {check['exported']:.4f} on the "
            f"{check['split']} split (more than --max-metric-drop {max_metric_drop:g}); nothing was written",
            "use the fp32 export, or raise --max-metric-drop if that loss is acceptable",
        )
    atomic_write(path, lambda f: f.write(data))
    atomic_write_json(export_record_path(path), result)  # the verification, beside the file
    return result
