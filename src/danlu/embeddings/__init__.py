"""Embeddings and zero-shot labels from encoder models in local Hugging Face directories."""

from danlu.embeddings.encoders import ImageTextEncoder, TextEncoder, load_encoder, load_image_text

__all__ = ["ImageTextEncoder", "TextEncoder", "load_encoder", "load_image_text"]
