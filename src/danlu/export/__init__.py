"""`danlu export`: a finished run as ONNX or TorchScript (runs.py), a causal LM as GGUF (gguf.py), an
encoder's towers as ONNX (towers.py), each verified before anything is written.

The package is callable: `danlu.export(source, ...)` is `export` below, which picks the export for the
source and checks the options and the target before anything heavy is imported, as `danlu export` does."""

from __future__ import annotations

import sys
import types
from importlib import import_module
from pathlib import Path
from typing import Any

from danlu.errors import DanluError

# a run's formats (danlu.run.EXPORT_SUFFIXES, not imported here: `danlu --help` builds its parser from
# these) and GGUF
FORMATS = ("onnx", "torchscript", "gguf")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
_RUNS = ("export_run", "verify", "metadata", "FP32_TOLERANCE", "HEADLINE")  # from runs.py, imported lazily


def export(
    source: str | Path,
    format: str = "onnx",
    quantize: str | None = None,
    out: str | Path | None = None,
    max_metric_drop: float = 0.01,
    trust_model_code: bool = False,
) -> dict[str, Any]:
    """Export and verify what `source` is; the file is written only when verification passes.

    - A finished run: ONNX or TorchScript (format "onnx" or "torchscript"), fp32 or quantize="int8";
      out defaults to RUN/export/model[.int8].onnx|pt (runs.export_run).
    - A Hugging Face causal LM directory, or a fine-tuned run holding one, with format="gguf": one GGUF file
      (quantize f16 by default, q8_0, q4_0 or f32; gguf.export_gguf).
    - A CLIP, SigLIP or encoder-only text model directory: its towers as fp32 ONNX in a folder
      (towers.export_towers).

    Returns the verification record, with "export": "run", "gguf" or "towers".

    Raises:
        DanluError: an option that does not fit the source, an unfinished run, a target that would
            replace a file danlu did not write, or a failed verification (with the figures).
    """
    from danlu.embeddings.detect import is_encoder_model

    if format not in FORMATS:
        raise DanluError(f"unknown export format '{format}'", f"use one of {', '.join(FORMATS)}")
    if is_encoder_model(source):
        if format != "onnx" or quantize:
            raise DanluError("an encoder's towers export as fp32 ONNX", "leave out --format and --quantize")
        from danlu.export.towers import export_towers

        return {"export": "towers", **export_towers(source, out)}
    if format == "gguf":
        if quantize == "int8":
            raise DanluError(
                "--quantize int8 is for onnx and torchscript", f"gguf takes {', '.join(GGUF_TYPES)}"
            )
        if quantize not in (None, *GGUF_TYPES):
            raise DanluError(f"unknown GGUF type '{quantize}'", f"use one of {', '.join(GGUF_TYPES)}")
        from danlu.export.gguf import export_gguf

        return {"export": "gguf", **export_gguf(source, quantize or "f16", out)}
    check_run_options(format, quantize)
    from danlu.run import RunDir, export_target

    RunDir(source).require_complete()  # before torch is imported, as is the target's check
    export_target(source, format, quantize, out)
    from danlu.export.runs import export_run

    return {"export": "run", **export_run(source, format, quantize, out, max_metric_drop, trust_model_code)}


def check_run_options(fmt: str, quantize: str | None) -> None:
    """What a run exports as (ONNX or TorchScript, fp32 or int8), checked before torch is imported."""
    from danlu.run import EXPORT_SUFFIXES

    if fmt not in EXPORT_SUFFIXES:
        raise DanluError(f"unknown export format '{fmt}'", f"use one of {', '.join(EXPORT_SUFFIXES)}")
    if quantize in GGUF_TYPES:
        raise DanluError(f"--quantize {quantize} is a GGUF type", "pass --format gguf, or --quantize int8")
    if quantize not in (None, "int8"):
        raise DanluError(f"unknown quantization '{quantize}'", "use --quantize int8, or leave it out")


def __getattr__(name: str) -> Any:
    if name in _RUNS:  # `from danlu.export import export_run` without importing torch with the package
        return getattr(import_module("danlu.export.runs"), name)
    raise AttributeError(f"module 'danlu.export' has no attribute {name!r}")


class _Callable(types.ModuleType):
    def __call__(self, source: str | Path, **options: Any) -> dict[str, Any]:
        return export(source, **options)


sys.modules[__name__].__class__ = _Callable
