"""Local causal language models: a Hugging Face directory (config.json with a *ForCausalLM architecture,
safetensors weights, tokenizer files, optional generation_config.json) or one GGUF file (dequantized by
transformers' GGUF support). Never the hub; remote code only with --trust-remote-code."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu.errors import DanluError

log = logging.getLogger("danlu")  # no torch at import: `danlu serve` checks its argument before loading it


def is_causal_lm(spec: str | Path) -> bool:
    """A GGUF file, or a directory whose config.json names a *ForCausalLM architecture."""
    path = Path(spec)
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForCausalLM") for a in architectures)


@dataclass
class ChatModel:
    model: Any
    tokenizer: Any
    name: str
    context: int  # tokens the model can attend to
    eos_ids: set[int]
    defaults: dict[str, Any] = field(default_factory=dict)  # from generation_config.json
    dtype: str = "float32"
    device: str = "cpu"
    quantize: str | None = None  # int8 or nf4
    weight_bytes: int = 0

    def executor(self, max_batch: int, max_batch_tokens: int, prefill_chunk: int):
        """A fresh executor over this model (danlu.serve.chat.executor)."""
        from danlu.serve.chat.executor import TorchExecutor

        return TorchExecutor(self.model, self.device, max_batch_tokens)


def looks_like_model(spec: str) -> bool:
    """A path that does not exist but names a model: a .gguf file or a hub id (owner/name)."""
    if Path(spec).exists():
        return False
    return spec.lower().endswith(".gguf") or _hub_id(spec)


def _hub_id(spec: str) -> bool:
    """owner/name whose owner is not a local folder (runs/typo is a path, not a hub id)."""
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")) or spec.endswith("/"):
        return False
    return not Path(spec).parent.exists()


def check_path(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.exists():
        if not is_causal_lm(path):
            raise DanluError(
                f"'{spec}' is not a causal language model",
                "pass a directory whose config.json has a *ForCausalLM architecture, or a .gguf file",
            )
        return path
    hub_id = _hub_id(spec)
    raise DanluError(
        f"'{spec}' does not exist",
        "danlu never downloads: pass a local model directory or .gguf file"
        + (" (this looks like a hub id)" if hub_id else ""),
    )


def _dtype(choice: str, device):
    import torch

    if choice != "auto":
        return getattr(torch, choice)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU matmuls in fp32 are the portable choice (bf16 only where AVX512-BF16/AMX)


def _generation_defaults(model) -> tuple[dict[str, Any], set[int]]:
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    defaults = {}
    if config is not None:
        for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
            value = getattr(config, key, None)
            if value is not None:
                defaults[key] = value
        if getattr(config, "do_sample", None) is False:
            defaults["temperature"] = 0.0
    return defaults, eos_ids


def load_chat_model(
    spec: str,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    quantize: str | None = None,
) -> ChatModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from danlu.families.text.pretrained import quiet_transformers
    from danlu.serve.chat import quantize as q

    path = check_path(spec)
    target = torch.device(device)
    q.check_quantize(quantize, target)
    if trust_remote_code:
        log.warning("--trust-remote-code: running Python code that ships with '%s'", spec)
    if path.is_file():
        where, extra = path.parent, {"gguf_file": path.name}
    else:  # safetensors only: a directory's pickled weights are never read
        where, extra = path, {"use_safetensors": True}
    torch_dtype = _dtype(dtype, target)
    placement = {}
    if quantize and target.type == "cuda":
        placement = {
            "quantization_config": q.bitsandbytes_config(quantize, torch_dtype),
            "device_map": {"": target},
        }
    # GGUF conversion draws its own progress bar on stderr
    with quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                where,
                local_files_only=True,
                trust_remote_code=trust_remote_code,
                **{k: v for k, v in extra.items() if k == "gguf_file"},
            )
            model = AutoModelForCausalLM.from_pretrained(
                where,
                local_files_only=True,
                trust_remote_code=trust_remote_code,
                dtype=torch_dtype,
                **extra,
                **placement,
            )
        except DanluError:
            raise
        except Exception as exc:
            raise DanluError(
                f"cannot load '{spec}': {exc}".splitlines()[0],
                "check the model files (config.json, safetensors weights, tokenizer) or the GGUF file",
            ) from None
    if not placement:
        model.to(target)
    model.eval()
    if quantize and target.type == "cpu":
        q.quantize_int8_cpu(model)
    q.return_freed_memory()
    defaults, eos_ids = _generation_defaults(model)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    name = path.stem if path.is_file() else path.name
    return ChatModel(
        model,
        tokenizer,
        name,
        context,
        eos_ids,
        defaults,
        str(torch_dtype).split(".")[-1],
        str(target),
        quantize,
        q.weight_bytes(model),
    )
