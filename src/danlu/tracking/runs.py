"""`danlu runs`: the runs under a folder at a glance, and two runs compared (the config keys that differ,
the metrics side by side). Reads run directories only: config.yaml, report.json, trial.json."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from danlu.errors import DanluError
from danlu.run import RunDir, read_json
from danlu.tracking import flatten, numbers

# keys every run has its own value of: not a difference between two configs
_OWN_KEYS = ("output",)


def _state(run: RunDir) -> str:
    """complete; a `danlu tune` trial's pruned or failed; else incomplete (stopped, or training now)."""
    if run.is_complete():
        return "complete"
    try:
        trial = read_json(run.trial)
    except (OSError, DanluError):
        return "incomplete"
    return trial.get("state", "incomplete") if isinstance(trial, dict) else "incomplete"


def _read_config(run: RunDir) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(run.config.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return raw if isinstance(raw, dict) else {}


def describe(path: str | Path) -> dict[str, Any]:
    """One run's row: path, state, family, task, test metrics, train seconds, epochs and when it
    finished (or last changed). A run whose report.json or metrics.jsonl is damaged is listed as such."""
    run = RunDir(path)
    state = _state(run)
    stamp = run.report if state == "complete" else run.config
    try:
        report = run.read_report() if state == "complete" else {}
        epochs = report["epochs_run"] if report else len(run.read_metrics())
    except DanluError:
        state, report, epochs = "damaged", {}, None
    data = _read_config(run).get("data") or {}
    return {
        "path": str(run.path),
        "state": state,
        "family": report.get("family") or data.get("family"),
        "task": report.get("task"),
        "test": report.get("test"),
        "seconds": report.get("train_seconds"),
        "epochs": epochs,
        "when": datetime.fromtimestamp(stamp.stat().st_mtime, timezone.utc).isoformat(timespec="seconds"),
    }


def list_runs(folder: str | Path = "runs") -> list[dict[str, Any]]:
    """Every run directory under `folder` (itself included), in path order; a run's own folders are not
    searched, a search's trials are.

    Raises:
        DanluError: the folder does not exist.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DanluError(f"'{root}' is not a folder", "pass the folder your runs are in, e.g. runs/")
    found = []
    for current, subfolders, _files in os.walk(root):
        if RunDir(current).is_own_run():
            found.append(describe(current))
            subfolders.clear()  # checkpoints/, plots/, hf/: no runs inside a run
        else:
            subfolders.sort()
    return sorted(found, key=lambda row: row["path"])


def _complete(path: str | Path) -> RunDir:
    run = RunDir(path)
    run.require_complete()
    return run


def compare(a: str | Path, b: str | Path) -> dict[str, Any]:
    """Two finished runs side by side: {"config": {key: [a, b]} for every config key that differs,
    "metrics": {name: [a, b]} for the test metrics and training figures of either}.

    Raises:
        DanluError: either is not a finished run.
    """
    runs = (_complete(a), _complete(b))
    configs = [flatten(_read_config(run)) for run in runs]
    keys = sorted(set(configs[0]) | set(configs[1]))
    differing = {
        k: [c.get(k) for c in configs]
        for k in keys
        if k not in _OWN_KEYS and configs[0].get(k) != configs[1].get(k)
    }
    reports = [run.read_report() for run in runs]
    figures = [
        {
            **{f"test_{k}": v for k, v in numbers(r.get("test") or {}).items()},
            **numbers({k: r.get(k) for k in ("train_seconds", "epochs_run", "best_epoch")}),
        }
        for r in reports
    ]
    names = list({**figures[0], **figures[1]})
    return {
        "runs": [str(run.path) for run in runs],
        "config": differing,
        "metrics": {k: [f.get(k) for f in figures] for k in names},
    }
