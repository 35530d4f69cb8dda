"""The `danlu` command: parse arguments, call the library, print. Imports torch only inside a verb."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from danlu import __version__
from danlu.errors import DanluError

EXAMPLES = """examples:
  danlu quickstart                                   train the tutorial workload end to end
  danlu train cfg.yaml train.epochs=5 model.hidden=[64,32] --out runs/small
  danlu train --resume runs/small                    continue a stopped run
  danlu evaluate runs/small [test.csv] [--json]      metrics on the test split or on a file
  danlu predict runs/small new.csv -o predictions.csv
"""


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _headline(task: str, metrics: dict[str, Any]) -> str:
    from danlu.evaluation.metrics import SUMMARY_KEYS

    return "  ".join(f"{k}={_fmt(metrics[k])}" for k in SUMMARY_KEYS[task] if metrics.get(k) is not None)


def _print_run(run, extra: list[tuple[str, Any]] = ()) -> None:
    report = run.report
    test = report["test"] or {}
    lines = [
        ("run", run.path),
        (report.get("test_split", "test"), _headline(report["task"], test) if test else "no held-out rows"),
        (
            "training",
            f"{report['train_seconds']:.1f} s, {report['epochs_run']} epochs (best {report['best_epoch']})",
        ),
        ("report", run.dir.report),
        ("plots", run.dir.plots),
        *extra,
    ]
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        print(f"{name:<{width}}  {value}")


def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train from a YAML config, with KEY=VALUE overrides (values parsed as YAML), "
        "into a run directory (default: runs/<config name>).",
    )
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.epochs=5 model.hidden=[64,32]"
    )
    p.add_argument("--out", help="run directory (default: output in the config, else runs/<config name>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(run=run_train)


def run_train(args) -> int:
    import danlu

    if args.resume:
        run = danlu.train(
            args.config, args.overrides, out=args.out, resume=args.resume, progress=not args.quiet
        )
    else:
        if not args.config:
            raise DanluError(
                "no config given", "run `danlu train CONFIG.yaml` or `danlu train --resume RUN_DIR`"
            )
        if "=" in args.config and not args.config.endswith((".yaml", ".yml")):
            raise DanluError(f"'{args.config}' looks like an override", "put the config file first")
        run = danlu.train(
            args.config, args.overrides, out=args.out, overwrite=args.overwrite, progress=not args.quiet
        )
    _print_run(run)
    return 0


def add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="metrics of a trained run",
        description="Evaluate a finished run on DATA (a file with the target column) or, "
        "without DATA, on the run's own test split.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("data", nargs="?", metavar="DATA", help="CSV/Parquet/NPZ/NPY with the target column")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: accuracy, f1_macro, roc_auc, log_loss or mae, rmse, r2",
    )
    p.set_defaults(run=run_evaluate)


def run_evaluate(args) -> int:
    import danlu
    from danlu.evaluation.metrics import summary
    from danlu.run import RunDir

    metrics = danlu.evaluate(args.run_dir, args.data)
    task = "classification" if "accuracy" in metrics else "regression"
    if args.json:
        print(json.dumps(summary(task, metrics)))
        return 0
    print(f"{'data' if args.data else 'test split'}: {args.data or RunDir(args.run_dir).path}")
    for key, value in metrics.items():
        if key not in ("per_class", "confusion_matrix"):
            print(f"  {key:<16}{_fmt(value)}")
    if task == "classification":
        print(f"  {'class':<16}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
        for name, row in metrics["per_class"].items():
            print(
                f"  {name:<16}"
                + "".join(f"{_fmt(row[k]):>10}" for k in ("precision", "recall", "f1", "support"))
            )
        print("  confusion matrix (rows true, columns predicted):")
        for row in metrics["confusion_matrix"]:
            print("    " + " ".join(f"{v:>7}" for v in row))
    return 0


def add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="batch predictions for a file",
        description="Write DATA's rows in order with a `prediction` column (and `proba_<class>` "
        "columns for classification); other columns pass through. Streams in chunks.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("data", metavar="DATA", help="CSV/Parquet/NPZ/NPY with the feature columns")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output .csv or .parquet")
    p.add_argument("--chunk-rows", type=int, default=100_000, help="rows per chunk (default 100000)")
    p.set_defaults(run=run_predict)


def run_predict(args) -> int:
    from danlu.api import predict_file

    rows = predict_file(args.run_dir, args.data, args.output, args.chunk_rows)
    print(f"wrote {rows} predictions to {args.output}")
    return 0


def add_quickstart(sub) -> None:
    p = sub.add_parser(
        "quickstart",
        help="train, evaluate and predict a demo workload end to end",
        description="The PyTorch tutorial workload (100k synthetic rows, 3 classes, a 10-20-3 MLP, "
        "101 epochs) trained, evaluated and predicted end to end.",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.epochs=10")
    p.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart)")
    p.set_defaults(run=run_quickstart)


def run_quickstart(args) -> int:
    import danlu

    run, predictions = danlu.quickstart(out=args.out, overrides=args.overrides, progress=not args.quiet)
    _print_run(run, [("predictions", predictions), ("next", f"danlu evaluate {run.path}")])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="danlu",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
        description="danlu: config-driven training, evaluation and prediction for PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"danlu {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or info logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (add_train, add_evaluate, add_predict, add_quickstart):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="danlu: %(message)s", stream=sys.stderr)
    if not args.debug:
        logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        return args.run(args)
    except DanluError as exc:
        if args.debug:
            raise
        print(f"danlu: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "danlu: interrupted (a stopped run continues with `danlu train --resume RUN_DIR`)",
            file=sys.stderr,
        )
        return 130
