"""DeepSpeed's engine start on a CPU machine that has never run ZeRO: `deepspeed.initialize` as a user's
script calls it, against danlu's `start_deepspeed` (the same call, with DeepSpeed's CPU backend started
without building its shared-memory all-reduce, a C++ extension only DeepSpeed's inference calls), each
in a fresh interpreter with an empty torch extensions folder, then DeepSpeed's own start again once its
build is cached. One process (a gloo group of one), ZeRO stage 1, a small model: the start is what is
timed, and it is the same in every rank of a larger run.

    python benchmarks/deepspeed_start.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = """
import os, sys, time
import torch
import torch.distributed as dist
from danlu.training.strategies import import_deepspeed

dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
optimizer = torch.optim.AdamW(model.parameters())
config = {"train_batch_size": 8, "zero_optimization": {"stage": 1}}
deepspeed = import_deepspeed()
started = time.perf_counter()
if sys.argv[1] == "danlu":
    from danlu.training.sharding import start_deepspeed

    start_deepspeed(model, optimizer, config)
else:
    config.update(zero_allow_untested_optimizer=True, steps_per_print=2**31 - 1)
    deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
print(time.perf_counter() - started)
"""


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def start(how: str, extensions: Path) -> tuple[float, float, int]:
    """Seconds in the engine's start, seconds of the whole process, files the start wrote."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(extensions)}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")  # as torchrun sets them for its one process
    began = time.perf_counter()
    ran = subprocess.run(
        [sys.executable, "-c", START, how, free_port()], env=env, capture_output=True, text=True
    )
    whole = time.perf_counter() - began
    if ran.returncode != 0:
        sys.exit(f"{how}'s start failed:\n{ran.stderr[-2000:]}")
    built = sum(1 for p in extensions.rglob("*") if p.is_file())
    return float(ran.stdout.strip().splitlines()[-1]), whole, built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.parse_args()
    if importlib.util.find_spec("deepspeed") is None:
        sys.exit("DeepSpeed is not installed: pip install 'danlu[deepspeed]'")
    with tempfile.TemporaryDirectory() as tmp:
        cases = [
            ("deepspeed.initialize, first run", "deepspeed", Path(tmp, "deepspeed")),
            ("danlu's start_deepspeed, first run", "danlu", Path(tmp, "danlu")),
            ("deepspeed.initialize, build cached", "deepspeed", Path(tmp, "deepspeed")),
        ]
        print(f"{'':38s} {'start':>8s} {'process':>8s} {'files in the extensions folder':>31s}")
        for name, how, extensions in cases:
            extensions.mkdir(exist_ok=True)
            engine, whole, built = start(how, extensions)
            print(f"{name:38s} {engine:7.1f}s {whole:7.1f}s {built:31d}")


if __name__ == "__main__":
    main()
