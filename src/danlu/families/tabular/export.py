"""Tabular export: the model with its preprocessing folded in (raw numbers with NaN for missing, and
categorical strings, in; probabilities or values in original units out), as ONNX (with one ai.onnx.ml
LabelEncoder per categorical feature in front) or TorchScript (with a scripted string lookup)."""

import json

import numpy as np
import torch
from torch import nn

from danlu.errors import DanluError
from danlu.families.export import ExportSpec, OutputTail
from danlu.families.tabular import codec
from danlu.families.tabular.preprocess import Preprocessor

NUMERIC_INPUT = "numeric"
CODES = "danlu_codes"
ML_DOMAIN = "ai.onnx.ml"


class ServingModule(nn.Module):
    """Mean imputation, missing indicators and standardization, the model, then the output tail."""

    def __init__(self, model: nn.Module, pre: Preprocessor) -> None:
        super().__init__()
        if not pre.numeric:
            raise DanluError(
                "export needs at least one numeric feature; this run has only categorical ones",
                "serve it with `danlu serve --engine torch` instead",
            )
        self.model = model.eval()
        self.tail = OutputTail(pre)
        self.has_categorical = bool(pre.categorical)
        self.register_buffer("mean", torch.tensor([c.mean for c in pre.numeric], dtype=torch.float32))
        self.register_buffer("std", torch.tensor([c.std for c in pre.numeric], dtype=torch.float32))
        indicators = [j for j, c in enumerate(pre.numeric) if c.indicator]
        self.register_buffer("indicators", torch.tensor(indicators, dtype=torch.long))

    def forward(self, numeric: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        missing = torch.isnan(numeric)
        x = (torch.where(missing, self.mean, numeric) - self.mean) / self.std
        if self.indicators.numel():
            x = torch.cat([x, missing[:, self.indicators].to(x.dtype)], dim=1)
        return self.tail(self.model(x, codes) if self.has_categorical else self.model(x))


class StringLookup(nn.Module):
    """forward(numeric [n, n_numeric] float32 with NaN for missing, categorical: one list of n strings per
    categorical feature) -> probabilities [n, k] or values [n]."""

    vocabularies: list[dict[str, int]]  # TorchScript needs the type when the list is empty

    def __init__(self, inner: nn.Module, vocabularies: list[dict[str, int]]) -> None:
        super().__init__()
        self.inner = inner
        self.vocabularies = vocabularies

    def forward(self, numeric: torch.Tensor, categorical: list[list[str]]) -> torch.Tensor:
        codes = torch.zeros(numeric.shape[0], len(self.vocabularies), dtype=torch.long)
        for j, vocabulary in enumerate(self.vocabularies):
            column = categorical[j]
            for i in range(len(column)):
                codes[i, j] = vocabulary.get(column[i], 0)
        return self.inner(numeric, codes)


class TabularExport(ExportSpec):
    """The preprocessing inside the graph: raw numbers and categorical strings in."""

    def __init__(self, pre: Preprocessor) -> None:
        super().__init__(pre)
        self.pre = pre

    def module(self, model: nn.Module) -> nn.Module:
        return ServingModule(model, self.pre)

    def example_inputs(self, rows: int = 3) -> tuple[torch.Tensor, ...]:
        """Inputs for tracing: more than one row, so the batch axis stays dynamic."""
        numeric = torch.zeros(rows, len(self.pre.numeric))
        return numeric, torch.zeros(rows, len(self.pre.categorical), dtype=torch.long)

    def input_names(self) -> list[str]:
        """The ONNX graph's inputs: the codes only with categorical features (the first inputs traced)."""
        return [NUMERIC_INPUT, CODES] if self.pre.categorical else [NUMERIC_INPUT]

    def metadata(self) -> dict[str, str]:
        return {
            "numeric_features": json.dumps([c.name for c in self.pre.numeric]),
            "categorical_features": json.dumps({c.name: c.values for c in self.pre.categorical}),
        }

    def finish_onnx(self, proto) -> None:
        """Replace the integer codes input with one string input per categorical feature."""
        if not self.pre.categorical:
            return
        from onnx import TensorProto, helper

        graph = proto.graph
        codes = next(i for i in graph.input if i.name == CODES)
        batch_dim = codes.type.tensor_type.shape.dim[0]
        graph.input.remove(codes)
        axes = helper.make_tensor("danlu_axis_1", TensorProto.INT64, [1], [1])
        graph.initializer.append(axes)
        nodes, columns = [], []
        for j, col in enumerate(self.pre.categorical):
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

    def onnx_feeds(self, items) -> dict[str, np.ndarray]:
        return codec.feeds(self.pre, items)

    def script(self, traced: nn.Module) -> nn.Module:
        vocabularies = [{v: i + 1 for i, v in enumerate(c.values)} for c in self.pre.categorical]
        return torch.jit.script(StringLookup(traced, vocabularies))

    def script_args(self, items) -> tuple:
        numeric, categorical = codec.raw(self.pre, items)
        columns = [[str(v) for v in column] for column in categorical]
        return torch.from_numpy(numeric.astype(np.float32)), columns
