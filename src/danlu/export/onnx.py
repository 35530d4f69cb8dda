"""ONNX: the ServingModule through torch.onnx (the torch.export-based exporter), with one ai.onnx.ml
LabelEncoder per categorical feature in front so consumers feed raw strings; and OnnxRunner, the ONNX
Runtime engine. Only onnx and onnxruntime are needed to run the file."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import torch

from danlu.data.preprocess import Preprocessor
from danlu.errors import DanluError, one_line
from danlu.export.module import ServingModule, example_inputs, quiet

NUMERIC_INPUT = "numeric"
CODES = "danlu_codes"
ML_DOMAIN = "ai.onnx.ml"
OPSET = 18


def output_name(pre: Preprocessor) -> str:
    return "probabilities" if pre.task == "classification" else "prediction"


def _torch_export(module: ServingModule, pre: Preprocessor, path: Path) -> None:
    inputs = example_inputs(pre)[: 2 if pre.categorical else 1]  # no codes input without categoricals
    batch = torch.export.Dim("batch")
    names = [NUMERIC_INPUT, CODES][: len(inputs)]
    # the exporter narrates its steps on stdout and warns about internals: keep both off the user's screen
    with contextlib.redirect_stdout(io.StringIO()), quiet():
        try:
            torch.onnx.export(
                module,
                inputs,
                str(path),
                dynamo=True,
                input_names=names,
                output_names=[output_name(pre)],
                dynamic_shapes=tuple({0: batch} for _ in inputs),
                opset_version=OPSET,
                external_data=False,
            )
        except Exception as exc:
            raise DanluError(
                f"torch.onnx could not export the model: {one_line(exc)}",
                "try --format torchscript, or avoid data-dependent Python control flow in forward",
            ) from exc


def _add_lookups(proto, pre: Preprocessor) -> None:
    """Replace the integer codes input with one string input per categorical feature."""
    from onnx import TensorProto, helper

    graph = proto.graph
    codes = next(i for i in graph.input if i.name == CODES)
    batch_dim = codes.type.tensor_type.shape.dim[0]
    graph.input.remove(codes)
    axes = helper.make_tensor("danlu_axis_1", TensorProto.INT64, [1], [1])
    graph.initializer.append(axes)
    nodes, columns = [], []
    for j, col in enumerate(pre.categorical):
        value = helper.make_tensor_value_info(col.name, TensorProto.STRING, [None])
        value.type.tensor_type.shape.dim[0].CopyFrom(batch_dim)
        graph.input.append(value)
        keys = col.values or [""]  # "" is missing, which maps to the unknown code 0 anyway
        code, column = f"danlu_code_{j}", f"danlu_code_{j}_column"
        nodes.append(
            helper.make_node(
                "LabelEncoder",
                [col.name],
                [code],
                domain=ML_DOMAIN,
                keys_strings=keys,
                values_int64s=list(range(1, len(keys) + 1)) if col.values else [0],
                default_int64=0,
            )
        )
        nodes.append(helper.make_node("Unsqueeze", [code, axes.name], [column]))
        columns.append(column)
    nodes.append(helper.make_node("Concat", columns, [CODES], axis=1))
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    if not any(o.domain == ML_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(ML_DOMAIN, 3))


def onnx_bytes(module: ServingModule, pre: Preprocessor, metadata: dict[str, str]) -> bytes:
    """The serialized, checked ONNX model with the preprocessing and `metadata` in metadata_props."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        _torch_export(module, pre, path)
        proto = onnx.load(str(path))
    if pre.categorical:
        _add_lookups(proto, pre)
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


class OnnxRunner:
    """An ONNX Runtime session over a danlu ONNX file (a path or its bytes)."""

    def __init__(self, source: str | Path | bytes, pre: Preprocessor, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            source if isinstance(source, bytes) else str(source), options, providers=["CPUExecutionProvider"]
        )
        self.categorical = [c.name for c in pre.categorical]

    def run(self, numeric: np.ndarray, categorical: list[np.ndarray]) -> np.ndarray:
        """Probabilities [n, k] or values [n] from raw inputs (`Preprocessor.raw_inputs`)."""
        feeds = {NUMERIC_INPUT: numeric, **dict(zip(self.categorical, categorical, strict=True))}
        return self.session.run(None, feeds)[0]
