"""TorchScript: a family's traced serving module, wrapped by the family where raw inputs need scripting
(tabular: string lookups), so a consumer needs only torch (`torch.jit.load`; in danlu, the
TorchScriptRunner of danlu.runners)."""

import io
import json

import torch
from torch import nn

from danlu.quiet import quiet

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
