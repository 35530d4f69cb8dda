"""The run directory: the one contract between training and every later stage.

```
runs/NAME/
  config.yaml        resolved config
  preprocess.json    fitted preprocessing (JSON, never pickle)
  model.safetensors  inference weights
  heldout.json       which rows were held out, and fingerprints of the data files
  heldout.parquet    the held-out rows themselves, when small (images: heldout.npz; else heldout.npy:
                     their row numbers)
  checkpoints/       last.pt, best.pt (full training state)
  metrics.jsonl      one JSON line per epoch
  report.json        written last: a run is complete only when it exists
  plots/             PNGs
  export/            written by `danlu export`
  cache/             decoded images over the memory budget (memory-mapped), token ids; safe to delete
  hf/                text runs: the fine-tuned model and tokenizer in Hugging Face format
  tensorboard/       train.log_to tensorboard: TensorBoard's event files
  tracking.json      train.log_to mlflow: the MLflow store, experiment and run id
  trial.json         a trial of `danlu tune`: its number, parameters, state (complete, pruned) and value
```

danlu deletes only what it can prove it wrote: a directory is replaced only when it is a run (config.yaml
with report.json or checkpoints/) holding nothing but the entries above, or when it is empty. Inside the
run's folders, only danlu's own files go (`written_by_danlu`): checkpoints and cache files by their
names, plots by the Software tag danlu writes into each PNG, exports by the verification record beside
them, hf/ by the list of files danlu wrote there; anything a user put in them stays.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from danlu.errors import DanluError, not_utf8

log = logging.getLogger("danlu")
DAMAGED = "the run directory is damaged: restore the file or train again"  # the fix for a file cut short
CONFIG = "config.yaml"
PREPROCESS = "preprocess.json"
WEIGHTS = "model.safetensors"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
METRICS = "metrics.jsonl"
REPORT = "report.json"
PLOTS = "plots"
EXPORT = "export"
HELDOUT = "heldout.json"
HELDOUT_ROWS = "heldout.parquet"
HELDOUT_INDEX = "heldout.npy"
HELDOUT_IMAGES = "heldout.npz"
PREDICTIONS = "predictions.csv"  # written by `danlu quickstart`
SAMPLES = "samples.jsonl"  # fine-tuned language models: `danlu evaluate`'s answers to held-out questions
CACHE = "cache"  # decoded data danlu can rebuild: safe to delete, never packaged
HF = "hf"  # text and causal-LM runs: the model and tokenizer for transformers' from_pretrained
ADAPTER = "adapter"  # causal-LM runs with LoRA: the adapter for peft's PeftModel.from_pretrained
TENSORBOARD = "tensorboard"  # train.log_to tensorboard: the event files
TRACKING = "tracking.json"  # train.log_to mlflow: where the run is tracked (store, experiment, run id)
TUNE_TRIAL = "trial.json"  # a `danlu tune` trial: its number, parameters, state and value
EVENT_FILE = re.compile(r"^events\.out\.tfevents\.\d+\.")  # TensorBoard's event files
EXPORT_SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}  # `danlu export` formats and their files
MANIFEST = ".danlu-files.json"  # in a folder danlu fills (hf/): the names of the files it wrote there
PLOT_SOFTWARE = "danlu"  # the Software tag of every PNG danlu draws
CACHE_NAME = re.compile(r"^[a-z]+-[0-9a-f]{16}[-.]")  # KIND-KEY.npz, KIND-KEY-SPLIT.npy: cache files
# Every name danlu writes at the top of a run directory: only these are ever deleted from one.
RUN_ENTRIES = frozenset(
    {CONFIG, PREPROCESS, WEIGHTS, CHECKPOINTS, METRICS, REPORT, PLOTS, EXPORT, HELDOUT, HELDOUT_ROWS}
    | {HELDOUT_INDEX, HELDOUT_IMAGES, PREDICTIONS, SAMPLES, CACHE, HF, ADAPTER, TENSORBOARD, TRACKING}
    | {TUNE_TRIAL}
)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file so that readers see the old content or the whole new content, never a part.

    `write` receives a binary file object for a temporary file beside `path`; it is fsynced and
    renamed over `path` only after `write` returns.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # The rename itself must reach the disk, or a power loss can bring back the old name.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def export_record_path(path: Path) -> Path:
    """The verification record `danlu export` writes beside an exported file: PATH.json."""
    return path.with_name(path.name + ".json")


def is_export_record(path: Path) -> bool:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(record, dict) and {"format", "max_abs_diff", "metric"} <= record.keys()


def check_export_target(path: Path) -> None:
    """Raise unless PATH (and its PATH.json record) may be written: new, or an earlier danlu export.

    An existing file counts as danlu's only when the verification record beside it is danlu's."""
    record = export_record_path(path)
    for target in (path, record):
        if target.is_dir():
            raise DanluError(f"'{target}' is a directory", f"pass a file path, e.g. -o {target}/model.onnx")
    if (path.exists() or record.exists()) and not is_export_record(record):
        existing = path if path.exists() else record
        raise DanluError(
            f"'{existing}' exists and was not written by `danlu export`; nothing was replaced",
            "choose another -o path, or move that file away yourself",
        )


def export_target(run_dir: str | Path, fmt: str, quantize: str | None, out: str | Path | None) -> Path:
    """Where `danlu export` writes a run's export: OUT, or RUN/export/model[.int8].SUFFIX; raises unless
    it may be written (check_export_target). Needs no torch: the CLI asks before loading the model."""
    path = Path(out) if out is not None else RunDir(run_dir).export_path(fmt, quantize)
    check_export_target(path)
    return path


def _is_danlu_png(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path, formats=["PNG"]) as image:
            return str(image.info.get("Software", "")).startswith(PLOT_SOFTWARE)
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def _manifest(folder: Path) -> set[str]:
    try:
        names = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return set()
    return {n for n in names if isinstance(n, str)} | {MANIFEST} if isinstance(names, list) else set()


def written_by_danlu(folder: str, path: Path) -> bool:
    """Whether a file in one of a run's folders is one danlu wrote (and so may delete)."""
    name = path.name
    if _is_temporary(name):
        return True
    if folder == CHECKPOINTS:
        if path.parent.name != CHECKPOINTS:  # a sharded checkpoint's folder, or one being written
            return _is_shard_file(path)
        return name in (LAST_CHECKPOINT, BEST_CHECKPOINT)
    if folder == CACHE:
        return bool(CACHE_NAME.match(name))
    if folder == PLOTS:
        return name.endswith(".png") and _is_danlu_png(path)
    if folder == EXPORT:
        return is_export_record(path) or is_export_record(export_record_path(path))
    if folder == TENSORBOARD:
        return bool(EVENT_FILE.match(name))
    return name in _manifest(path.parent)


class RunDir:
    """Paths and completeness of one run directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config = property(lambda self: self.path / CONFIG)
    preprocess = property(lambda self: self.path / PREPROCESS)
    weights = property(lambda self: self.path / WEIGHTS)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    last_checkpoint = property(lambda self: self.path / CHECKPOINTS / LAST_CHECKPOINT)
    best_checkpoint = property(lambda self: self.path / CHECKPOINTS / BEST_CHECKPOINT)
    metrics = property(lambda self: self.path / METRICS)
    report = property(lambda self: self.path / REPORT)
    plots = property(lambda self: self.path / PLOTS)
    export = property(lambda self: self.path / EXPORT)
    heldout = property(lambda self: self.path / HELDOUT)
    cache = property(lambda self: self.path / CACHE)
    hf = property(lambda self: self.path / HF)
    adapter = property(lambda self: self.path / ADAPTER)
    tensorboard = property(lambda self: self.path / TENSORBOARD)
    tracking = property(lambda self: self.path / TRACKING)
    trial = property(lambda self: self.path / TUNE_TRIAL)

    def export_path(self, fmt: str, quantize: str | None = None) -> Path:
        """Where `danlu export` writes by default: export/model[.int8].onnx|pt."""
        return self.export / f"model{'.int8' if quantize else ''}{EXPORT_SUFFIXES[fmt]}"

    def is_complete(self) -> bool:
        return self.report.is_file()

    def require_complete(self) -> None:
        """Raise unless this is a finished run (report.json exists)."""
        if not self.path.is_dir():
            raise DanluError(
                f"run directory '{self.path}' does not exist",
                "pass the directory that `danlu train` wrote, e.g. runs/quickstart",
            )
        if not self.is_complete():
            raise DanluError(
                f"run directory '{self.path}' is not a finished run (no {REPORT})",
                f"finish it with `danlu train --resume {self.path}` or train again",
            )

    def require_resumable(self) -> None:
        """Raise unless this is a stopped run with a checkpoint to continue from."""
        name = self.path
        if not self.config.is_file():
            raise DanluError(f"'{name}' is not a run directory (no {CONFIG})", "pass the run's directory")
        if self.is_complete():
            raise DanluError(f"run '{name}' is already complete", "train a new run, or evaluate this one")
        if not self.last_checkpoint.is_file():
            raise DanluError(f"run '{name}' stopped before its first checkpoint", "train it again")

    def is_own_run(self) -> bool:
        """The marks of a run danlu wrote: config.yaml, and report.json or checkpoints/."""
        return self.config.is_file() and (self.report.is_file() or self.checkpoints.is_dir())

    def check_new(self, overwrite: bool) -> None:
        """Raise unless a new run may be written here: a new or empty directory, or (with overwrite) a run
        of danlu's that holds nothing but its own files. Touches nothing."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise DanluError(f"'{path}' is a file, not a run directory", "choose another --out directory")
        if not path.is_dir() or not any(path.iterdir()):
            return
        if not self.is_own_run():
            raise DanluError(
                f"'{path}' is not empty and is not a danlu run (no {CONFIG} with {REPORT} or {CHECKPOINTS}/);"
                " danlu replaces only its own runs",
                "choose a new or empty --out directory",
            )
        if not overwrite:
            raise DanluError(
                f"run directory '{path}' already exists",
                f"continue it with `danlu train --resume {path}`, "
                "choose another with --out, or pass --overwrite",
            )
        foreign = sorted(entry.name for entry in path.iterdir() if not _is_run_entry(entry.name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise DanluError(
                f"run directory '{path}' also holds files danlu did not write ({shown}); nothing was deleted",
                "move them out of the run directory, or choose another --out",
            )
        if path.resolve() in (Path.home().resolve(), Path(path.anchor or "/").resolve()):
            raise DanluError(f"refusing to replace '{path}'", "choose another --out directory")

    def prepare_new(self, overwrite: bool) -> bool:
        """Make an empty directory for a new run; returns whether it was created (not there before).

        Raises:
            DanluError: the directory is not empty and not one of danlu's runs, or (without overwrite)
                an existing run.
        """
        self.check_new(overwrite)
        created = not self.path.exists()
        self.remove_entries()
        self.path.mkdir(parents=True, exist_ok=True)
        return created

    def remove_entries(self) -> None:
        """Delete what danlu writes in a run directory, and nothing else; the directory itself stays, and
        so do a user's files inside the run's folders (and those folders, then)."""
        if not self.path.is_dir():
            return
        # The report first, so an interrupted clean-up never leaves a run that looks complete.
        self.report.unlink(missing_ok=True)
        kept = []
        for entry in self.path.iterdir():
            if not _is_run_entry(entry.name):
                continue
            if entry.is_dir() and not entry.is_symlink() and _is_temporary(entry.name):
                shutil.rmtree(entry)  # a folder danlu was writing when it stopped (.hf.writing.tmp)
            elif entry.is_dir() and not entry.is_symlink():
                kept += _remove_own_files(entry)
            else:
                entry.unlink(missing_ok=True)
        if kept:
            log.info("kept %d file(s) danlu did not write: %s", len(kept), ", ".join(kept[:5]))

    def discard(self, created: bool) -> None:
        """Undo `prepare_new` after a failed set-up: remove what danlu wrote, and the directory if new."""
        self.remove_entries()
        if created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only when empty

    def read_report(self) -> dict[str, Any]:
        self.require_complete()
        return read_json(self.report)

    def read_preprocess(self) -> str:
        """preprocess.json's text, which the family parses (families.state_from_json), checked to be JSON."""
        text = _read_text(self.preprocess)
        read_json(self.preprocess, text)
        return text

    def read_metrics(self) -> list[dict[str, Any]]:
        """One record per epoch. The file is appended a line at a time, so a run killed as it wrote one
        leaves a last line without its end: that line is no record (resume writes the file again)."""
        if not self.metrics.is_file():
            return []
        text = _read_text(self.metrics)
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            try:
                json.loads(lines[-1])
            except ValueError:
                lines.pop()
        return [read_json(self.metrics, line, number) for number, line in enumerate(lines, 1) if line.strip()]


def read_json(path: Path, text: str | None = None, line: int | None = None) -> Any:
    """A JSON file danlu wrote into a run (or TEXT, its LINE), parsed. One cut short or edited into
    something else since is one line naming it, not a traceback.

    Raises:
        DanluError: the file is not JSON.
    """
    try:
        return json.loads(_read_text(path) if text is None else text)
    except ValueError as exc:
        where = f"'{path}'" + (f" line {line}" if line is not None else "")
        raise DanluError(f"cannot read {where}: not JSON ({exc})", DAMAGED) from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc, DAMAGED) from None


_TEMPORARY = re.compile(r"^\..+\.[^.]+\.tmp$")  # atomic_write's temporaries: .NAME.XXXXXX.tmp


# what torch.distributed.checkpoint writes in a sharded checkpoint's folder (checkpoints/shards-EPOCH/,
# or .shards-EPOCH.writing.tmp while it is written)
_SHARD_FOLDER = re.compile(r"^(shards-\d{6}|\.shards-\d{6}\.writing\.tmp)$")
# danlu's ZeRO fragments, one file per rank (training/zero_checkpoint.py): its rank and the ranks' number
ZERO_FILE = re.compile(r"zero-(\d{5})-of-(\d{5})\.safetensors")
# torch.distributed.checkpoint's files, and the ZeRO fragments
_SHARD_FILE = re.compile(rf"^(\.metadata|__\d+_\d+\.distcp|{ZERO_FILE.pattern})$")


def _is_shard_file(path: Path) -> bool:
    return (
        path.parent.parent.name == CHECKPOINTS
        and bool(_SHARD_FOLDER.match(path.parent.name))
        and bool(_SHARD_FILE.match(path.name))
    )


def _is_temporary(name: str) -> bool:
    return bool(_TEMPORARY.match(name))


def remove_shards(folder: Path) -> list[str]:
    """Delete a sharded checkpoint's folder (checkpoints/shards-EPOCH/ or its temporary) file by file as
    danlu wrote it, and the folder once empty; returns the files of anyone else's, which stay."""
    return _remove_own_files(folder, CHECKPOINTS)


def _remove_own_files(folder: Path, kind: str | None = None) -> list[str]:
    """Delete danlu's files in one of a run's folders (kind: which, by default the folder's own name)
    and the folder once empty; returns the others, relative to the folder's parent."""
    entries = sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True)  # deepest first
    files = [p for p in entries if p.is_symlink() or not p.is_dir()]
    own = {p for p in files if written_by_danlu(kind or folder.name, p)}  # decided before any is deleted
    for path in own:
        path.unlink(missing_ok=True)
    for path in [*(p for p in entries if p not in files), folder]:
        with contextlib.suppress(OSError):
            path.rmdir()  # only when empty
    return [str(p.relative_to(folder.parent)) for p in files if p not in own]


def replace_folder(written: Path, target: Path) -> None:
    """Move a folder danlu has just written beside `target` into its place. An earlier one there goes
    first, file by file as danlu wrote it (a run finished again after a stop); a file of anyone else's in
    it is refused, and nothing is moved."""
    if target.exists():
        kept = _remove_own_files(target)
        if kept:
            raise DanluError(
                f"'{target}' holds files danlu did not write ({', '.join(kept[:3])})",
                "move them out of the run directory",
            )
    written.rename(target)


def _is_run_entry(name: str) -> bool:
    if name in RUN_ENTRIES or name.startswith("heldout."):  # a family's stored held-out rows
        return True
    match = _TEMPORARY.match(name)
    return bool(match) and any(name.startswith(f".{entry}.") for entry in (*RUN_ENTRIES, "heldout"))
