"""danlu export."""

from __future__ import annotations

from pathlib import Path

from danlu.cli.options import add_trust_model_code, number
from danlu.export import FORMATS, GGUF_TYPES


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a run as ONNX or TorchScript, or a causal LM as GGUF, verified before it is written",
        description="Export a finished run with its preprocessing folded in (raw feature values in; "
        "probabilities or values in original units out), then verify it on the run's held-out rows: "
        "fp32 must match the torch model within 1e-4; int8 may lose at most --max-metric-drop of "
        "accuracy (classification) or R^2 (regression). With --format gguf, write a Hugging Face causal "
        "LM (Llama, Mistral, Qwen2; a model directory, or a run's hf/ folder) as one GGUF file with its "
        "tokenizer and chat template, then verify it through llama.cpp: the same tokens as the model's "
        "tokenizer, perplexity on a fixed text within 0.1% (f32), 0.5% (f16), 2% (q8_0) or 8% (q4_0) of "
        "the torch model's, and greedy agreement on a few prompts. A CLIP, SigLIP or encoder-only text "
        "model directory: its towers as ONNX (image.onnx, text.onnx) in a folder with the tokenizer and "
        "image processor files, each verified on ONNX Runtime (cosine >= 0.9999 against torch). Nothing "
        "is written unless it passes.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR|MODEL_DIR")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="default onnx")
    p.add_argument(
        "--quantize",
        choices=["int8", *GGUF_TYPES],
        help="onnx, torchscript: int8 (dynamic int8 linear layers); gguf: f16 (default), q8_0, q4_0 or f32",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="default RUN_DIR/export/model[.int8].onnx|pt; gguf: RUN_DIR/export/model.TYPE.gguf for a run, "
        "./MODEL_NAME.TYPE.gguf for a model directory; an encoder's towers: a folder, default "
        "./MODEL_NAME-onnx",
    )
    p.add_argument(
        "--max-metric-drop",
        type=number,
        default=0.01,
        metavar="X",
        help="largest accepted drop of the headline metric for int8 (default 0.01)",
    )
    add_trust_model_code(p)
    p.set_defaults(run=run_export)


def run_export(args) -> int:
    from danlu.export import export

    result = export(
        args.run_dir, args.format, args.quantize, args.output, args.max_metric_drop, args.trust_model_code
    )
    return {"towers": _print_towers, "gguf": _print_gguf, "run": _print_run}[result["export"]](result, args)


def _print_run(result: dict, args) -> int:
    from danlu.export.runs import FP32_TOLERANCE

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
        f"change {signed_change(-result['metric_drop'])}"
        + (f" (limit -{args.max_metric_drop:g})" if args.quantize else "")
    )
    return 0


def signed_change(change: float) -> str:
    """A metric's change to four places with its sign: +0.0000 for none (not -0.0000, as -0.0 would print),
    and one too small for four places in two figures (-2.5e-05: one row of 40,000 flipped)."""
    text = f"{change:+.4f}"
    if float(text) != 0 or change == 0:
        return text.replace("-0.0000", "+0.0000")
    return f"{change:+.1e}"


def _print_gguf(result: dict, args) -> int:
    size = result["bytes"] / 1024 / 1024
    print(
        f"exported  {result['path']} (gguf {result['quantize']}, {size:.1f} MiB, {result['tensors']} tensors)"
    )
    print(f"verified  through llama.cpp against the torch model ({result['seconds']:.1f} s)")
    print(f"  tokenizer           same {result['text_tokens']} tokens on the check text")
    print(
        f"  perplexity          torch {result['perplexity_torch']:.4f}  "
        f"gguf {result['perplexity_gguf']:.4f}  change {result['perplexity_change']:.3%} "
        f"(limit {result['perplexity_tolerance']:.1%})"
    )
    print(f"  max abs difference  {result['max_abs_diff']:.2e} (logits)")
    agree = ", ".join(f"{g['agree']}/{g['tokens']}" for g in result["greedy"])
    print(f"  greedy agreement    {agree} tokens before the first difference, per prompt")
    print(f"serve it: danlu serve {Path(result['path'])}")
    return 0


def _print_towers(record: dict, args) -> int:
    for name, tower in record["towers"].items():
        print(
            f"exported  {record['path']}/{tower['file']} ({name} tower), verified on {tower['rows_checked']} "
            f"inputs: cosine >= {tower['min_cosine']:.6f} against torch"
        )
    images = " (and pixels from the image processor's)" if record["towers"].get("image") else ""
    print(f"inputs    token ids from the tokenizer files beside them{images}; see danlu-export.json there")
    return 0
