"""danlu with default settings vs sklearn's MLP and LightGBM with theirs, on real tabular data.

Data sets that PyPI packages ship: sklearn's breast_cancer (binary), wine (3 classes), diabetes
(regression) and palmerpenguins (3 classes, categorical columns and missing values). Each is split
80/20 with five seeds; danlu gets only data.train, data.test and data.target. sklearn's MLP gets the
usual preprocessing pipeline (impute, standardize, one-hot), LightGBM the raw frame with pandas
categoricals. Prints the mean and standard deviation of accuracy (classification) or R^2 (regression).

    python benchmarks/real_tabular.py [--seeds 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
from palmerpenguins import load_penguins
from sklearn import datasets
from sklearn.compose import make_column_transformer
from sklearn.impute import SimpleImputer
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

import danlu


def load_sets() -> dict[str, tuple[pd.DataFrame, str, str]]:
    sets = {}
    for name, loader, task in (
        ("breast_cancer", datasets.load_breast_cancer, "classification"),
        ("wine", datasets.load_wine, "classification"),
        ("diabetes", datasets.load_diabetes, "regression"),
    ):
        bunch = loader(as_frame=True)
        sets[name] = (bunch.frame, "target", task)
    sets["penguins"] = (load_penguins().dropna(subset=["species"]), "species", "classification")
    return sets


def score(task: str, y_true, y_pred) -> float:
    return accuracy_score(y_true, y_pred) if task == "classification" else r2_score(y_true, y_pred)


def run_danlu(
    train: pd.DataFrame, test: pd.DataFrame, target: str, task: str, workdir: Path, overrides: list[str]
) -> float:
    train.to_csv(workdir / "train.csv", index=False)
    test.to_csv(workdir / "test.csv", index=False)
    config = {
        "data": {"train": str(workdir / "train.csv"), "test": str(workdir / "test.csv"), "target": target}
    }
    run = danlu.train(config, overrides, out=workdir / "run", overwrite=True, progress=False)
    return score(task, test[target], danlu.load(run.path).predict(test))


def sklearn_pipeline(frame: pd.DataFrame, task: str):
    categorical = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    numeric = [c for c in frame.columns if c not in categorical]
    columns = make_column_transformer(
        (make_pipeline(SimpleImputer(), StandardScaler()), numeric),
        (
            make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore")),
            categorical,
        ),
    )
    model = MLPClassifier(random_state=0) if task == "classification" else MLPRegressor(random_state=0)
    return make_pipeline(columns, model)


def run_sklearn(train, test, target, task) -> float:
    model = sklearn_pipeline(train.drop(columns=target), task).fit(train.drop(columns=target), train[target])
    return score(task, test[target], model.predict(test.drop(columns=target)))


def run_lightgbm(train, test, target, task) -> float:
    def prepare(frame):
        x = frame.drop(columns=target)
        for c in x.columns:
            if not pd.api.types.is_numeric_dtype(x[c]):
                x[c] = pd.Categorical(x[c], categories=sorted(train[c].dropna().unique()))
        return x

    cls = lgb.LGBMClassifier if task == "classification" else lgb.LGBMRegressor
    model = cls(verbose=-1, random_state=0).fit(prepare(train), train[target])
    return score(task, test[target], model.predict(prepare(test)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="danlu config overrides to compare")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # sklearn's MLP warns that 200 iterations did not converge
    results: dict[str, dict[str, list[float]]] = {}
    seconds = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, (frame, target, task) in load_sets().items():
            results[name] = {"danlu": [], "sklearn MLP": [], "LightGBM": []}
            for seed in range(args.seeds):
                stratify = frame[target] if task == "classification" else None
                train, test = train_test_split(frame, test_size=0.2, random_state=seed, stratify=stratify)
                start = time.perf_counter()
                results[name]["danlu"].append(run_danlu(train, test, target, task, Path(tmp), args.overrides))
                seconds += time.perf_counter() - start
                results[name]["sklearn MLP"].append(run_sklearn(train, test, target, task))
                results[name]["LightGBM"].append(run_lightgbm(train, test, target, task))
    if args.overrides:
        print("danlu overrides:", " ".join(args.overrides))
    print(f"mean ± std over {args.seeds} splits (80/20); accuracy for classification, R^2 for regression")
    print(f"{'data set':16}{'metric':10}" + "".join(f"{m:>18}" for m in results["wine"]))
    for name, by_model in results.items():
        metric = "R^2" if name == "diabetes" else "accuracy"
        cells = "".join(f"{np.mean(v):>11.4f} ± {np.std(v):.3f}" for v in by_model.values())
        print(f"{name:16}{metric:10}{cells}")
    print(f"danlu training time, all runs: {seconds:.0f} s")


if __name__ == "__main__":
    main()
