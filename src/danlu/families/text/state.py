"""The text family's fitted state: the text column, the token limit, where the tokenizer and the
encoder's config come from, and the target's classes; stored as preprocess.json.

While training, the tokenizer and encoder are read from model.pretrained; a finished run reads them from
its own RUN/hf/ (bound by `bind`), so a run directory serves and exports without the original one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu.families.target import FamilyState, Target


@dataclass
class TextState(FamilyState):
    text_column: str
    max_length: int
    pretrained: str  # the encoder directory the run started from
    pad_id: int
    head: Target
    fingerprint: str = ""  # of the tokenizer files: a tokenization cache is valid only for the same one
    run_hf: Path | None = None  # set for a finished run: RUN/hf
    _tokenizer: Any = field(default=None, repr=False, compare=False)

    family = "text"

    @property
    def model_dir(self) -> Path:
        """Where the tokenizer and the encoder's config are read from."""
        return self.run_hf if self.run_hf is not None else Path(self.pretrained)

    def tokenizer(self):
        if self._tokenizer is None:
            from danlu.families.text.pretrained import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    def json_fields(self) -> dict[str, Any]:
        return {
            "text_column": self.text_column,
            "max_length": self.max_length,
            "pretrained": self.pretrained,
            "pad_id": self.pad_id,
            "tokenizer_fingerprint": self.fingerprint,
            "input": "input_ids and attention_mask, int64 [batch, tokens]; tokenizer files in RUN/hf",
        }

    @classmethod
    def from_json_fields(cls, data: dict[str, Any], head: Target) -> TextState:
        return cls(
            data["text_column"],
            data["max_length"],
            data["pretrained"],
            data["pad_id"],
            head,
            data.get("tokenizer_fingerprint", ""),
        )
