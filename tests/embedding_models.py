"""Tiny randomly initialised image-text models (CLIP, SigLIP) saved as Hugging Face directories, with a
small real BPE tokenizer and image processor, for the embedding tests."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

CORPUS = [
    "a photo of a cat", "a photo of a dog", "a picture of a car", "the quick brown fox jumps over the dog",
    "a small red bird on a branch", "two cats sleeping on a sofa", "an old car parked in the street",
] * 20  # fmt: skip


def tiny_tokenizer():
    """A byte-level BPE tokenizer that wraps each text in <s> ... </s>, as CLIP's does (</s> is not id 2:
    CLIP's text model reads that id as its original checkpoints' convention and pools elsewhere)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS, vocab_size=300, min_frequency=2, special_tokens=["<pad>", "<s>", "<unk>", "</s>"]
    )
    bpe._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[("<s>", bpe.token_to_id("<s>")), ("</s>", bpe.token_to_id("</s>"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def tiny_image_text(path: Path, kind: str = "clip", seed: int = 0) -> Path:
    """A random CLIPModel or SiglipModel (width 32, 32x32 images in 8x8 patches) with its tokenizer and
    image processor, saved with save_pretrained."""
    import torch
    import transformers

    tokenizer = tiny_tokenizer()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=32, **ids)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)  # fmt: skip
    if kind == "clip":
        config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
        model_class, processor = (
            transformers.CLIPModel,
            transformers.CLIPImageProcessor(
                size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
            ),
        )
    else:
        config = transformers.SiglipConfig(text_config=text, vision_config=vision)
        model_class, processor = (
            transformers.SiglipModel,
            transformers.SiglipImageProcessor(size={"height": 32, "width": 32}),
        )
    torch.manual_seed(seed)
    model = model_class(config)
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        processor.save_pretrained(path)
    return path
