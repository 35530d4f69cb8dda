"""danlu's trainer vs the PyTorch tutorial loop and sklearn's MLPClassifier, on the same data, split and seed.

The tutorial: make_classification (100k rows, 10 features, 3 classes), StandardScaler fitted on the
training split, a 10-20-3 MLP, Adam lr 1e-3, CrossEntropyLoss, batch 1024, DataLoader(TensorDataset,
shuffle=True), test loss / macro precision / recall every 5 epochs. danlu trains the same model with the
same recipe from a config (validating on the same test rows every 5 epochs, writing checkpoints).
sklearn's MLPClassifier trains the same network (one hidden layer of 20 ReLUs, softmax output) with the
same optimizer (Adam, lr 1e-3, no L2 penalty), batch size and epoch count on the same scaled rows, with
early stopping off.

    python benchmarks/train_tabular.py [--epochs 101] [--device cpu|cuda]

On cuda the tutorial loop moves each batch to the GPU (`xb.to(device)`), as GPU tutorials do.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.datasets import make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import precision_score, recall_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import danlu
from danlu.api import QUICKSTART

SEED = 42


def make_data():
    x, y = make_classification(
        n_samples=100_000,
        n_features=10,
        n_informative=5,
        n_redundant=2,
        n_classes=3,
        n_clusters_per_class=1,
        flip_y=0.05,
        random_state=SEED,
    )
    return train_test_split(x.astype(np.float32), y, test_size=0.2, random_state=SEED, stratify=y)


def tutorial_loop(x_train, x_test, y_train, y_test, epochs: int, device: str) -> tuple[float, float]:
    """The usual tutorial code, as written in countless notebooks."""
    scaler = StandardScaler().fit(x_train)
    x_train = torch.tensor(scaler.transform(x_train), dtype=torch.float32)
    x_test = torch.tensor(scaler.transform(x_test), dtype=torch.float32).to(device)
    y_train, y_test = torch.tensor(y_train), torch.tensor(y_test).to(device)
    torch.manual_seed(SEED)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=1024, shuffle=True)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad()
            loss = criterion(model(xb), yb)
            loss.backward()
            optimizer.step()
        if epoch % 5 == 0:
            model.eval()
            with torch.no_grad():
                out = model(x_test)
                pred = out.argmax(1)
                criterion(out, y_test).item()
                precision_score(y_test.cpu(), pred.cpu(), average="macro", zero_division=0)
                recall_score(y_test.cpu(), pred.cpu(), average="macro", zero_division=0)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return seconds, accuracy


def sklearn_mlp(x_train, x_test, y_train, y_test, epochs: int) -> tuple[float, float]:
    scaler = StandardScaler().fit(x_train)
    model = MLPClassifier(
        hidden_layer_sizes=(20,),
        solver="adam",
        learning_rate_init=1e-3,
        alpha=0.0,  # no L2 penalty: torch's Adam here has no weight decay
        batch_size=1024,
        max_iter=epochs,
        shuffle=True,
        random_state=SEED,
        tol=0.0,
        n_iter_no_change=epochs + 1,  # every epoch runs
    )
    x = scaler.transform(x_train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter reached: the point here
        start = time.perf_counter()
        model.fit(x, y_train)
        seconds = time.perf_counter() - start
    return seconds, float(model.score(scaler.transform(x_test), y_test))


def danlu_run(
    x_train, x_test, y_train, y_test, epochs: int, device: str, workdir: Path
) -> tuple[float, float, float]:
    columns = [f"x{j}" for j in range(10)]
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        pd.DataFrame(x, columns=columns).assign(label=y).to_parquet(workdir / f"{name}.parquet", index=False)
    config = {
        "data": {
            "train": str(workdir / "train.parquet"),
            "validation": str(workdir / "test.parquet"),
            "test": str(workdir / "test.parquet"),
            "target": "label",
        },
        # the quickstart's recipe is the tutorial's: a 10-20-3 MLP, Adam 1e-3, batch 1024, eval every 5 epochs
        "model": QUICKSTART["model"],
        "train": {
            **QUICKSTART["train"],
            "epochs": epochs,
            "restore_best": False,
            "seed": SEED,
            "device": device,
        },
    }
    start = time.perf_counter()
    run = danlu.train(config, out=workdir / "run", progress=False)
    wall = time.perf_counter() - start
    return run.report["train_seconds"], wall, run.report["test"]["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=101)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    data = make_data()
    with tempfile.TemporaryDirectory() as tmp:
        d_seconds, d_wall, d_acc = danlu_run(*data, args.epochs, args.device, Path(tmp))
    s_seconds, s_acc = sklearn_mlp(*data, args.epochs)
    t_seconds, t_acc = tutorial_loop(*data, args.epochs, args.device)
    where = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    )
    print(f"{args.epochs} epochs, 80,000 training rows, batch 1024, torch {torch.__version__}, {where}")
    print(f"{'':28}{'loop seconds':>14}{'test accuracy':>15}")
    print(f"{'tutorial DataLoader loop':28}{t_seconds:>14.2f}{t_acc:>15.4f}")
    print(f"{'sklearn MLPClassifier':28}{s_seconds:>14.2f}{s_acc:>15.4f}")
    print(f"{'danlu train':28}{d_seconds:>14.2f}{d_acc:>15.4f}")
    print(f"speed-up (training loop)    {t_seconds / d_seconds:.1f}x over the tutorial loop, ", end="")
    print(f"{s_seconds / d_seconds:.2f}x over sklearn")
    print(
        f"danlu end to end (load, preprocess, train, checkpoints, report, plots): {d_wall:.2f} s "
        f"= {t_seconds / d_wall:.1f}x faster than the tutorial loop alone"
    )
    print(f"accuracy difference          {100 * (d_acc - t_acc):+.2f} points")


if __name__ == "__main__":
    main()
