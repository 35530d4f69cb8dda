"""Training throughput of `danlu train` with 1, 2, ... processes (torchrun; gloo on CPU, one GPU each with
nccl), the same global batch and data, and the scaling efficiency against one process.

    python benchmarks/scaling.py [--nproc 1 2] [--rows 200000] [--epochs 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--hidden", default="[512, 512]")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "scale.yaml"
        config.write_text(
            f"data: {{train: 'synthetic:classification', synthetic: {{n_samples: {args.rows}}}, "
            f"val_fraction: 0.05, test_fraction: 0.05}}\n"
            f"model: {{hidden: {args.hidden}, dropout: 0.0}}\n"
            f"train: {{epochs: {args.epochs}, batch_size: {args.batch_size}, device: {args.device}, "
            f"eval_every: {args.epochs}}}\n"
        )
        for n in args.nproc:
            out = Path(tmp) / f"run{n}"
            command = [sys.executable, "-m", "danlu", "-q", "train", str(config), "--out", str(out)]
            subprocess.run([*command, "--nproc", str(n)], check=True, stdout=subprocess.DEVNULL)
            report = json.loads((out / "report.json").read_text())
            results[n] = (
                report["rows"]["train"] * args.epochs / report["train_seconds"],
                report["test"]["accuracy"],
            )
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU cores, gloo"
    print(f"{args.rows:,} rows, MLP {args.hidden}, global batch {args.batch_size}, {args.epochs} epochs")
    print(f"on {where}")
    print(f"{'processes':>10}{'samples/s':>12}{'speed-up':>10}{'efficiency':>12}{'accuracy':>10}")
    base = results[args.nproc[0]][0] / args.nproc[0]
    for n, (rate, accuracy) in results.items():
        print(f"{n:>10}{rate:>12,.0f}{rate / (base * 1):>9.2f}x{rate / (base * n):>11.0%}{accuracy:>10.4f}")


if __name__ == "__main__":
    main()
