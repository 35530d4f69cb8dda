"""ONNX: a family's serving module through torch.onnx (the torch.export-based exporter), finished by the
family (e.g. string lookups in front), with danlu's metadata. Only onnx and onnxruntime are needed to run
the file (danlu.runners.OnnxRunner)."""

from __future__ import annotations

import contextlib
import inspect
import io
import tempfile
from pathlib import Path

import torch
from torch import nn

from danlu.errors import DanluError, one_line
from danlu.quiet import quiet

OPSET = 18


def _torch_export(module: nn.Module, spec, path: Path) -> None:
    names = spec.input_names()
    inputs = spec.example_inputs()[: len(names)]
    # axis 0 (rows) varies for every family; a spec's dynamic_axes name more (text: tokens, axis 1)
    dims = {axis: torch.export.Dim(name) for axis, name in spec.dynamic_axes.items()}
    shapes = tuple(dict(dims) for _ in inputs)
    if any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(module.forward).parameters.values()):
        shapes = (shapes,)  # forward(*inputs) (families.export.Served): one entry, for `inputs`
    # the exporter narrates its steps on stdout and warns about internals: keep both off the user's screen
    with contextlib.redirect_stdout(io.StringIO()), quiet():
        try:
            torch.onnx.export(
                module,
                inputs,
                str(path),
                dynamo=True,
                input_names=names,
                output_names=[spec.output_name()],
                dynamic_shapes=shapes,
                opset_version=OPSET,
                external_data=False,
            )
        except Exception as exc:
            raise DanluError(
                f"torch.onnx could not export the model: {one_line(exc)}",
                "try --format torchscript, or avoid data-dependent Python control flow in forward",
            ) from exc


def onnx_bytes(module: nn.Module, spec, metadata: dict[str, str]) -> bytes:
    """The serialized, checked ONNX model, finished by the family, with `metadata` in metadata_props."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        _torch_export(module, spec, path)
        proto = onnx.load(str(path))
    spec.finish_onnx(proto)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def quantize_int8(model: bytes) -> bytes:
    """Dynamic int8 quantization of the weights of MatMul/Gemm (ONNX Runtime's quantize_dynamic)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        proto = onnx.load_from_string(model)
        del proto.graph.value_info[:]  # the exporter's intermediate shapes trip the quantizer's inference
        onnx.save(proto, str(source))
        with quiet():
            quantize_dynamic(source, target, weight_type=QuantType.QInt8)
        return target.read_bytes()
