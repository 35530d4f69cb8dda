"""Printing shared by the verbs: a finished run and headline metrics."""

from __future__ import annotations

from typing import Any


def fmt(value: Any) -> str:
    if value is None:
        return "null"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def headline(task: str, metrics: dict[str, Any]) -> str:
    from danlu.evaluation.metrics import SUMMARY_KEYS

    return "  ".join(f"{k}={fmt(metrics[k])}" for k in SUMMARY_KEYS[task] if metrics.get(k) is not None)


def print_run(run, extra: list[tuple[str, Any]] = ()) -> None:
    report = run.report
    test = report["test"] or {}
    epochs = f"{report['epochs_run']} epoch{'s' if report['epochs_run'] != 1 else ''}"
    lines = [
        ("run", run.path),
        (report.get("test_split", "test"), headline(report["task"], test) if test else "no held-out rows"),
        (
            "training",
            f"{report['train_seconds']:.1f} s, {epochs} (best {report['best_epoch']})",
        ),
        ("report", run.dir.report),
        ("plots", run.dir.plots),
        *extra,
    ]
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        print(f"{name:<{width}}  {value}")


def table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, the header underlined."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(f"{cell!s:<{w}}" for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
