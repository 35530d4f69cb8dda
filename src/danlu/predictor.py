"""Predictor: a run's preprocessing and model together, for predictions on new data."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from danlu.config import Config, read_yaml, validate
from danlu.data.batches import TensorPart
from danlu.data.preprocess import Preprocessor
from danlu.errors import DanluError
from danlu.inference import collect_outputs, resolve_device
from danlu.models import ModelInputs, build_model
from danlu.models.weights import load_weights
from danlu.run import RunDir

PREDICT_BATCH = 65_536
ENGINES = ("torch", "onnx")


def nonfinite_rows(decoded: np.ndarray) -> list[int]:
    """Positions of rows whose decoded output holds NaN or infinity."""
    finite = np.isfinite(decoded)
    return np.flatnonzero(~(finite.all(axis=1) if finite.ndim > 1 else finite)).tolist()


class Predictor:
    """Predictions from raw feature values: a DataFrame, a dict of columns or a 2-D array in feature order."""

    def __init__(
        self,
        model: nn.Module,
        preprocessor: Preprocessor,
        config: Config,
        device: torch.device | str = "cpu",
        runner: Any = None,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.preprocessor = preprocessor
        self.config = config
        self.runner = runner  # an exported model's runner (engine onnx); None runs the torch model
        self.engine = "torch" if runner is None else "onnx"

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu", engine: str = "torch") -> Predictor:
        """Load a finished run directory (config.yaml, preprocess.json, model.safetensors).

        Args:
            engine: "torch", or "onnx" to run RUN/export/model.onnx on ONNX Runtime (CPU).
        """
        if engine not in ENGINES:
            raise DanluError(f"unknown engine '{engine}'", f"use one of {', '.join(ENGINES)}")
        run = RunDir(run_dir)
        run.require_complete()
        config = validate(read_yaml(run.config))
        pre = Preprocessor.from_json(run.preprocess.read_text())
        model = build_model(config.model, ModelInputs(pre.n_numeric_inputs, pre.cardinalities, pre.n_outputs))
        load_weights(model, run.weights)
        runner = None
        if engine == "onnx":
            from danlu.export import default_path
            from danlu.export.onnx import OnnxRunner

            path = default_path(run.path, "onnx")
            if not path.is_file():
                raise DanluError(
                    f"{run.path} has no ONNX export ({path.name})",
                    f"run `danlu export {run.path} --format onnx` first, or use engine torch",
                )
            runner = OnnxRunner(path, pre)
        return cls(model, pre, config, resolve_device(device), runner)

    @property
    def task(self) -> str:
        return self.preprocessor.task

    @property
    def classes(self) -> list[Any] | None:
        return self.preprocessor.classes

    @property
    def features(self) -> list[str]:
        return self.preprocessor.features

    def as_frame(self, data: Any) -> pd.DataFrame:
        if isinstance(data, pd.DataFrame):
            return data
        if isinstance(data, Mapping):
            return pd.DataFrame(data)
        array = np.asarray(data)
        if array.ndim == 1:
            array = array[None, :]
        return pd.DataFrame(array, columns=self.features)

    def decoded(self, data: Any) -> np.ndarray:
        """Probabilities [n, k] (classification) or values in original units [n] (regression).

        Raises:
            DanluError: a row's output is not a finite number (its inputs are far out of range).
        """
        frame = self.as_frame(data)
        decoded = self.decoded_raw(*self.preprocessor.raw_inputs(frame, np.float64))
        bad = nonfinite_rows(decoded)
        if bad:
            raise DanluError(
                f"the model's output is not a finite number for row {bad[0] + 1}"
                + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""),
                "check that row's feature values: they are far outside anything float32 or the model handles",
            )
        return decoded

    def decoded_raw(self, numeric: np.ndarray, categorical: list[np.ndarray]) -> np.ndarray:
        """`decoded` from raw inputs (`Preprocessor.raw_inputs` / `raw_records`), unchecked: rows whose
        inputs overflow come back as NaN or infinity (see `nonfinite_rows`)."""
        if len(numeric) == 0:
            return self._empty()
        if self.runner is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                return self.runner.run(numeric.astype(np.float32, copy=False), categorical)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf, found by the caller
            x_num, x_cat = self.preprocessor.transform_raw(numeric, categorical)
        part = TensorPart(torch.from_numpy(x_num), torch.from_numpy(x_cat), torch.zeros(len(x_num)))
        outputs, _ = collect_outputs(self.model, part.batches(PREDICT_BATCH), self.device)
        with np.errstate(over="ignore", invalid="ignore"):
            return self.preprocessor.decode(outputs)

    def _empty(self) -> np.ndarray:
        return np.empty((0, self.preprocessor.n_outputs) if self.task == "classification" else 0)

    def predict_proba(self, data: Any) -> np.ndarray:
        if self.task != "classification":
            raise TypeError("predict_proba is for classification runs; use predict")
        return self.decoded(data)

    def predict(self, data: Any) -> np.ndarray:
        """Original labels (classification) or values in original units (regression)."""
        decoded = self.decoded(data)
        if self.task == "classification":
            return self.preprocessor.labels(decoded.argmax(axis=1))
        return decoded

    def predict_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The input rows in order with `prediction` (and `proba_<class>` columns) added."""
        decoded = self.decoded(frame)
        out = frame.copy()
        if self.task == "classification":
            out["prediction"] = self.preprocessor.labels(decoded.argmax(axis=1))
            for j, name in enumerate(self.classes):
                out[f"proba_{name}"] = decoded[:, j]
        else:
            out["prediction"] = decoded
        return out
