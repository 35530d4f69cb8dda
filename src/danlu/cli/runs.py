"""danlu runs: the runs under a folder, and two runs compared."""

from __future__ import annotations

import json

from danlu.errors import DanluError


def add_runs(sub) -> None:
    p = sub.add_parser(
        "runs",
        help="list the runs under a folder, or compare two",
        description="`danlu runs [DIR]`: a table of the runs under DIR (default runs/): state, family, "
        "task, test metrics, seconds, when. `danlu runs compare A B`: the config keys that differ and "
        "the metrics side by side.",
    )
    p.add_argument("args", nargs="*", metavar="DIR | compare A B", help="a folder, or: compare RUN_A RUN_B")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run_runs)


def run_runs(args) -> int:
    from danlu.tracking.runs import compare, list_runs

    if args.args[:1] == ["compare"]:
        if len(args.args) != 3:
            raise DanluError("compare takes two runs", "danlu runs compare runs/a runs/b")
        result = compare(args.args[1], args.args[2])
        print(json.dumps(result, indent=2) if args.json else comparison_table(result))
        return 0
    if len(args.args) > 1:
        raise DanluError("danlu runs takes one folder", "danlu runs runs/, or danlu runs compare A B")
    rows = list_runs(args.args[0] if args.args else "runs")
    print(json.dumps(rows, indent=2) if args.json else runs_table(rows))
    return 0


def runs_table(rows: list[dict]) -> str:
    from danlu.cli.output import headline, table

    if not rows:
        return "no runs"
    body = [
        [
            row["path"],
            row["state"],
            row["family"] or "",
            row["task"] or "",
            headline(row["task"], row["test"]) if row["test"] and row["task"] else "",
            "" if row["seconds"] is None else f"{row['seconds']:.1f}",
            "" if row["epochs"] is None else str(row["epochs"]),
            row["when"],
        ]
        for row in rows
    ]
    return table(["run", "state", "family", "task", "test", "seconds", "epochs", "when"], body)


def comparison_table(result: dict) -> str:
    from danlu.cli.output import fmt, table

    a, b = result["runs"]
    config = [[k, _cell(v[0]), _cell(v[1])] for k, v in result["config"].items()]
    metrics = []
    for name, (x, y) in result["metrics"].items():
        change = f"{y - x:+.4g}" if x is not None and y is not None else ""
        metrics.append([name, fmt(x), fmt(y), change])
    parts = [
        table(["config", a, b], config) if config else "the configs are the same",
        table(["metric", a, b, "b - a"], metrics),
    ]
    return "\n\n".join(parts)


def _cell(value) -> str:
    return "(unset)" if value is None else str(value)
