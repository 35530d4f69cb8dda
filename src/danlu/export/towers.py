"""`danlu export ENCODER_DIR`: an encoder's towers as ONNX, verified against torch before anything is
written. A CLIP or SigLIP directory gives image.onnx (pixel_values [n, 3, H, W] float32, as the model's
image processor makes them) and text.onnx; an encoder-only text model gives text.onnx (input_ids and
attention_mask [n, tokens] int64, from the model's tokenizer, pooling inside the graph). Each outputs
`vectors` [n, dimensions] float32 as danlu.embeddings gives them (unit length for CLIP and SigLIP; a text
encoder as its sentence-transformers files say). Tokenizing and image preprocessing stay outside the
graphs: their files are written beside them, so the folder is all a consumer needs.

Verification runs each graph on ONNX Runtime on sample inputs of another batch size than the one traced,
against danlu's torch embeddings of the same texts and images: cosine at least MIN_COSINE for every row.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from danlu import __version__
from danlu.embeddings.encoders import ImageTextEncoder, TextEncoder, load_encoder
from danlu.errors import DanluError, one_line
from danlu.export.onnx import OPSET
from danlu.quiet import quiet
from danlu.run import atomic_write, atomic_write_json

MIN_COSINE = 0.9999
RECORD = "danlu-export.json"
SAMPLE_TEXTS = [
    "a photo of a cat",
    "an old car parked in the street at night, its lights still on",
    "two dogs",
    "a small red bird sitting on a branch in the rain, seen from below",
    "the quick brown fox jumps over the lazy dog",
]


class Vectors(nn.Module):
    """An encoder's text or image vectors as one module, as embed_texts / embed_images compute them:
    the tensors in (by name, positionally), the vectors out, normalized as the encoder's default."""

    def __init__(
        self, encoder: ImageTextEncoder | TextEncoder, names: list[str], vectors, normalize: bool
    ) -> None:
        super().__init__()
        self.model, self.names, self.vectors, self.normalize = encoder.model, names, vectors, normalize

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        found = self.vectors(dict(zip(self.names, tensors, strict=True)))
        return nn.functional.normalize(found, dim=-1) if self.normalize else found


def _token_inputs(encoder: ImageTextEncoder | TextEncoder, texts: list[str]) -> dict[str, torch.Tensor]:
    """The tokenizer's tensors as embed_texts passes them (SigLIP's: input_ids alone), less
    token_type_ids (one segment: zeros, which the model fills in itself)."""
    return {k: v for k, v in encoder.text.encode(texts).items() if k != "token_type_ids"}


def sample_images(count: int) -> list[Any]:
    from PIL import Image

    rng = np.random.default_rng(0)
    shapes = [(48, 64), (80, 60), (40, 40), (100, 70), (64, 96)]
    return [
        Image.fromarray(rng.integers(0, 255, (*shapes[i % len(shapes)], 3), dtype=np.uint8))
        for i in range(count)
    ]


def _export(module: nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> None:
    names = list(inputs)
    rows = torch.export.Dim("rows")
    # forward(*tensors): one entry of dynamic shapes, for all of them
    shapes = (
        tuple({0: rows, **({1: torch.export.Dim.AUTO} if v.dim() == 2 else {})} for v in inputs.values()),
    )
    with contextlib.redirect_stdout(io.StringIO()), quiet():
        try:
            torch.onnx.export(
                module,
                tuple(inputs.values()),
                str(path),
                dynamo=True,
                input_names=names,
                output_names=["vectors"],
                dynamic_shapes=shapes,
                opset_version=OPSET,
                external_data=False,
            )
        except Exception as exc:
            raise DanluError(f"torch.onnx could not export the model: {one_line(exc)}", "report it") from exc


def _verified(path: Path, inputs: dict[str, torch.Tensor], expected: np.ndarray, tower: str) -> float:
    """The least cosine between ONNX Runtime's vectors and torch's; DanluError below MIN_COSINE."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: value.numpy() for name, value in inputs.items()})[0]
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    cosine = float(((got * expected).sum(axis=1) / np.maximum(norms, 1e-12)).min())
    if not cosine >= MIN_COSINE:
        raise DanluError(
            f"the exported {tower} tower disagrees with torch (cosine {cosine:.6f} < {MIN_COSINE}); "
            "nothing was written",
            "report it with the model's config.json",
        )
    return cosine


def _is_record(path: Path) -> bool:
    """PATH is a record `danlu export` wrote (not merely a file of that name)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "danlu_version" in record and "towers" in record


def check_folder(out: Path) -> None:
    """Raise unless OUT may be written: new or empty, or a folder an earlier `danlu export` wrote."""
    if out.exists() and not out.is_dir():
        raise DanluError(f"'{out}' is a file", "pass a folder for the towers, e.g. -o clip-onnx")
    if out.is_dir() and any(out.iterdir()) and not _is_record(out / RECORD):
        raise DanluError(
            f"'{out}' holds files `danlu export` did not write; nothing was replaced",
            "choose another -o folder, or empty that one yourself",
        )


def export_towers(model_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """The towers of a CLIP, SigLIP or text-encoder directory as ONNX in OUT (default ./NAME-onnx),
    verified on ONNX Runtime first; returns the record written to OUT/danlu-export.json.

    Raises:
        DanluError: no encoder directory, an OUT holding other files, or a tower that fails to export
            or to agree with torch (then nothing is written).
    """
    start = time.perf_counter()
    folder = Path(out) if out is not None else Path.cwd() / f"{Path(model_dir).name}-onnx"
    check_folder(folder)
    encoder = load_encoder(model_dir)
    built: dict[str, bytes] = {}
    towers: dict[str, Any] = {}
    trace_texts, check_texts = SAMPLE_TEXTS[:2], SAMPLE_TEXTS  # another batch size than the traced one
    with torch.no_grad():
        trace = _token_inputs(encoder, trace_texts)
        built["text.onnx"], towers["text"] = _tower(
            Vectors(encoder, list(trace), encoder.text_vectors, encoder.normalizes),
            trace,
            _token_inputs(encoder, check_texts),
            encoder.embed_texts(check_texts),
            "text",
        )
        if isinstance(encoder, ImageTextEncoder):
            pixels = encoder.image_processor(images=sample_images(5), return_tensors="pt")["pixel_values"]
            built["image.onnx"], towers["image"] = _tower(
                Vectors(encoder, ["pixel_values"], lambda t: encoder.image_vectors(t["pixel_values"]), True),
                {"pixel_values": pixels[:2]},
                {"pixel_values": pixels},
                encoder.embed_images(sample_images(5)),
                "image",
            )
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in built.items():
        atomic_write(folder / name, lambda f, data=data: f.write(data))
    tokenizer = encoder.text.tokenizer
    tokenizer.save_pretrained(folder)
    if isinstance(encoder, ImageTextEncoder):
        encoder.image_processor.save_pretrained(folder)
    record = {
        "danlu_version": __version__,
        "model": str(Path(model_dir).resolve()),
        "kind": getattr(encoder, "kind", "text"),
        "dimensions": encoder.dimensions,
        "max_tokens": encoder.text.limit,
        "text_padding": "max_length" if encoder.text.pad_to_limit else "longest",
        "towers": towers,
        "seconds": round(time.perf_counter() - start, 2),
    }
    atomic_write_json(folder / RECORD, record)
    return {**record, "path": str(folder)}


def _tower(
    module: nn.Module,
    trace: dict[str, torch.Tensor],
    check: dict[str, torch.Tensor],
    expected: np.ndarray,
    tower: str,
) -> tuple[bytes, dict[str, Any]]:
    import tempfile

    module.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{tower}.onnx"
        _export(module, trace, path)
        cosine = _verified(path, check, expected, tower)
        data = path.read_bytes()
    inputs = {
        name: {
            "dtype": str(value.dtype).removeprefix("torch."),
            "shape": ["n", *(["tokens"] if value.dim() == 2 else list(value.shape[1:]))],
        }
        for name, value in check.items()
    }
    checked = {"rows_checked": len(expected), "min_cosine": cosine}
    return data, {"file": f"{tower}.onnx", "inputs": inputs, "output": "vectors", **checked}
