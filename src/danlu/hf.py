"""transformers as danlu uses it, on every version its range admits (`transformers>=5.18,<6`, tested at
both ends): models, tokenizers and configs from local files only, with no code from the model's folder
unless asked (--trust-remote-code) and no kernels from the hub, quietly; and the model call whose names
moved between those versions. Every transformers load in danlu goes through here, and every model
save."""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import os
from collections.abc import Iterator
from typing import Any

from danlu.quiet import quiet


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars, load reports or advice from transformers while danlu loads a model."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(io.StringIO()), quiet():
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def refuse_hub_kernels() -> None:
    """No kernels downloaded from the hub, in this process. From 5.25 transformers swaps layers of the
    models it loads for compiled kernels fetched from the hub (the `kernels` package, which it requires),
    on CUDA at least: offline the load fails, online it runs code nobody asked for. The variable also
    stops the kernels some quantized layers fetch when they first run. Versions before 5.25 load hub
    kernels only when use_kernels=True, and load_model passes False to all of them."""
    os.environ["USE_HUB_KERNELS"] = "NO"


def load_model(auto_class: Any, where: Any, *, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """auto_class.from_pretrained(where) from local files, without hub kernels."""
    refuse_hub_kernels()
    return auto_class.from_pretrained(
        where, local_files_only=True, trust_remote_code=trust_remote_code, use_kernels=False, **kwargs
    )


def load_files(auto_class: Any, where: Any, *, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """A tokenizer or config: auto_class.from_pretrained(where) from local files."""
    refuse_hub_kernels()
    return auto_class.from_pretrained(
        where, local_files_only=True, trust_remote_code=trust_remote_code, **kwargs
    )


def load_local(auto_class: Any, path: Any, what: str) -> Any:
    """A tokenizer or config (auto_class) of a local model directory or GGUF file (from its metadata),
    quietly: GGUF parsing draws on stderr. A failure is one DanluError naming `what` and the path."""
    from danlu.errors import DanluError

    where, extra = (path.parent, {"gguf_file": path.name}) if path.is_file() else (path, {})
    with quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
        try:
            return load_files(auto_class, where, **extra)
        except Exception as exc:
            raise DanluError(
                f"cannot load the {what} of '{path}': {exc}".splitlines()[0], f"check the {what} files"
            ) from None


def save_model(model: Any, folder: Any) -> None:
    """model.save_pretrained(folder) in safetensors, quietly. transformers unwraps the model through
    accelerate first, which imports DeepSpeed whenever it is installed: danlu imports it beforehand,
    without the MLflow import DeepSpeed's autotuner would add (danlu.training.strategies.import_deepspeed;
    benchmarks/deepspeed_import.py times the difference) and without its import-time warning on stdout."""
    from danlu.training.strategies import import_deepspeed

    import_deepspeed()
    with quiet_transformers():
        model.save_pretrained(folder, safe_serialization=True)


@functools.cache
def takes(model_class: type, keyword: str) -> bool:
    """Whether a model class's forward() has a parameter of that name."""
    return keyword in inspect.signature(model_class.forward).parameters


def _cache_keyword(model_class: type) -> str:
    return "cache" if takes(model_class, "cache") else "past_key_values"


def forward_with_cache(model: Any, cache: Any, **inputs: Any) -> tuple[Any, Any]:
    """model(**inputs) reading and extending a KV cache (None: a new one); returns (logits, the cache).
    transformers 5.24 renamed the cache's argument and output field from `past_key_values` to `cache`;
    models whose code predates it (remote code too) still take the old name, so the name is read from
    the model's own forward."""
    keyword = _cache_keyword(type(model))
    out = model(**inputs, **{keyword: cache}, use_cache=True)
    return out.logits, getattr(out, keyword)
