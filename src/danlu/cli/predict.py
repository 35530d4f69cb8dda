"""danlu predict."""

from __future__ import annotations

from danlu.cli.options import add_skip_bad_images, add_trust_model_code


def add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="batch predictions for a file",
        description="Write DATA's rows in order with a `prediction` column (and `proba_<class>` "
        "columns for classification); other columns pass through. Streams in chunks. With a CLIP or SigLIP "
        "model directory and --labels: zero-shot labels for images (path, label, proba_<label> columns); "
        "the labels' embeddings are computed once.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR|CLIP_MODEL")
    p.add_argument(
        "data",
        metavar="DATA",
        help="tables: CSV/Parquet/NPZ/NPY with the feature columns; images: a folder, one image, a CSV of "
        "paths (the run's data.image column), IDX or NPZ; texts: CSV/Parquet/JSONL with the text column; "
        "a fine-tuned language model: JSONL, JSON or Parquet of conversations or prompts (or texts to "
        "continue)",
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
    add_skip_bad_images(p)
    zero = p.add_argument_group("zero-shot labels (a CLIP or SigLIP model directory)")
    zero.add_argument("--labels", help='comma-separated labels, e.g. "cat,dog,car"')
    zero.add_argument("--labels-file", metavar="FILE", help="labels, one per line")
    zero.add_argument(
        "--template",
        action="append",
        metavar="TEXT",
        help='the prompt each label fills, with {} for the label (default "a photo of a {}."); repeat it '
        "to average several per label",
    )
    zero.add_argument(
        "--column",
        help="a CSV/Parquet/JSONL table of image paths: the column holding them (default: its only column)",
    )
    zero.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    from danlu.cli.embed import add_dtype

    add_dtype(zero)
    add_trust_model_code(p)
    p.set_defaults(run=run_predict)


def run_predict(args) -> int:
    from danlu.run import RunDir

    if is_zero_shot(args):
        return run_zero_shot(args)
    RunDir(args.run_dir).require_complete()  # before torch is imported
    from danlu.api import predict_file

    rows = predict_file(
        args.run_dir,
        args.data,
        args.output,
        args.chunk_rows,
        args.engine,
        args.trust_model_code,
        args.skip_bad_images,
    )
    print(f"wrote {rows} prediction{'' if rows == 1 else 's'} to {args.output}")
    if args.plot:
        from danlu.api import plot_predictions

        plot_predictions(args.run_dir, args.data, args.plot, args.trust_model_code, args.skip_bad_images)
        print(f"drew the first predictions in {args.plot}")
    return 0


def is_zero_shot(args) -> bool:
    """Labels were named, or the first argument is a model directory rather than a run."""
    from danlu.embeddings.detect import is_encoder_model

    return bool(args.labels or args.labels_file or is_encoder_model(args.run_dir))


def run_zero_shot(args) -> int:
    from danlu.errors import DanluError
    from danlu.run import RunDir

    if RunDir(args.run_dir).preprocess.is_file():
        raise DanluError(
            "--labels and --labels-file are for a CLIP or SigLIP model; a run predicts its own classes",
            f"leave them out, or pass a CLIP model directory instead of '{args.run_dir}'",
        )
    if args.engine != "torch":
        raise DanluError("zero-shot labels run on torch", "leave out --engine")
    if args.skip_bad_images:
        raise DanluError(
            "--skip-bad-images is for a run's images; zero-shot labels read every image", "leave it out"
        )
    from danlu.api import zero_shot
    from danlu.embeddings.detect import DEFAULT_TEMPLATE

    frame = zero_shot(
        args.run_dir,
        args.data,
        args.output,
        labels=args.labels,
        labels_file=args.labels_file,
        templates=args.template or [DEFAULT_TEMPLATE],
        column=args.column,
        batch_size=args.batch_size,
        plot=args.plot,
        dtype=args.dtype,
    )
    print(f"wrote {len(frame)} images' labels to {args.output}")
    if args.plot:
        print(f"drew the first images with their top label in {args.plot}")
    return 0
