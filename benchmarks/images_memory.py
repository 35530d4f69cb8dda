"""Peak memory (max RSS) of one training epoch on a 60,000-image folder (28x28 grayscale PNGs, MNIST's
size), each run in a fresh process, side by side:

  tutorial       a per-sample Dataset that opens each PNG in the DataLoader loop (the examples/mnist way)
  danlu          every image decoded once into one uint8 tensor in memory (47 MB of pixels)
  danlu mapped   data.memory_budget_gb below the decoded size: decoded once into RUN/cache/ and mapped

Run: python benchmarks/images_memory.py [--images 60000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
kind, folder, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
start = time.perf_counter()
if kind == "tutorial":
    sys.path.insert(0, str(Path(sys.argv[4])))
    import torch
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
    danlu.train(None, [f"data.train={folder}", "train.epochs=1", "train.precision=fp32", *extra],
                out=out, progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mib": peak, "seconds": time.perf_counter() - start}))
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
    args = parser.parse_args()
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        folder = write_folder(Path(tmp) / "images", args.images)
        print(f"wrote {args.images:,} PNGs in {time.perf_counter() - started:.0f} s")
        rows = []
        for kind in ("tutorial", "danlu", "mapped"):
            out = Path(tmp) / f"run-{kind}"
            result = subprocess.run(
                [sys.executable, "-c", CHILD, kind, str(folder), str(out), str(here)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append((kind, json.loads(result.stdout.strip().splitlines()[-1])))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"one epoch on {args.images:,} 28x28 PNGs (this script's own peak: {baseline:.0f} MiB)")
    print(f"{'':12}{'peak RSS MiB':>14}{'seconds':>10}")
    for kind, figures in rows:
        print(f"{kind:12}{figures['peak_mib']:14.0f}{figures['seconds']:10.1f}")


if __name__ == "__main__":
    main()
