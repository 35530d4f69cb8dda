"""Prepare, on a machine with network access, what the GPU checks need on a CUDA machine without it (a
PyTorch image that cannot download danlu's other needs): one folder, KIT, with

  wheels/     every package danlu[serve,chat,text,finetune,gpu] and the GPU tests need, at the versions
              .venv has (the ones `make test` tests together), for that machine's Python; except torch, its
              CUDA libraries and the scientific stack every PyTorch image has (SKIP below). bitsandbytes,
              which .venv (a CPU build) lacks, comes at its newest, trimmed to its libraries for CUDA 13.
  tokenizer/  SmolLM2's tokenizer and chat template, for benchmarks/chat_gpu.py (`--tokenizer`)

Then, on the GPU machine, from the checkout with KIT in it: tools/gpu_check.sh KIT. It unpacks the wheels
over the image's packages (no resolver, no network) and runs tests/gpu and benchmarks/chat_gpu.py.

Run: .venv/bin/python tools/gpu_kit.py [--out .gpu-kit] [--python 3.12] (about 45 MiB; .gpu-kit is
ignored by git). An existing OUT is replaced only when this script made it (its kit.json); else refused.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import NoReturn

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("serve", "chat", "text", "finetune", "gpu")
TESTS = ("openai", "httpx", "pytest-timeout")  # what tests/gpu imports beyond danlu's own needs
# torch with its CUDA libraries, and the scientific stack with what it pulls in: every PyTorch image has
# them, and the wheels would not fit a device call (numpy, pandas, pyarrow and scipy alone are over 100 MB)
SKIP = {
    "torch", "triton", "sympy", "mpmath", "networkx", "filelock", "fsspec", "setuptools", "numpy", "pandas",
    "pyarrow", "scipy", "scikit-learn", "joblib", "threadpoolctl", "matplotlib", "contourpy", "cycler",
    "fonttools", "kiwisolver", "pyparsing", "pillow", "python-dateutil", "six", "tzdata", "psutil",
    "pyyaml", "markupsafe", "jinja2", "packaging", "pytest", "pluggy", "iniconfig", "pygments", "uvloop",
}  # fmt: skip
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 28, 31, 34, 35)] + ["manylinux2014_x86_64"]
MARKER = "kit.json"  # what this script wrote into OUT: the packages and the Python they are for
CUDA_KEEP = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")  # the image's torch is built for CUDA 13


def closure(roots: list[Requirement], python: str) -> dict[str, str]:
    """name -> version in this environment of every package the requirements need, transitively, with the
    markers evaluated for the target's Python (extras followed); SKIP left out with what only it needs."""
    environment = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0"}
    versions: dict[str, str] = {}
    followed: set[tuple[str, frozenset[str]]] = set()  # (name, extras) whose requirements were read
    todo = [(r, "") for r in roots]
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({**environment, "extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        if name in SKIP or name.startswith("nvidia-") or (name, frozenset(requirement.extras)) in followed:
            continue
        followed.add((name, frozenset(requirement.extras)))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if name == "bitsandbytes":  # GPU only: not in a CPU .venv, fetched at its newest
                versions[name] = ""
                continue
            fail(f"{name} is needed but not in this environment: make setup")
        versions[name] = dist.version
        for line in dist.requires or []:
            todo.extend((Requirement(line), wanted) for wanted in requirement.extras or {""})
    return versions


def download(packages: dict[str, str], python: str, folder: Path) -> None:
    specs = [f"{n}=={v}" if v else n for n, v in sorted(packages.items())]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", python, "--implementation", "cp", *platforms, "--dest", str(folder), *specs],
        check=True,
    )  # fmt: skip


def trim_bitsandbytes(folder: Path) -> None:
    """bitsandbytes' wheel holds a library per CUDA version (over 120 MB unpacked): keep CUDA 13's."""
    for wheel in folder.glob("bitsandbytes-*.whl"):
        trimmed = wheel.with_suffix(".trimmed")
        with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as target:
            for item in source.infolist():
                if not item.filename.endswith(".so") or CUDA_KEEP.search(item.filename):
                    target.writestr(item, source.read(item))
        trimmed.replace(wheel)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / ".gpu-kit"))
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (major.minor)")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            fail(f"{out} is not empty and not a kit this script made: choose another --out")
        shutil.rmtree(out)
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    project = Requirement(f"danlu[{','.join(EXTRAS)}]")
    needed = closure([project, *map(Requirement, TESTS)], args.python)
    needed.pop("danlu")  # the checkout itself: on PYTHONPATH there
    print(f"{len(needed)} packages for Python {args.python} ({project}, tests: {', '.join(TESTS)})")
    download(needed, args.python, wheels)
    trim_bitsandbytes(wheels)
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "chat_gpu.py"),
            "--save-tokenizer",
            str(out / "tokenizer"),
        ],
        check=True,
    )
    (out / MARKER).write_text(json.dumps({"python": args.python, "packages": needed}, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB; on the GPU machine: tools/gpu_check.sh {out.name}")


def fail(message: str) -> NoReturn:
    """One line naming the problem and the fix, exit 2."""
    print(f"gpu_kit: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
