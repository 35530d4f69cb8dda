"""Predictor: a run's family codec, fitted state and model together, for predictions on new data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from danlu import families
from danlu.config import Config, read_yaml, validate
from danlu.errors import DanluError
from danlu.families.contract import Family
from danlu.inference import collect_outputs, resolve_device
from danlu.models.weights import load_weights
from danlu.run import RunDir
from danlu.serve.chat.model import fine_tuned_model

ENGINES = ("torch", "onnx")


def check_model_code(run: RunDir, config: Config, trusted: bool) -> None:
    """A run whose config names code to build its model loads only when that code is trusted: its
    config.yaml says what to import and call, and a run directory may come from anyone.

    Raises:
        DanluError: model.target is set and trusted is False."""
    if config.model.target is not None and not trusted:
        raise DanluError(
            f"run '{run.path}' builds its model by importing and calling model.target "
            f"'{config.model.target}'; danlu runs no code named in a run unless asked",
            "if you trust that code, pass --trust-model-code (Python: trust_model_code=True)",
        )


def nonfinite_rows(decoded: np.ndarray) -> list[int]:
    """Positions of rows whose decoded output holds NaN or infinity."""
    finite = np.isfinite(decoded)
    return np.flatnonzero(~(finite.all(axis=1) if finite.ndim > 1 else finite)).tolist()


class Predictor:
    """Predictions from raw data, in whatever form the run's family accepts (tabular: a DataFrame, a dict
    of columns or a 2-D array in feature order)."""

    def __init__(
        self,
        family: Family,
        state: Any,
        model: nn.Module,
        config: Config,
        device: torch.device | str = "cpu",
        runner: Any = None,
    ):
        self.family = family
        self.state = state
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = config
        self.runner = runner  # an exported model's runner (engine onnx); None runs the torch model
        self.engine = "torch" if runner is None else "onnx"

    @classmethod
    def load(
        cls, run_dir: str | Path, device: str = "cpu", engine: str = "torch", trust_model_code: bool = False
    ) -> Predictor:
        """Load a finished run directory (config.yaml, preprocess.json, model.safetensors).

        Args:
            engine: "torch", or "onnx" to run RUN/export/model.onnx on ONNX Runtime (CPU).
            trust_model_code: a run whose model comes from code (model.target: a class, or any callable,
                that loading imports and calls) loads only with this set.
        """
        if engine not in ENGINES:
            raise DanluError(f"unknown engine '{engine}'", f"use one of {', '.join(ENGINES)}")
        run = RunDir(run_dir)
        run.require_complete()
        config = validate(read_yaml(run.config))
        check_model_code(run, config, trust_model_code)
        if fine_tuned_model(run.path) is not None:
            raise DanluError(
                f"'{run.path}' is a fine-tuned language model: it answers conversations, not rows",
                "chat with it: danlu chat RUN, or serve it: danlu serve RUN",
            )
        family, state = families.state_from_json(run.read_preprocess(), run.path)
        model = family.build_model(config.model, state)
        load_weights(model, run.weights)
        runner = None
        if engine == "onnx":
            from danlu.runners import OnnxRunner

            path = run.export_path("onnx")
            if not path.is_file():
                raise DanluError(
                    f"{run.path} has no ONNX export ({path.name})",
                    f"run `danlu export {run.path} --format onnx` first, or use engine torch",
                )
            runner = OnnxRunner(path, family.exporter(state))
        return cls(family, state, model, config, resolve_device(device), runner)

    @property
    def preprocessor(self) -> Any:
        """The family's fitted state (tabular: the Preprocessor)."""
        return self.state

    @property
    def task(self) -> str:
        return self.state.task

    @property
    def classes(self) -> list[Any] | None:
        return self.state.classes

    def decoded(self, data: Any) -> np.ndarray:
        """Probabilities [n, k] (classification) or values in original units [n] (regression).

        Raises:
            DanluError: a row's output is not a finite number (its inputs are far out of range).
        """
        decoded = self.decoded_items(self.family.as_items(self.state, data))
        bad = nonfinite_rows(decoded)
        if bad:
            raise DanluError(
                f"the model's output is not a finite number for row {bad[0] + 1}"
                + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""),
                "check that row's values: they are far outside anything float32 or the model handles",
            )
        return decoded

    def decoded_items(self, items: Any) -> np.ndarray:
        """`decoded` for the family's items, unchecked: rows whose inputs overflow come back as NaN or
        infinity (see `nonfinite_rows`)."""
        if self.family.count(items) == 0:
            return self._empty()
        with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf, found by the caller
            if self.runner is not None:
                return self.runner.run(items)
            # texts: batches of similar lengths pad less; the outputs go back in the rows' order
            part, restore = self.family.ordered(self.family.inference_part(self.state, items))
            outputs, _ = collect_outputs(self.model, part.batches(self.family.predict_batch), self.device)
            return self.state.decode(outputs if restore is None else outputs[restore])

    def _empty(self) -> np.ndarray:
        return np.empty((0, self.state.n_outputs) if self.task == "classification" else 0)

    def predict_proba(self, data: Any) -> np.ndarray:
        if self.task != "classification":
            raise TypeError("predict_proba is for classification runs; use predict")
        return self.decoded(data)

    def predict(self, data: Any) -> np.ndarray:
        """Original labels (classification) or values in original units (regression)."""
        decoded = self.decoded(data)
        if self.task == "classification":
            return self.state.labels(decoded.argmax(axis=1))
        return decoded

    def predict_frame(self, items: Any) -> pd.DataFrame:
        """The rows of a predictions file: the input's own columns (or names) plus `prediction` and, for
        classification, one `proba_<class>` column per class."""
        return self.family.output_frame(self.state, items, self.decoded(items))
