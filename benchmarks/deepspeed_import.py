"""DeepSpeed's import on this machine: `import torch, deepspeed` as a user's training script writes it,
against danlu's `import_deepspeed()` (DeepSpeed without the MLflow import its autotuner makes whenever
MLflow is installed), each in a fresh interpreter, in turns, best of --rounds. Every ZeRO rank and the
end of every causal LM run (transformers' save_pretrained imports DeepSpeed when installed) pays it.

    python benchmarks/deepspeed_import.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time

CASES = {
    "import torch, deepspeed": "import torch, deepspeed",
    "danlu's import_deepspeed()": (
        "import torch\nfrom danlu.training.strategies import import_deepspeed\nimport_deepspeed()"
    ),
    "import torch alone (the floor)": "import torch",
}


def seconds(code: str) -> float:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}  # as danlu sets it: no probing for accelerators
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if importlib.util.find_spec("deepspeed") is None:
        sys.exit("DeepSpeed is not installed: pip install 'danlu[deepspeed]'")
    mlflow = "installed" if importlib.util.find_spec("mlflow") else "not installed (nothing to hold back)"
    print(f"MLflow {mlflow}; best of {args.rounds} fresh interpreters each, in turns")
    best = {name: float("inf") for name in CASES}
    for _ in range(args.rounds):
        for name, code in CASES.items():
            best[name] = min(best[name], seconds(code))
    for name, value in best.items():
        print(f"  {name:32s} {value:6.2f} s")


if __name__ == "__main__":
    main()
