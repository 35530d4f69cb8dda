"""danlu predict."""

from __future__ import annotations

from danlu.cli.options import add_trust_model_code


def add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="batch predictions for a file",
        description="Write DATA's rows in order with a `prediction` column (and `proba_<class>` "
        "columns for classification); other columns pass through. Streams in chunks.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "data",
        metavar="DATA",
        help="tables: CSV/Parquet/NPZ/NPY with the feature columns; images: a folder, one image, a CSV of "
        "paths (the run's data.image column), IDX or NPZ; texts: CSV/Parquet/JSONL with the text column; "
        "a fine-tuned language model: JSONL or Parquet of conversations or prompts",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="output .csv or .parquet; a fine-tuned language model: .jsonl of its answers to DATA's "
        "conversations",
    )
    p.add_argument("--chunk-rows", type=int, default=100_000, help="rows per chunk (default 100000)")
    p.add_argument(
        "--engine",
        choices=["torch", "onnx"],
        default="torch",
        help="torch (default), or onnx: the run's export/model.onnx on ONNX Runtime",
    )
    p.add_argument(
        "--plot", metavar="PNG", help="images: also draw the first 36 inputs with their predicted labels"
    )
    add_trust_model_code(p)
    p.set_defaults(run=run_predict)


def run_predict(args) -> int:
    from danlu.run import RunDir

    RunDir(args.run_dir).require_complete()  # before torch is imported
    from danlu.api import predict_file

    rows = predict_file(
        args.run_dir, args.data, args.output, args.chunk_rows, args.engine, args.trust_model_code
    )
    print(f"wrote {rows} predictions to {args.output}")
    if args.plot:
        from danlu.api import plot_predictions

        plot_predictions(args.run_dir, args.data, args.plot, args.trust_model_code)
        print(f"drew the first predictions in {args.plot}")
    return 0
