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

from danlu.errors import DanluError, one_line

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
    engine: str = "torch"  # what runs `model`: "torch", "llama.cpp" (a LlamaCppModel) or "vllm" (a VllmModel)
    engine_reason: str = ""  # why engine auto chose it
    lora: str | None = None  # vllm: the fine-tuned run's LoRA adapter it serves over the base model

    def executor(self, max_batch: int, max_batch_tokens: int, prefill_chunk: int):
        """A fresh executor over this model (danlu.serve.chat.executor)."""
        if self.engine == "llama.cpp":
            from danlu.serve.chat.llamacpp import LlamaCppExecutor

            return LlamaCppExecutor(self.model, max_batch, max_batch_tokens, prefill_chunk)
        from danlu.serve.chat.executor import TorchExecutor

        return TorchExecutor(self.model, self.device, max_batch, max_batch_tokens)


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


def fine_tuned_model(spec: str | Path) -> Path | None:
    """RUN/hf of a run directory that holds a fine-tuned causal LM (its hf/ is a *ForCausalLM), else None.
    Reads two files: no family, no torch."""
    from danlu.run import RunDir

    run = RunDir(spec)
    if run.preprocess.is_file() and is_causal_lm(run.hf):
        return run.hf
    return None


def served_model(spec: str) -> str:
    """The model a spec names: a fine-tuned causal LM's finished run stands for the model directory it
    holds (RUN/hf); anything else is itself."""
    from danlu.run import RunDir

    model = fine_tuned_model(spec)
    if model is None:
        return spec
    RunDir(spec).require_complete()
    return str(model)


def model_name(path: Path) -> str:
    """The name /v1/models gives a model: its file's stem, its directory's name, or for a fine-tuned
    run's RUN/hf the run's name."""
    from danlu.run import HF, REPORT

    if path.is_file():
        return path.stem
    if path.name == HF and (path.parent / REPORT).is_file():
        return path.parent.name
    return path.name


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


ENGINES = ("auto", "torch", "llama.cpp", "vllm")


@dataclass
class VllmOptions:
    """How the vllm engine runs a model: --max-model-len, --kv-cache-gb, --tensor-parallel."""

    max_model_len: int | None = None  # None: the model's context, as far as the KV cache holds it
    kv_cache_gb: float | None = None  # None: CPU 4 GiB or half the free memory; GPU vLLM's default
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        """Values vLLM could never run with are refused here, before anything loads."""
        if self.max_model_len is not None and self.max_model_len < 1:
            raise DanluError("--max-model-len must be at least 1", "e.g. --max-model-len 4096")
        if self.kv_cache_gb is not None and not self.kv_cache_gb > 0:
            raise DanluError("--kv-cache-gb must be above 0", "e.g. --kv-cache-gb 4")
        if self.tensor_parallel < 1:
            raise DanluError("--tensor-parallel must be at least 1", "the GPUs to shard over, e.g. 2")

    @property
    def asked(self) -> list[str]:
        return [
            name
            for name, value in (
                ("--max-model-len", self.max_model_len),
                ("--kv-cache-gb", self.kv_cache_gb),
                ("--tensor-parallel", self.tensor_parallel if self.tensor_parallel != 1 else None),
            )
            if value is not None
        ]


def choose_engine(
    path: Path,
    engine: str,
    dtype: str,
    device: str,
    quantize: str | None,
    serving: bool = False,
    vllm: VllmOptions | None = None,
) -> tuple[str, str]:
    """(the engine for a model, why auto chose it). auto: llama.cpp for a GGUF file when it is installed
    and nothing asks for torch's options; vLLM for a directory when it is installed, danlu is serving and
    nothing asks for --quantize (vLLM starts in about 100 s on a CPU, so a terminal chat stays on torch);
    else torch."""
    from danlu.serve.chat import vllm as vllm_engine

    if engine not in ENGINES:
        raise DanluError(f"unknown chat engine '{engine}'", f"pass one of {', '.join(ENGINES)}")
    gguf = path.is_file()
    vllm_asked = (vllm or VllmOptions()).asked
    if vllm_asked and engine not in ("vllm", "auto"):
        what = "is a vLLM option" if len(vllm_asked) == 1 else "are vLLM options"
        raise DanluError(f"{', '.join(vllm_asked)} {what}", "pass --engine vllm, or leave them out")
    if engine == "vllm":
        if gguf:
            raise DanluError(
                f"the vllm engine runs Hugging Face directories; '{path}' is a GGUF file",
                "serve it with --engine llama.cpp (or torch)",
            )
        if quantize is not None:
            raise DanluError(
                f"--quantize {quantize} is a torch option", "leave it out, or pass --engine torch"
            )
        if not vllm_engine.available():
            raise DanluError("the vllm engine needs vLLM", vllm_engine.INSTALL)
        return "vllm", "asked for"
    if engine == "auto" and not gguf:
        if vllm_asked or (serving and quantize is None and vllm_engine.available()):
            if not vllm_engine.available():
                raise DanluError(f"{', '.join(vllm_asked)} need the vllm engine", vllm_engine.INSTALL)
            why = "vLLM is installed and this is a Hugging Face directory"
            log.info("engine auto: vllm (%s; --engine torch starts in seconds)", why)
            return "vllm", why
        if serving and quantize is None:
            return "torch", f"vLLM is not installed ({vllm_engine.INSTALL})"
        return "torch", "a Hugging Face directory" if not serving else "--quantize is torch's"
    return _choose_for_gguf(path, engine, dtype, device, quantize, gguf)


def _choose_for_gguf(
    path: Path, engine: str, dtype: str, device: str, quantize: str | None, gguf: bool
) -> tuple[str, str]:
    from danlu.serve.chat import llamacpp

    torch_only = [
        name
        for name, asked in (
            (f"--device {device}", device != "cpu"),
            (f"--dtype {dtype}", dtype != "auto"),
            (f"--quantize {quantize}", quantize is not None),
        )
        if asked
    ]
    if engine == "llama.cpp":
        if not gguf:
            raise DanluError(
                f"the llama.cpp engine runs GGUF files; '{path}' is a Hugging Face directory",
                "serve it with --engine torch, or write a GGUF file first: danlu export MODEL --format gguf",
            )
        if torch_only:
            raise DanluError(
                f"{', '.join(torch_only)} are torch options; llama.cpp runs the GGUF file's own weight types "
                "on the CPU",
                "leave them out, or pass --engine torch",
            )
        if not llamacpp.available():
            raise DanluError("the llama.cpp engine needs llama-cpp-python", llamacpp.INSTALL)
        return "llama.cpp", "asked for"
    if engine == "torch" or not gguf:
        return "torch", "asked for" if engine == "torch" else "a Hugging Face directory"
    if torch_only:
        why = f"{', '.join(torch_only)}: the GGUF file dequantized"
        log.info("engine auto: torch (%s)", why)
        return "torch", why
    if not llamacpp.available():
        why = f"llama-cpp-python is not installed: the GGUF file dequantized ({llamacpp.INSTALL})"
        log.info("engine auto: torch (%s)", why)
        return "torch", why
    return "llama.cpp", "a GGUF file, and llama-cpp-python is installed"


def _generation_defaults(generation_config, config) -> tuple[dict[str, Any], set[int]]:
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    defaults = {}
    if generation_config is not None:
        for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
            value = getattr(generation_config, key, None)
            if value is not None:
                defaults[key] = value
        if getattr(generation_config, "do_sample", None) is False:
            defaults["temperature"] = 0.0
    return defaults, eos_ids


def load_chat_model(
    spec: str,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    quantize: str | None = None,
    engine: str = "auto",
    serving: bool = False,
    vllm: VllmOptions | None = None,
) -> ChatModel:
    """A chat model, run by torch, llama.cpp (a GGUF file) or vLLM (a directory); see choose_engine. The
    tokenizer, chat template, context and generation defaults come from the same files whichever runs it.

    Raises:
        DanluError: a missing or unreadable model, or options the engine cannot take.
    """
    path = check_path(spec)
    chosen, why = choose_engine(path, engine, dtype, device, quantize, serving, vllm)
    if chosen == "llama.cpp":
        chat = _load_llamacpp(path)
    elif chosen == "vllm":
        chat = _load_vllm(path, dtype, device, trust_remote_code, vllm or VllmOptions())
    else:
        chat = _load_torch(path, spec, dtype, device, trust_remote_code, quantize)
    chat.engine_reason = why
    return chat


def _load_torch(
    path: Path, spec: str, dtype: str, device: str, trust_remote_code: bool, quantize: str | None
) -> ChatModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from danlu.hf import load_files, load_model, quiet_transformers
    from danlu.serve.chat import quantize as q

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
            tokenizer = load_files(
                AutoTokenizer,
                where,
                trust_remote_code=trust_remote_code,
                **{k: v for k, v in extra.items() if k == "gguf_file"},
            )
            model = load_model(
                AutoModelForCausalLM,
                where,
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
    defaults, eos_ids = _generation_defaults(getattr(model, "generation_config", None), model.config)
    context = context_length(model.config)
    name = model_name(path)
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


def context_length(config) -> int:
    return int(getattr(config, "max_position_embeddings", 0) or 2048)


def generation_info(path: Path) -> tuple[dict[str, Any], set[int], int]:
    """(generation defaults, end-of-sequence ids, context) of a model directory or GGUF file, from its
    files alone (no weights), as load_chat_model finds them on the loaded model."""
    from transformers import GenerationConfig

    from danlu.hf import load_files, quiet_transformers

    config = model_config(path)
    with quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
        try:
            generation = (
                load_files(GenerationConfig, path)
                if path.is_dir() and (path / "generation_config.json").is_file()
                else GenerationConfig.from_model_config(config)
            )
        except Exception as exc:
            raise DanluError(
                f"cannot read '{path}': {exc}".splitlines()[0], "check the model files"
            ) from None
    defaults, eos_ids = _generation_defaults(generation, config)
    return defaults, eos_ids, context_length(config)


def model_config(path: Path) -> Any:
    """The transformers config of a model directory or GGUF file (its metadata), without its weights."""
    from transformers import AutoConfig

    from danlu.hf import load_local

    return load_local(AutoConfig, path, "config")


def _load_llamacpp(path: Path) -> ChatModel:
    """A GGUF file on llama.cpp; its tokenizer, template, config and generation defaults read by
    transformers from the same file, as the torch engine reads them, so a request renders to the same
    tokens whichever engine runs."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from danlu.hf import load_files, quiet_transformers
    from danlu.serve.chat.llamacpp import LlamaCppModel

    where, gguf_file = path.parent, path.name
    with quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
        try:
            tokenizer = load_files(AutoTokenizer, where, gguf_file=gguf_file)
            config = load_files(AutoConfig, where, gguf_file=gguf_file)
        except Exception as exc:
            raise DanluError(f"cannot read '{path}': {exc}".splitlines()[0], "check the GGUF file") from None
    model = LlamaCppModel.load(path)
    defaults, eos_ids = _generation_defaults(GenerationConfig.from_model_config(config), config)
    file_type = model.description.split()[-1] if model.description else "gguf"
    return ChatModel(
        model, tokenizer, path.stem, context_length(config), eos_ids, defaults, file_type, "cpu", None,
        model.size,
        engine="llama.cpp",
    )  # fmt: skip


def _load_vllm(
    path: Path, dtype: str, device: str, trust_remote_code: bool, options: VllmOptions
) -> ChatModel:
    """A model directory on vLLM; its tokenizer, template and generation defaults read by transformers
    from the same files, as the torch engine reads them, so a request renders to the same prompt ids."""
    from transformers import AutoTokenizer

    from danlu.hf import load_files, quiet_transformers
    from danlu.serve.chat.vllm import VllmModel

    with quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
        try:
            tokenizer = load_files(AutoTokenizer, path, trust_remote_code=trust_remote_code)
        except Exception as exc:
            message = f"cannot read '{path}': {exc}".splitlines()[0]
            raise DanluError(message, "check the model files") from None
    defaults, eos_ids, _ = generation_info(path)
    lora, why = run_lora(path)
    if lora is not None:
        log.info(
            "vLLM serves the run's LoRA adapter %s over its base model %s, unmerged", lora.adapter, lora.base
        )
    elif why:
        log.info("vLLM serves the run's merged weights: %s", why)
    model = VllmModel.start(
        path if lora is None else lora.base,
        lora=lora,
        dtype=dtype,
        device=device,
        max_model_len=options.max_model_len,
        kv_cache_gb=options.kv_cache_gb,
        tensor_parallel=options.tensor_parallel,
        trust_remote_code=trust_remote_code,
    )
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    chat = ChatModel(
        model, tokenizer, model_name(path), model.context, eos_ids, defaults, model.dtype, device, None,
        weights, engine="vllm",
    )  # fmt: skip
    chat.lora = None if lora is None else str(lora.adapter)
    return chat


@dataclass
class RunLora:
    """A fine-tuned run's LoRA adapter as vLLM serves it: over its base model, unmerged."""

    base: Path
    adapter: Path
    rank: int  # the adapter's r
    name: str  # the run's


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's max_lora_rank choices


def run_lora(path: Path) -> tuple[RunLora | None, str]:
    """The LoRA adapter of the fine-tuned run whose RUN/hf `path` is, when vLLM can serve it over the
    base model; else None and why not ("" when `path` is no LoRA run's)."""
    adapter = path.parent / "adapter"
    if path.name != "hf" or not (adapter / "adapter_config.json").is_file():
        return None, ""
    try:
        config = json.loads((adapter / "adapter_config.json").read_text())
        base = Path(str(config.get("base_model_name_or_path") or ""))
        rank = int(config.get("r") or 0)
        vocab = json.loads((path / "config.json").read_text()).get("vocab_size")
        base_vocab = None
        if base.is_dir() and is_causal_lm(base):
            base_vocab = json.loads((base / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError, TypeError) as exc:
        return None, f"its adapter is unreadable ({one_line(exc)})"
    if base_vocab is None:
        return None, f"its base model '{base}' is no local Hugging Face directory"
    if config.get("modules_to_save"):
        return None, "its adapter also holds whole modules, which vLLM's LoRA does not load"
    if vocab != base_vocab:
        return None, f"the run changed the vocabulary ({base_vocab} to {vocab} tokens)"
    if not 1 <= rank <= VLLM_LORA_RANKS[-1]:
        return None, f"its rank {rank} is outside vLLM's 1-{VLLM_LORA_RANKS[-1]}"
    return RunLora(base, adapter, rank, model_name(path)), ""
