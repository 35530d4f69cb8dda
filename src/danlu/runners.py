"""Running an exported file: ONNX Runtime (`--engine onnx`, export verification) and TorchScript (export
verification), fed by the family's export spec. Below both the Predictor and `danlu export`, so neither
imports the other."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _joined(outputs: list[np.ndarray]) -> np.ndarray:
    return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)


class OnnxRunner:
    """An ONNX Runtime session over a danlu ONNX file (a path or its bytes), on the CPU."""

    def __init__(self, source: str | Path | bytes, spec: Any, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            source if isinstance(source, bytes) else str(source), options, providers=["CPUExecutionProvider"]
        )
        self.spec = spec

    def run(self, items: Any) -> np.ndarray:
        """Probabilities [n, k] or values [n] for a family's items, in the spec's passes."""
        return _joined(
            [self.session.run(None, self.spec.onnx_feeds(part))[0] for part in self.spec.chunks(items)]
        )


class TorchScriptRunner:
    """A loaded danlu TorchScript archive (a path or its bytes), on the CPU."""

    def __init__(self, source: str | Path | bytes, spec: Any) -> None:
        from danlu.quiet import quiet

        with quiet():  # torch.jit announces its own deprecation
            self.module = torch.jit.load(io.BytesIO(source) if isinstance(source, bytes) else str(source))
        self.spec = spec

    @torch.no_grad()
    def run(self, items: Any) -> np.ndarray:
        return _joined(
            [self.module(*self.spec.script_args(part)).numpy() for part in self.spec.chunks(items)]
        )
