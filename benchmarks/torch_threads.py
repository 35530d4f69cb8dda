"""Why a danlu server runs every torch call on one thread: torch's parallel CPU kernels slow down once a
second thread has used them.

Each case runs in a fresh process: the forward pass of a 2048-wide MLP (10-2048-2048-2048-3, one row,
inference mode) timed on the main thread; on a worker thread when only that thread ever ran torch (how
`danlu serve` loads, warms up and predicts: serve/batching.py, TorchThread); and on a worker thread
after the main thread ran one parallel operation (how a server that loads its model on the main thread
and predicts on an executor thread runs).

    python benchmarks/torch_threads.py
"""

from __future__ import annotations

import subprocess
import sys

CHILD = r"""
import sys, time, torch
from concurrent.futures import ThreadPoolExecutor
from torch import nn
case = sys.argv[1]
torch.manual_seed(0)
layers = [nn.Linear(10, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU()]
model, x = nn.Sequential(*layers, nn.Linear(2048, 3)).eval(), torch.randn(1, 10)

def per_forward(n=2000):
    with torch.inference_mode():
        for _ in range(200):
            model(x)
        start = time.perf_counter()
        for _ in range(n):
            model(x)
        return (time.perf_counter() - start) / n * 1e3

if case == "main":
    print(per_forward())
else:
    if case == "worker-after-main":
        torch.randn(2048, 2048).add_(1)  # one parallel op on the main thread, as loading weights does
    print(ThreadPoolExecutor(1).submit(per_forward).result())
"""

CASES = {
    "main": "the main thread",
    "worker": "a worker thread, the only one that ran torch",
    "worker-after-main": "a worker thread, after the main thread ran torch",
}


def main() -> None:
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per forward pass, best of 3")
    for case, label in CASES.items():
        command = [sys.executable, "-c", CHILD, case]
        runs = [subprocess.run(command, capture_output=True, text=True, check=True) for _ in range(3)]
        runs = [float(run.stdout) for run in runs]
        print(f"{label:52}{min(runs):8.3f}")


if __name__ == "__main__":
    main()
