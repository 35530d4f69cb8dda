"""The model with its preprocessing folded in: raw numeric values (NaN for missing) and categorical codes in,
probabilities or values in original units out. Every export format traces this one module."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from danlu.data.preprocess import Preprocessor
from danlu.errors import DanluError


class ServingModule(nn.Module):
    """Mean imputation, missing indicators and standardization, the model, then softmax or un-scaling."""

    def __init__(self, model: nn.Module, pre: Preprocessor) -> None:
        super().__init__()
        if not pre.numeric:
            raise DanluError(
                "export needs at least one numeric feature; this run has only categorical ones",
                "serve it with `danlu serve --engine torch` instead",
            )
        self.model = model.eval()
        self.classification = pre.task == "classification"
        self.has_categorical = bool(pre.categorical)
        self.register_buffer("mean", torch.tensor([c.mean for c in pre.numeric], dtype=torch.float32))
        self.register_buffer("std", torch.tensor([c.std for c in pre.numeric], dtype=torch.float32))
        indicators = [j for j, c in enumerate(pre.numeric) if c.indicator]
        self.register_buffer("indicators", torch.tensor(indicators, dtype=torch.long))
        self.target_mean, self.target_std = float(pre.target_mean), float(pre.target_std)

    def forward(self, numeric: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        missing = torch.isnan(numeric)
        x = (torch.where(missing, self.mean, numeric) - self.mean) / self.std
        if self.indicators.numel():
            x = torch.cat([x, missing[:, self.indicators].to(x.dtype)], dim=1)
        out = self.model(x, codes) if self.has_categorical else self.model(x)
        if self.classification:
            return torch.softmax(out, dim=1)
        return out.reshape(-1) * self.target_std + self.target_mean


def example_inputs(pre: Preprocessor, rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of the right shapes for tracing (more than one row, so the batch axis stays dynamic).
    Models see the codes only when the run has categorical features, as in `danlu.inference.forward`."""
    return torch.zeros(rows, len(pre.numeric)), torch.zeros(rows, len(pre.categorical), dtype=torch.long)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporter's and quantizer's warnings and log lines about their own internals."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = logging.root.manager.disable  # the caller's own logging.disable level, restored after
        logging.disable(max(before, logging.WARNING))
        try:
            yield
        finally:
            logging.disable(before)
