"""A causal-LM run's fitted state, stored as preprocess.json: the model it started from, the chat template
it trains and serves with (its source, so the run needs no other file to render a conversation), the
token limit, which tokens are trained, and the end-of-turn tokens.

While training, the tokenizer comes from model.pretrained; a finished run reads it from its own RUN/hf/
(bound by `bind`), which also holds the template and the merged model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu.families.target import FamilyState, Target

TASK = "generation"


@dataclass
class CausalLMState(FamilyState):
    pretrained: str  # the model directory or GGUF file the run started from
    template_name: str  # "model" (the tokenizer's own), a built-in's name, or a Jinja file's name
    template: str  # the Jinja source the run renders conversations with
    max_length: int
    loss_on: str
    end_ids: list[int]  # the tokens that end an assistant turn (trained after every answer)
    pad_id: int
    # file name -> size and SHA-256 of the weights the run started from: a LoRA run's checkpoints hold the
    # adapter alone, and resume reads the base again, which must be the same
    pretrained_weights: dict[str, Any] = field(default_factory=dict)
    head: Target = field(default_factory=lambda: Target(TASK, "assistant"))
    run_hf: Path | None = None  # set for a finished run: RUN/hf
    _tokenizer: Any = field(default=None, repr=False, compare=False)

    family = "causal_lm"

    def json_fields(self) -> dict[str, Any]:
        return {
            "pretrained": self.pretrained,
            "template_name": self.template_name,
            "template": self.template,
            "max_length": self.max_length,
            "loss_on": self.loss_on,
            "end_ids": self.end_ids,
            "pad_id": self.pad_id,
            "pretrained_weights": self.pretrained_weights,
            "input": "conversations (messages) rendered by the template; the model and tokenizer in RUN/hf",
        }

    @classmethod
    def from_json_fields(cls, data: dict[str, Any], head: Target) -> CausalLMState:
        return cls(
            data["pretrained"],
            data["template_name"],
            data["template"],
            data["max_length"],
            data["loss_on"],
            list(data["end_ids"]),
            data["pad_id"],
            data.get("pretrained_weights", {}),
            head,
        )
