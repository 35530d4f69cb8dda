"""danlu export."""

from __future__ import annotations

from danlu.cli.options import add_trust_model_code


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a run as ONNX or TorchScript, verified against the torch model",
        description="Export a finished run with its preprocessing folded in (raw feature values in; "
        "probabilities or values in original units out), then verify it on the run's held-out rows: "
        "fp32 must match the torch model within 1e-4; int8 may lose at most --max-metric-drop of "
        "accuracy (classification) or R^2 (regression). Nothing is written unless it passes.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="default onnx")
    p.add_argument("--quantize", choices=["int8"], help="dynamic int8 quantization of the linear layers")
    p.add_argument("-o", "--output", metavar="PATH", help="default RUN_DIR/export/model[.int8].onnx|pt")
    p.add_argument(
        "--max-metric-drop",
        type=float,
        default=0.01,
        metavar="X",
        help="largest accepted drop of the headline metric for int8 (default 0.01)",
    )
    add_trust_model_code(p)
    p.set_defaults(run=run_export)


def run_export(args) -> int:
    from danlu.run import RunDir

    RunDir(args.run_dir).require_complete()  # before torch is imported
    from danlu.export import FP32_TOLERANCE, export_run

    result = export_run(
        args.run_dir, args.format, args.quantize, args.output, args.max_metric_drop, args.trust_model_code
    )
    kind = f"{args.format}{' int8' if args.quantize else ''}"
    print(f"exported  {result['path']} ({kind}, {result['bytes'] / 1024:.1f} KiB)")
    print(f"verified  on {result['rows']} {result['split']} rows against the torch model")
    limit = f"limit {FP32_TOLERANCE:g}" if not args.quantize else "int8: not bounded"
    print(f"  max abs difference  {result['max_abs_diff']:.2e} ({limit})")
    if result["metric_drop"] is None:
        print(f"  {result['metric']:<19} undefined on {result['rows']} row(s)")
        return 0
    print(
        f"  {result['metric']:<19} torch {result['torch']:.4f}  exported {result['exported']:.4f}  "
        f"change {-result['metric_drop']:+.4f}"
        + (f" (limit -{args.max_metric_drop:g})" if args.quantize else "")
    )
    return 0
