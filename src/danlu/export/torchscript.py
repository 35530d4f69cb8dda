"""TorchScript: the traced ServingModule inside a scripted wrapper that maps categorical strings to codes,
so a consumer needs only torch (`torch.jit.load`) and raw feature values; and TorchScriptRunner."""

import io
import json

import numpy as np
import torch
from torch import nn

from danlu.data.preprocess import Preprocessor
from danlu.export.module import ServingModule, example_inputs, quiet

METADATA_FILE = "danlu.json"  # the metadata travels inside the archive as an extra file


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


def _quantized(module: ServingModule) -> nn.Module:
    # torch.ao's eager dynamic quantization: deprecated in favour of torchao, which danlu does not depend on
    with quiet():
        return torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)


def torchscript_bytes(
    module: ServingModule, pre: Preprocessor, metadata: dict[str, str], int8: bool = False
) -> bytes:
    """The serialized TorchScript archive with the preprocessing, optionally with int8 Linear weights."""
    inner = _quantized(module) if int8 else module
    vocabularies = [{v: i + 1 for i, v in enumerate(c.values)} for c in pre.categorical]
    with quiet():  # torch.jit announces its own deprecation
        traced = torch.jit.trace(inner, example_inputs(pre), check_trace=False)
        scripted = torch.jit.script(StringLookup(traced, vocabularies))
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer, _extra_files={METADATA_FILE: json.dumps(metadata)})
    return buffer.getvalue()


class TorchScriptRunner:
    """A loaded danlu TorchScript archive (from a path or its bytes), on the CPU."""

    def __init__(self, source, pre: Preprocessor) -> None:
        with quiet():
            self.module = torch.jit.load(io.BytesIO(source) if isinstance(source, bytes) else str(source))

    @torch.no_grad()
    def run(self, numeric: np.ndarray, categorical: list[np.ndarray]) -> np.ndarray:
        columns = [[str(v) for v in column] for column in categorical]
        return self.module(torch.from_numpy(numeric), columns).numpy()
