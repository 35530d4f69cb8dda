"""`danlu export`: a run's model with its preprocessing as ONNX or TorchScript (optionally int8), verified
against the torch model on held-out rows before the file appears."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from danlu import __version__
from danlu.errors import DanluError
from danlu.evaluation.metrics import MetricStream
from danlu.predictor import Predictor
from danlu.run import RunDir, atomic_write, atomic_write_json

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
FP32_TOLERANCE = 1e-4  # max abs difference: probabilities, or regression values in units of the target's std
HEADLINE = {"classification": "accuracy", "regression": "r2"}


def default_path(run_dir: str | Path, fmt: str, quantize: str | None = None) -> Path:
    """Where `danlu export` writes by default: RUN/export/model[.int8].onnx|pt."""
    return RunDir(run_dir).export / f"model{'.int8' if quantize else ''}{FORMATS[fmt]}"


def metadata(predictor: Predictor) -> dict[str, str]:
    """What a consumer needs besides the graph, as strings (ONNX metadata_props / TorchScript extra file)."""
    pre = predictor.preprocessor
    return {
        "danlu_version": __version__,
        "task": pre.task,
        "target": pre.target,
        "numeric_features": json.dumps([c.name for c in pre.numeric]),
        "categorical_features": json.dumps({c.name: c.values for c in pre.categorical}),
        "classes": json.dumps(pre.classes),
        "output": "probabilities" if pre.task == "classification" else "prediction",
    }


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _is_export_record(path: Path) -> bool:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(record, dict) and {"format", "max_abs_diff", "metric"} <= record.keys()


def check_target(path: Path) -> None:
    """Raise unless PATH (and its PATH.json record) may be written: new, or an earlier danlu export.

    An existing file counts as danlu's only when the verification record beside it is danlu's."""
    record = _record_path(path)
    for target in (path, record):
        if target.is_dir():
            raise DanluError(f"'{target}' is a directory", f"pass a file path, e.g. -o {target}/model.onnx")
    if (path.exists() or record.exists()) and not _is_export_record(record):
        existing = path if path.exists() else record
        raise DanluError(
            f"'{existing}' exists and was not written by `danlu export`; nothing was replaced",
            "choose another -o path, or move that file away yourself",
        )


def _build(predictor: Predictor, fmt: str, quantize: str | None) -> tuple[bytes, Any]:
    from danlu.export.module import ServingModule

    pre, module, meta = (
        predictor.preprocessor,
        ServingModule(predictor.model, predictor.preprocessor),
        metadata(predictor),
    )
    if fmt == "onnx":
        from danlu.export.onnx import OnnxRunner, onnx_bytes, quantize_int8

        data = onnx_bytes(module, pre, meta)
        if quantize:
            data = quantize_int8(data)
        return data, OnnxRunner(data, pre)
    from danlu.export.torchscript import TorchScriptRunner, torchscript_bytes

    data = torchscript_bytes(module, pre, meta, int8=bool(quantize))
    return data, TorchScriptRunner(data, pre)


def _verification_frames(run_dir: str | Path) -> tuple[str, Iterator[pd.DataFrame]]:
    """The run's held-out rows, or, for a run that held none out, its recorded sample of training rows."""
    from danlu.data import heldout

    split, frames = heldout.frames(RunDir(run_dir))
    return ("train" if split == "none" else split), frames


def verify(predictor: Predictor, runner: Any, run_dir: str | Path) -> dict[str, Any]:
    """Run the torch model and the exported one on the held-out rows; difference and metrics of both."""
    pre = predictor.preprocessor
    split, frames = _verification_frames(run_dir)
    reference, exported = MetricStream(pre.task, pre.classes), MetricStream(pre.task, pre.classes)
    scale = 1.0 if pre.task == "classification" else pre.target_std
    max_diff = 0.0
    for frame in frames:
        if not len(frame):
            continue
        y = pre.decode_target(pre.encode_target(frame[pre.target]))
        expected, got = predictor.decoded(frame), runner.run(*pre.raw_inputs(frame))
        max_diff = max(max_diff, float(np.abs(got.astype(np.float64) - expected).max()) / scale)
        reference.update(y, expected)
        exported.update(y, got)
    key = HEADLINE[pre.task]
    before, after = reference.result()[key], exported.result()[key]
    return {
        "split": split,
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
) -> dict[str, Any]:
    """Export a finished run and verify it; the file is written only when verification passes.

    fp32 exports must match the torch model within FP32_TOLERANCE on every held-out row; int8 exports
    may lose at most `max_metric_drop` of the headline metric (accuracy or R^2) on the held-out split.

    Raises:
        DanluError: unknown format, an unexportable model, or a failed verification (with the figures).
    """
    if fmt not in FORMATS:
        raise DanluError(f"unknown export format '{fmt}'", f"use one of {', '.join(FORMATS)}")
    if quantize not in (None, "int8"):
        raise DanluError(f"unknown quantization '{quantize}'", "use --quantize int8, or leave it out")
    path = Path(out) if out is not None else default_path(run_dir, fmt, quantize)
    check_target(path)
    predictor = Predictor.load(run_dir, "cpu")
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
    atomic_write_json(_record_path(path), result)  # the verification, beside the file
    return result
