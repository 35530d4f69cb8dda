"""Peak memory of training on a 4 GB float32 NPY file: danlu's chunked path vs loading it whole.

Writes a 2-D float32 NPY (default 50M rows x 20 columns = 4.0 GB: 19 features and a 0/1 target), then in
separate child processes measures peak RSS (ru_maxrss) of
  - the usual start of a training script: np.load + torch.from_numpy of the whole file, and
  - `danlu train` for one epoch with data.in_memory=auto (the file is over the default budget, so danlu
    trains from disk in chunks: fitting preprocessing, training, validating and testing in streaming passes).

    python benchmarks/out_of_memory.py [--rows 50000000] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

COLUMNS = 20


def write_npy(path: Path, rows: int, chunk: int = 1_000_000) -> None:
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, COLUMNS))
    rng = np.random.default_rng(0)
    weights = rng.normal(size=COLUMNS - 1).astype(np.float32)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        x = rng.normal(size=(n, COLUMNS - 1)).astype(np.float32)
        array[start : start + n, :-1] = x
        array[start : start + n, -1] = (x @ weights + rng.normal(scale=0.5, size=n) > 0).astype(np.float32)
    array.flush()
    del array


def peak_rss_of(command: list[str]) -> tuple[float, float, str]:
    """Run a child process; return its own peak RSS in GB (from wait4), wall seconds and its output."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if process.returncode != 0:
        raise SystemExit(f"{command} failed:\n{text}")
    return usage.ru_maxrss * 1024 / 1e9, time.perf_counter() - start, text.strip()  # ru_maxrss is in KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000_000)
    parser.add_argument(
        "--budget-gb",
        type=float,
        default=None,
        help="data.memory_budget_gb (default: danlu's own, a quarter of available RAM)",
    )
    parser.add_argument("--dir", default=None, help="where to write the NPY file (needs its size free)")
    parser.add_argument("--write", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        write_npy(Path(args.write), args.rows)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "big.npy"
        # Written by a child: a forked child's peak RSS starts at its parent's RSS, so the parent stays small.
        subprocess.run([sys.executable, __file__, "--write", str(path), "--rows", str(args.rows)], check=True)
        size_gb = path.stat().st_size / 1e9
        gib = size_gb * 1e9 / 2**30
        print(f"wrote {path.name}: {args.rows:,} rows x {COLUMNS} float32 = {size_gb:.2f} GB ({gib:.2f} GiB)")
        budget = f", memory_budget_gb: {args.budget_gb}" if args.budget_gb else ""
        config = Path(tmp) / "big.yaml"
        config.write_text(
            textwrap.dedent(f"""\
            data: {{train: {path}, target: x{COLUMNS - 1}, task: classification{budget}}}
            model: {{hidden: [64]}}
            train: {{epochs: 1, batch_size: 4096}}
            output: {tmp}/run
            """)
        )
        danlu_gb, danlu_s, out = peak_rss_of([sys.executable, "-m", "danlu", "-q", "train", str(config)])
        load = f"import numpy, torch; a = numpy.load('{path}'); t = torch.from_numpy(a); print(t.shape)"
        naive_gb, naive_s, _ = peak_rss_of([sys.executable, "-c", load])
    print(out)
    print(f"{'':44}{'peak RSS':>10}{'seconds':>9}")
    print(f"{'np.load + torch.from_numpy (no training yet)':44}{naive_gb:>8.2f} GB{naive_s:>9.0f}")
    print(f"{'danlu train, 1 epoch, chunked from disk':44}{danlu_gb:>8.2f} GB{danlu_s:>9.0f}")
    print(f"danlu peak RSS is {100 * danlu_gb / size_gb:.0f}% of the file size")


if __name__ == "__main__":
    main()
