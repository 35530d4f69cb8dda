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
from danlu.inference import collect_outputs, resolve_device
from danlu.models import ModelInputs, build_model
from danlu.models.weights import load_weights
from danlu.run import RunDir

PREDICT_BATCH = 65_536


class Predictor:
    """Predictions from raw feature values: a DataFrame, a dict of columns or a 2-D array in feature order."""

    def __init__(
        self, model: nn.Module, preprocessor: Preprocessor, config: Config, device: torch.device | str = "cpu"
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.preprocessor = preprocessor
        self.config = config

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu") -> Predictor:
        """Load a finished run directory (config.yaml, preprocess.json, model.safetensors)."""
        run = RunDir(run_dir)
        run.require_complete()
        config = validate(read_yaml(run.config))
        pre = Preprocessor.from_json(run.preprocess.read_text())
        model = build_model(config.model, ModelInputs(pre.n_numeric_inputs, pre.cardinalities, pre.n_outputs))
        load_weights(model, run.weights)
        return cls(model, pre, config, resolve_device(device))

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
        """Probabilities [n, k] (classification) or values in original units [n] (regression)."""
        frame = self.as_frame(data)
        x_num, x_cat = self.preprocessor.transform(frame)
        part = TensorPart(torch.from_numpy(x_num), torch.from_numpy(x_cat), torch.zeros(len(frame)))
        outputs, _ = collect_outputs(self.model, part.batches(PREDICT_BATCH), self.device)
        if len(frame) == 0:
            return np.empty((0, self.preprocessor.n_outputs) if self.task == "classification" else 0)
        return self.preprocessor.decode(outputs)

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
