"""danlu evaluate."""

from __future__ import annotations

import json

from danlu.cli.options import add_skip_bad_images, add_trust_model_code
from danlu.cli.output import fmt


def add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="metrics of a trained run",
        description="Evaluate a finished run on DATA (a file with the target column) or, "
        "without DATA, on the run's own test split. A fine-tuned language model: loss and perplexity per "
        "trained token before and after fine-tuning, and greedy answers to up to 32 of the conversations "
        "(RUN/samples.jsonl) scored by exact match and by containing the reference answer.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("data", nargs="?", metavar="DATA", help="CSV/Parquet/NPZ/NPY with the target column")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: accuracy, f1_macro, roc_auc, log_loss or mae, rmse, r2",
    )
    add_skip_bad_images(p)
    add_trust_model_code(p)
    p.set_defaults(run=run_evaluate)


def run_evaluate(args) -> int:
    from danlu.run import RunDir

    RunDir(args.run_dir).require_complete()  # before torch is imported
    import danlu
    from danlu.evaluation.metrics import summary

    metrics = danlu.evaluate(
        args.run_dir, args.data, trust_model_code=args.trust_model_code, skip_bad_images=args.skip_bad_images
    )
    task = "classification" if "accuracy" in metrics else "regression"
    if "perplexity" in metrics:  # a fine-tuned language model: every figure, and where its answers are
        task = "generation"
    if args.json:
        shown = metrics if task == "generation" else summary(task, metrics)
        print(json.dumps(shown, allow_nan=False))
        return 0
    if args.data:
        print(f"data: {args.data}")
    else:
        run = RunDir(args.run_dir)
        split = run.read_report().get("test_split", "test")
        print(f"{split} split of {run.path} (recorded in {run.heldout.name})")
    undefined = metrics.get("undefined", {})
    for key, value in metrics.items():
        if key not in ("per_class", "confusion_matrix", "undefined"):
            print(f"  {key:<16}{fmt(value)}" + (f" ({undefined[key]})" if key in undefined else ""))
    if task == "classification":
        print(f"  {'class':<16}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
        for name, row in metrics["per_class"].items():
            print(
                f"  {name:<16}"
                + "".join(f"{fmt(row[k]):>10}" for k in ("precision", "recall", "f1", "support"))
            )
        print("  confusion matrix (rows true, columns predicted):")
        for row in metrics["confusion_matrix"]:
            print("    " + " ".join(f"{v:>7}" for v in row))
    return 0
