"""Peak memory (max RSS) and time to the first training step of one epoch on a folder of 28x28
grayscale PNGs (MNIST's size), at 600 and at 60,000 files, each run in a fresh process, side by side:

  tutorial       a per-sample Dataset that opens each PNG in the DataLoader loop (the examples/mnist way)
  danlu          every image read once (hashed, checked, decoded) into one uint8 tensor in memory
  danlu mapped   data.memory_budget_gb below the decoded size: decoded once into RUN/cache/ and mapped

All train at batch 64 (the tutorial's). "first step" is the time from the process's start (imports
included) to its first optimizer step; "workers" is the largest peak of the processes danlu forks to
read files (their pages are shared with the parent until written; 0 when it read them itself). The
goal: danlu's peak at 60,000 files within 100 MiB of its peak at 600.

Run: python benchmarks/images_memory.py [--images 60000] [--small 600]
(To measure another danlu checkout with this same script: PYTHONPATH=THAT/src python benchmarks/...)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
from pathlib import Path
kind, folder, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
first = []
register_optimizer_step_pre_hook(lambda *_: first.append(time.perf_counter() - start) if not first else None)
if kind == "tutorial":
    sys.path.insert(0, str(Path(sys.argv[4])))
    from torch.nn import functional as F
    from train_images import Net, PerSampleDataset
    loader = torch.utils.data.DataLoader(PerSampleDataset(folder), batch_size=64, shuffle=True)
    model = Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    for data, target in loader:
        optimizer.zero_grad()
        F.nll_loss(model(data), target).backward()
        optimizer.step()
else:
    import danlu
    extra = ["data.memory_budget_gb=0.01"] if kind == "mapped" else []
    danlu.train(None, [f"data.train={folder}", "train.epochs=1", "train.precision=fp32",
                       "train.batch_size=64", *extra], out=out, progress=False)
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "workers_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "first_step": first[0], "seconds": time.perf_counter() - start}))
"""


def write_folder(root: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / str(i % 10)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--small", type=int, default=600)
    args = parser.parse_args()
    here = Path(__file__).resolve().parent
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.small, args.images):
            started = time.perf_counter()
            folder = write_folder(Path(tmp) / f"images-{n}", n)
            print(f"wrote {n:,} PNGs in {time.perf_counter() - started:.0f} s", flush=True)
            for kind in ("tutorial", "danlu", "mapped"):
                out = Path(tmp) / f"run-{kind}-{n}"
                result = subprocess.run(
                    [sys.executable, "-c", CHILD, kind, str(folder), str(out), str(here)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                rows.append((kind, n, json.loads(result.stdout.strip().splitlines()[-1])))
    print("one epoch on 28x28 PNGs at batch 64, each run in a fresh process")
    print(f"{'':14}{'files':>8}{'peak RSS MiB':>14}{'workers MiB':>13}{'first step s':>14}{'seconds':>10}")
    for kind, n, f in rows:
        print(
            f"{kind:14}{n:8,}{f['peak_mib']:14.0f}{f['workers_mib']:13.0f}{f['first_step']:14.2f}"
            f"{f['seconds']:10.1f}"
        )
    peaks = {(kind, n): f["peak_mib"] for kind, n, f in rows}
    for kind in ("danlu", "mapped"):
        grown = peaks[(kind, args.images)] - peaks[(kind, args.small)]
        print(f"{kind}: {args.images:,} files peak {grown:+.0f} MiB over {args.small:,} (goal: at most +100)")


if __name__ == "__main__":
    main()
