"""TorchScript: a family's traced serving module, wrapped by the family where raw inputs need scripting
(tabular: string lookups), so a consumer needs only torch (`torch.jit.load`); and TorchScriptRunner."""

import io
import json

import numpy as np
import torch
from torch import nn

from danlu.export.quiet import quiet

METADATA_FILE = "danlu.json"  # the metadata travels inside the archive as an extra file


def _quantized(module: nn.Module) -> nn.Module:
    # torch.ao's eager dynamic quantization: deprecated in favour of torchao, which danlu does not depend on
    with quiet():
        return torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)


def torchscript_bytes(module: nn.Module, spec, metadata: dict[str, str], int8: bool = False) -> bytes:
    """The serialized TorchScript archive, optionally with int8 Linear weights."""
    inner = _quantized(module) if int8 else module
    with quiet():  # torch.jit announces its own deprecation
        traced = torch.jit.trace(inner, spec.example_inputs(), check_trace=False)
        scripted = spec.script(traced)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer, _extra_files={METADATA_FILE: json.dumps(metadata)})
    return buffer.getvalue()


class TorchScriptRunner:
    """A loaded danlu TorchScript archive (from a path or its bytes), on the CPU, fed by the family's spec."""

    def __init__(self, source, spec) -> None:
        with quiet():
            self.module = torch.jit.load(io.BytesIO(source) if isinstance(source, bytes) else str(source))
        self.spec = spec

    @torch.no_grad()
    def run(self, items) -> np.ndarray:
        parts = self.spec.chunks(items) if hasattr(self.spec, "chunks") else [items]
        outputs = [self.module(*self.spec.script_args(part)).numpy() for part in parts]
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
