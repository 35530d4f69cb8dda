"""Model registry: config -> nn.Module, for the built-in architectures and the user's own classes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from danlu.config import ModelConfig
from danlu.models.custom import build_custom
from danlu.models.mlp import build_mlp


@dataclass(frozen=True)
class ModelInputs:
    """What the data gives a model: numeric input width, categorical cardinalities, output width."""

    n_numeric: int
    cardinalities: list[int]
    n_outputs: int


MODELS = {"mlp": build_mlp}


def build_model(config: ModelConfig, inputs: ModelInputs) -> nn.Module:
    """Build the configured model. Its forward takes (x_num) or, with categoricals, (x_num, x_cat)."""
    if config.target is not None:
        return build_custom(config, inputs)
    return MODELS[config.type](config, inputs)
