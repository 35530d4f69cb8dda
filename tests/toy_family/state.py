"""The toy family's fitted state: the sequence length, the training values' mean and std, the target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from danlu.families.target import FamilyState, Target


@dataclass
class SequenceState(FamilyState):
    length: int
    mean: float
    std: float
    head: Target

    family = "sequence"

    def json_fields(self) -> dict[str, Any]:
        return {"length": self.length, "mean": self.mean, "std": self.std}

    @classmethod
    def from_json_fields(cls, data: dict[str, Any], head: Target) -> SequenceState:
        return cls(data["length"], data["mean"], data["std"], head)
