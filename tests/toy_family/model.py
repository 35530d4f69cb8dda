"""An MLP over the standardized sequence (the standardization inside, so exports take raw numbers)."""

from __future__ import annotations

import torch
from torch import nn

from tests.toy_family.state import SequenceState


class SequenceMLP(nn.Module):
    def __init__(self, state: SequenceState, hidden: list[int]) -> None:
        super().__init__()
        self.mean, self.std = state.mean, state.std
        layers: list[nn.Module] = []
        width = state.length
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, state.n_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


MODELS = {"mlp": SequenceMLP}


def build_model(config, state: SequenceState) -> nn.Module:
    return MODELS["mlp"](state, config.hidden or [32])
