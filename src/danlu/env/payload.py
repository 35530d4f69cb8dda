"""What `danlu package` copies into a build context: the files a run or a chat model needs to serve and
nothing else, without following links out of a run, and with hard-linked files copied once."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path

from danlu.errors import DanluError
from danlu.run import CONFIG, EXPORT, PREPROCESS, REPORT, WEIGHTS, RunDir

# What every run's server reads (and a family's serve_files besides: texts' hf/)
RUN_SERVING = (CONFIG, PREPROCESS, WEIGHTS, REPORT)
# What transformers reads of a chat model directory: configs, safetensors weights, tokenizer files, the
# chat template. Pickled weights (*.bin, *.pt), other frameworks' files, READMEs and the rest stay out.
CHAT_MODEL_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
    "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model", "chat_template.*",
    "preprocessor_config.json",
)  # fmt: skip


def run_files(run: RunDir, serve_files: tuple[str, ...], engine: str) -> Callable[[Path], bool]:
    """Whether a path (relative to the run) is one its server needs: weights, config, state, report, the
    family's serving files and, for --engine onnx, the ONNX export and its verification record."""
    onnx = run.export_path("onnx").relative_to(run.path)
    wanted_export = {onnx, onnx.with_name(onnx.name + ".json")} if engine == "onnx" else set()

    def wanted(relative: Path) -> bool:
        top = relative.parts[0]
        if top == EXPORT:
            return relative in wanted_export or any(w.is_relative_to(relative) for w in wanted_export)
        return top in RUN_SERVING or top in serve_files

    return wanted


def model_files(relative: Path) -> bool:
    """Whether a path of a chat model directory is one transformers reads: its top-level files by name
    (no folder: .git/, onnx/ and the like stay out)."""
    return len(relative.parts) == 1 and any(fnmatch(relative.name, p) for p in CHAT_MODEL_FILES)


def _check_link(path: Path, root: Path) -> None:
    target = path.resolve()
    if not target.is_relative_to(root):
        raise DanluError(
            f"'{path}' is a link to '{target}', outside '{root}'; danlu packages only what is inside it",
            "replace the link with the file itself, or move the file out of the run",
        )


def plan(source: Path, wanted: Callable[[Path], bool], links_may_leave: bool) -> tuple[list[Path], list[str]]:
    """(files to copy, entries left out), as paths relative to source. Links are followed; with
    links_may_leave False, one that leads out of source is an error (DanluError)."""
    root = source.resolve()
    files, left_out, seen = [], [], set()
    for folder, dirs, names in os.walk(source, followlinks=True):
        here = Path(folder)
        real = here.resolve()
        if real in seen:  # a link back to a folder already copied
            dirs[:] = []
            continue
        seen.add(real)
        kept = []
        for name in sorted(dirs):
            relative = (here / name).relative_to(source)
            if not wanted(relative):
                left_out.append(f"{relative}/")
                continue
            if (here / name).is_symlink() and not links_may_leave:
                _check_link(here / name, root)
            kept.append(name)
        dirs[:] = kept
        for name in sorted(names):
            path = here / name
            relative = path.relative_to(source)
            if not wanted(relative):
                left_out.append(str(relative))
                continue
            if path.is_symlink() and not links_may_leave:
                _check_link(path, root)
            files.append(relative)
    return files, left_out


def copy_tree(
    source: Path,
    target: Path,
    wanted: Callable[[Path], bool],
    links_may_leave: bool = False,
    progress: bool = False,
) -> list[str]:
    """Copy the files under source that `wanted` keeps into target; returns what was left out. Files
    hard-linked to each other (a text run's hf/model.safetensors is its model.safetensors) are copied
    once, at the shallowest path, and the others become relative symlinks to it: Docker's COPY does not
    keep hard links, and the image would hold the weights twice. Links are copied as what they point at.
    With progress, a bar of the bytes copied when they are PROGRESS_BYTES or more (a model's weights).

    Raises:
        DanluError: with links_may_leave False, a link that leads out of source."""
    files, left_out = plan(source, wanted, links_may_leave)
    inodes, sizes = {}, {}
    for relative in files:
        info = (source / relative).stat()
        sizes[relative] = info.st_size
        if info.st_nlink > 1 and not (source / relative).is_symlink():
            inodes.setdefault((info.st_dev, info.st_ino), []).append(relative)
    first = {}  # each linked inode's one real copy: its shallowest name
    for names in inodes.values():
        real = min(names, key=lambda r: (len(r.parts), str(r)))
        first.update({name: real for name in names if name != real})
    target.mkdir(parents=True, exist_ok=True)
    total = sum(size for relative, size in sizes.items() if relative not in first)
    with copy_bar(total, progress) as bar:
        for relative in files:
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            if relative in first:
                destination.symlink_to(os.path.relpath(target / first[relative], destination.parent))
            else:
                copy_file(source / relative, destination, bar)
    return left_out


PROGRESS_BYTES = 64 * 2**20  # less copies in well under a second: no bar
CHUNK_BYTES = 16 * 2**20


def copy_bar(total: int, progress: bool):
    """A bar of the bytes copied (tqdm, on stderr); shown with progress and PROGRESS_BYTES or more."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc="copy",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress or total < PROGRESS_BYTES,
    )


def copy_file(source: Path, destination: Path, bar=None) -> None:
    """shutil.copy2 (contents, then permissions and times); under a shown bar, in CHUNK_BYTES pieces, each
    counted on it."""
    if bar is None or bar.disable:
        shutil.copy2(source, destination)
        return
    with open(source, "rb") as reader, open(destination, "wb") as writer:
        while chunk := reader.read(CHUNK_BYTES):
            writer.write(chunk)
            bar.update(len(chunk))
    shutil.copystat(source, destination)
