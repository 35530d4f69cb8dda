"""A user-defined model for tests of model.target (importable through PYTHONPATH=tests)."""

import torch
from torch import nn


class TwoLayer(nn.Module):
    def __init__(self, in_features: int, out_features: int, width: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class WithCategoricals(nn.Module):
    def __init__(self, in_features: int, out_features: int, cardinalities: list[int]):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(c, 2) for c in cardinalities)
        self.head = nn.Linear(in_features + 2 * len(cardinalities), out_features)

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        parts = [x_num] + [e(x_cat[:, j]) for j, e in enumerate(self.embeddings)]
        return self.head(torch.cat(parts, dim=1))
