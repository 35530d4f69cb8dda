"""Rows per second of `danlu predict` on 1,000,000 rows: the torch engine vs the ONNX Runtime engine.

Trains the quickstart model briefly, exports it to ONNX (verified), writes 1M feature rows to Parquet,
then times `predict_file` (read, preprocess, predict, write Parquet) with each engine, and checks that
the two outputs agree.

    python benchmarks/predict_batch.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import danlu
from danlu.api import QUICKSTART, predict_file
from danlu.export import export_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = {**QUICKSTART, "train": {**QUICKSTART["train"], "epochs": 3}}
        run = danlu.train(config, out=root / "run", progress=False)
        check = export_run(run.path, "onnx")
        rng = np.random.default_rng(0)
        frame = pd.DataFrame(
            rng.normal(size=(args.rows, 10)).astype(np.float32), columns=[f"x{j}" for j in range(10)]
        )
        data = root / "rows.parquet"
        frame.to_parquet(data, index=False)
        timings, outputs = {}, {}
        for engine in ("torch", "onnx"):
            out = root / f"{engine}.parquet"
            start = time.perf_counter()
            predict_file(run.path, data, out, engine=engine)
            timings[engine] = time.perf_counter() - start
            outputs[engine] = pd.read_parquet(out)
    proba = [c for c in outputs["torch"].columns if c.startswith("proba_")]
    diff = float((outputs["torch"][proba] - outputs["onnx"][proba]).abs().to_numpy().max())
    agree = float((outputs["torch"]["prediction"] == outputs["onnx"]["prediction"]).mean())
    print(
        f"danlu predict, {args.rows:,} rows (Parquet in and out), quickstart MLP, torch {torch.__version__}"
    )
    print(f"{'engine':<22}{'seconds':>9}{'rows/s':>12}")
    for engine, seconds in timings.items():
        print(f"{engine:<22}{seconds:>9.2f}{args.rows / seconds:>12,.0f}")
    print(f"onnx / torch speed     {timings['torch'] / timings['onnx']:.2f}x")
    print(f"max |proba difference| {diff:.2e}; same predicted class on {100 * agree:.3f}% of rows")
    print(
        f"export verification:   max abs difference {check['max_abs_diff']:.2e} on {check['rows']} test rows"
    )


if __name__ == "__main__":
    main()
