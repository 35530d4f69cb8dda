"""What training minimizes and evaluation measures, by task.

- classification and regression: a loss per row on the model's outputs (cross-entropy, MSE), the unit
  of a batch is a row, and the metrics come from a `MetricStream`;
- generation (causal language models): the model itself returns the summed cross-entropy of the
  batch's trained tokens (those whose label is not IGNORE), the unit is a trained token, and the
  metrics are the mean token loss and its perplexity (`TokenStream`).

The trainer scales each micro-batch's mean loss by its units' share of the global batch's units, so N
processes or K micro-batches give one process's gradient whatever the unit."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from danlu.config import CLASSIFICATION_MONITORS, GENERATION_MONITORS, REGRESSION_MONITORS
from danlu.data.batches import Batch
from danlu.evaluation.metrics import MetricStream

IGNORE = -100  # the label of a token that is not trained (PyTorch's cross-entropy ignore_index)


def trained_tokens(labels: torch.Tensor | np.ndarray) -> int:
    """Tokens that count in the loss of labels [rows, tokens]: the model predicts position i from the
    tokens before it, so position 0 never counts."""
    return int((labels[:, 1:] != IGNORE).sum())


class TokenStream:
    """The token-level loss of a split, fed batch by batch: mean cross-entropy per trained token, and
    its perplexity."""

    task = "generation"

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.n = 0  # trained tokens

    def add(self, loss_sum: float, tokens: int) -> None:
        self.loss_sum += loss_sum
        self.n += tokens

    def result(self) -> dict[str, Any]:
        loss = self.loss_sum / self.n if self.n else None
        perplexity = math.exp(min(loss, 700.0)) if loss is not None else None  # exp(700) still fits a float
        return {"loss": loss, "perplexity": perplexity, "tokens": self.n}

    def epoch_result(self) -> dict[str, float | None]:
        return {"perplexity": self.result()["perplexity"]}


class RowLoss:
    """Classification (cross-entropy on logits) and regression (MSE on standardized values), per row."""

    def __init__(self, task: str, classes: list[Any] | None) -> None:
        self.task, self.classes = task, classes
        self.monitors = CLASSIFICATION_MONITORS if task == "classification" else REGRESSION_MONITORS

    def _criterion(self, reduction: str) -> nn.Module:
        return (
            nn.CrossEntropyLoss(reduction=reduction)
            if self.task == "classification"
            else nn.MSELoss(reduction=reduction)
        )

    def _shaped(self, out: torch.Tensor) -> torch.Tensor:
        return out.squeeze(-1) if self.task == "regression" else out

    def loss(self, out: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, int]:
        """(the mean loss over the batch's rows, rows)"""
        return self._criterion("mean")(self._shaped(out), batch.target), batch.rows

    def stream(self) -> MetricStream:
        return MetricStream(self.task, self.classes)

    def update(self, stream: MetricStream, state: Any, outputs: np.ndarray, targets: np.ndarray) -> float:
        """Add one evaluated batch to the stream; returns its summed loss."""
        out, y = torch.from_numpy(outputs), torch.from_numpy(targets)
        loss = float(self._criterion("sum")(self._shaped(out), y))
        stream.update(state.decode_target(targets), state.decode(outputs))
        return loss


class TokenLoss:
    """Causal language models: the model's output is the summed cross-entropy of the trained tokens of
    the batch (computed inside it, only where a token is trained); its target holds the labels."""

    task = "generation"
    monitors = GENERATION_MONITORS

    def loss(self, out: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, int]:
        """(the mean loss over the batch's trained tokens, trained tokens)"""
        tokens = trained_tokens(batch.target)
        return out / max(tokens, 1), tokens

    def stream(self) -> TokenStream:
        return TokenStream()

    def update(self, stream: TokenStream, state: Any, outputs: np.ndarray, targets: np.ndarray) -> float:
        loss = float(np.sum(outputs, dtype=np.float64))
        stream.add(loss, trained_tokens(targets))
        return loss


def objective_for(state: Any) -> RowLoss | TokenLoss:
    """The objective of a family's fitted state, by its task."""
    if state.task == "generation":
        return TokenLoss()
    return RowLoss(state.task, state.classes)
