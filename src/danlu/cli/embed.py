"""danlu embed."""

from __future__ import annotations


def add_embed(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="embed images or texts with a local encoder",
        description="Write one vector per input, in input order, with its id (the image's path, or the "
        "text's line or row number): MODEL is a local CLIP or SigLIP directory (images and texts) or an "
        "encoder-only text model (BERT, MiniLM, a sentence-transformers directory: its pooling and "
        "normalizing are read from its files).",
    )
    p.add_argument("model", metavar="MODEL", help="a local model directory")
    p.add_argument(
        "inputs",
        metavar="INPUTS",
        help="a folder of images, an image, a .txt (one text per line), or a CSV/Parquet/JSONL table "
        "whose --column holds texts or image paths",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT", help=".npy (+ OUT.ids.json) or .parquet")
    p.add_argument("--column", help="the table column to embed (default: a table's only column)")
    p.add_argument(
        "--no-normalize",
        dest="normalize",
        action="store_false",
        default=None,
        help="raw vectors (default: unit length; a sentence-transformers model as its files say)",
    )
    p.add_argument(
        "--truncate",
        choices=["end", "start", "error"],
        default="end",
        help="a text over the model's limit: cut its end (default) or start, or stop with an error",
    )
    p.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass (default 32)")
    add_dtype(p)
    p.set_defaults(run=run_embed)


def add_dtype(p) -> None:
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="float32 (default), or bfloat16 matrix products: faster on a CPU with native bfloat16 "
        "(AVX512-BF16, AMX), taken only when a check batch's vectors agree with float32's (cosine >= 0.9999)",
    )


def run_embed(args) -> int:
    from danlu.api import embed

    summary = embed(
        args.model,
        args.inputs,
        args.output,
        column=args.column,
        normalize=args.normalize,
        truncate=args.truncate,
        batch_size=args.batch_size,
        dtype=args.dtype,
    )
    note = f" ({summary.truncated} texts truncated to the model's limit)" if summary.truncated else ""
    rows, dims = summary.vectors.shape
    print(f"wrote {rows} vector{'' if rows == 1 else 's'} of {dims} dimensions to {args.output}{note}")
    return 0
