"""Tabular models: an MLP with categorical embeddings or one-hot inputs, or the user's own module."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from danlu.config import ModelConfig
from danlu.families.tabular.preprocess import Preprocessor
from danlu.models.custom import build_custom

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
NORMALIZATIONS = {"none": None, "batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm}


def embedding_size(cardinality: int, configured: int | None) -> int:
    return configured or min(16, (cardinality + 1) // 2)


class TabularMLP(nn.Module):
    def __init__(
        self,
        n_numeric: int,
        cardinalities: list[int],
        n_outputs: int,
        hidden: list[int],
        activation: str = "relu",
        dropout: float = 0.0,
        normalization: str = "none",
        categorical: str = "embedding",
        embedding_dim: int | None = None,
    ):
        super().__init__()
        self.cardinalities = list(cardinalities)
        self.onehot = categorical == "onehot"
        if self.onehot:
            self.embeddings = nn.ModuleList()
            width = n_numeric + sum(cardinalities)
        else:
            self.embeddings = nn.ModuleList(
                nn.Embedding(c, embedding_size(c, embedding_dim)) for c in cardinalities
            )
            width = n_numeric + sum(e.embedding_dim for e in self.embeddings)
        layers: list[nn.Module] = []
        norm = NORMALIZATIONS[normalization]
        for size in hidden:
            layers.append(nn.Linear(width, size))
            if norm is not None:
                layers.append(norm(size))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, n_outputs))
        self.layers = nn.Sequential(*layers)

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor | None = None) -> torch.Tensor:
        parts = [x_num]
        if x_cat is not None and self.cardinalities:
            if self.onehot:
                parts += [F.one_hot(x_cat[:, j], c).to(x_num.dtype) for j, c in enumerate(self.cardinalities)]
            else:
                parts += [emb(x_cat[:, j]) for j, emb in enumerate(self.embeddings)]
        return self.layers(torch.cat(parts, dim=1) if len(parts) > 1 else x_num)


DEFAULTS = {"type": "mlp", "hidden": [256, 256], "dropout": 0.1}


def build_mlp(config: ModelConfig, pre: Preprocessor) -> TabularMLP:
    return TabularMLP(
        pre.n_numeric_inputs,
        pre.cardinalities,
        pre.n_outputs,
        config.hidden if config.hidden is not None else DEFAULTS["hidden"],
        activation=config.activation,
        dropout=config.dropout if config.dropout is not None else DEFAULTS["dropout"],
        normalization=config.normalization,
        categorical=config.categorical,
        embedding_dim=config.embedding_dim,
    )


MODELS = {"mlp": build_mlp}


def build_model(config: ModelConfig, pre: Preprocessor) -> nn.Module:
    """The configured model, called as model(x_num) or, with categorical columns, model(x_num, x_cat).

    A user's class (model.target) is built as Class(in_features, out_features[, cardinalities], **kwargs)."""
    if config.target is not None:
        inputs = {"in_features": pre.n_numeric_inputs, "out_features": pre.n_outputs}
        if pre.categorical:
            inputs["cardinalities"] = pre.cardinalities
        return build_custom(config, **inputs)
    return MODELS["mlp" if config.type == "auto" else config.type](config, pre)
