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
import resource
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
    """Run a child process; return its peak RSS in GB, wall seconds and the tail of its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{command} failed:\n{result.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise SystemExit("a child's peak RSS was not above an earlier child's; run each measurement alone")
    return peak / 2**20, seconds, result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000_000)
    parser.add_argument("--dir", default=None, help="where to write the NPY file (needs its size free)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "big.npy"
        start = time.perf_counter()
        write_npy(path, args.rows)
        size_gb = path.stat().st_size / 2**30
        print(
            f"wrote {path.name}: {args.rows:,} rows x {COLUMNS} float32 = {size_gb:.2f} GB "
            f"in {time.perf_counter() - start:.0f} s"
        )
        config = Path(tmp) / "big.yaml"
        config.write_text(
            textwrap.dedent(f"""\
            data: {{train: {path}, target: x{COLUMNS - 1}, task: classification}}
            model: {{hidden: [64]}}
            train: {{epochs: 1, batch_size: 4096}}
            output: {tmp}/run
            """)
        )
        # Children run one at a time; ru_maxrss of RUSAGE_CHILDREN is the largest so far, so measure the
        # smaller (danlu) first and the larger (load whole) second.
        danlu_gb, danlu_s, out = peak_rss_of([sys.executable, "-m", "danlu", "-q", "train", str(config)])
        load = f"import numpy, torch; a = numpy.load('{path}'); t = torch.from_numpy(a); print(t.shape)"
        naive_gb, naive_s, _ = peak_rss_of([sys.executable, "-c", load])
    print(out)
    print(f"{'':44}{'peak RSS':>10}{'seconds':>9}")
    print(f"{'np.load + torch.from_numpy (no training yet)':44}{naive_gb:>8.2f} GB{naive_s:>9.0f}")
    print(f"{'danlu train, 1 epoch, chunked from disk':44}{danlu_gb:>8.2f} GB{danlu_s:>9.0f}")
    print(f"danlu peak RSS is {100 * danlu_gb / size_gb:.0f}% of the file size (target: under 1.5 GB)")


if __name__ == "__main__":
    main()
