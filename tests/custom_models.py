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


class Slow(nn.Module):
    """Sleeps in every forward pass, so a test can hold a request in flight (e.g. across SIGTERM)."""

    def __init__(self, in_features: int, out_features: int, cardinalities: list[int], seconds: float = 1.0):
        super().__init__()
        self.inner = WithCategoricals(in_features, out_features, cardinalities)
        self.seconds = seconds

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(self.seconds)
        return self.inner(x_num, x_cat)
