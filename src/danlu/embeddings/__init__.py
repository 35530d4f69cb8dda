"""Embeddings and zero-shot labels from encoder models in local Hugging Face directories (imported lazily:
danlu.embeddings.detect answers which directories hold one without importing torch)."""

from __future__ import annotations

from typing import Any

__all__ = ["ImageTextEncoder", "TextEncoder", "load_encoder", "load_image_text"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from danlu.embeddings import encoders

        return getattr(encoders, name)
    raise AttributeError(f"module 'danlu.embeddings' has no attribute '{name}'")
