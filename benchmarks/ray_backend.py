"""Wall time of `danlu train --backend ray` with Ray Train's default report polling vs danlu's, and of the
same run under torchrun, with the same config, data and 2 processes.

ray.train.report blocks until Ray Train's controller polls the workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
2 s by default). danlu reports every epoch, so it sets 0.1 s unless the variable is already set; setting
it to 2 here gives Ray's default back.

    python benchmarks/ray_backend.py [--epochs 30] [--rows 2000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        x = rng.normal(size=(args.rows, 8)).astype("float32")
        frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(8)]).assign(label=(x[:, 0] > 0).astype(int))
        frame.to_csv(Path(tmp) / "data.csv", index=False)
        config = Path(tmp) / "ray.yaml"
        config.write_text(
            f"data: {{train: {Path(tmp) / 'data.csv'}, target: label}}\n"
            f"model: {{hidden: [32]}}\ntrain: {{epochs: {args.epochs}, batch_size: 64, patience: 0}}\n"
        )
        base = [sys.executable, "-m", "danlu", "-q", "train", str(config), "--overwrite"]
        ray = [*base, "--backend", "ray", "--workers", "2", "--ray-storage", str(Path(tmp) / "ray_results")]
        env = {k: v for k, v in os.environ.items() if k != "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"}
        rows = [
            ("torchrun --nproc 2", timed([*base, "--out", f"{tmp}/t", "--nproc", "2"], env)),
            ("ray, Ray's default polling (2 s)",
             timed([*ray, "--out", f"{tmp}/r2"], {**env, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"})),
            ("ray, danlu's polling (0.1 s)", timed([*ray, "--out", f"{tmp}/r01"], env)),
        ]  # fmt: skip
    print(f"{args.epochs} epochs, {args.rows} rows, 2 processes")
    for name, seconds in rows:
        print(f"  {name:<34} {seconds:7.1f} s")


if __name__ == "__main__":
    main()
