"""danlu.serve(source, ...): which server a source gets, its settings checked, then the server run.

Nothing heavy is imported until the source and the settings have been checked: a limit out of range, a
hub id or a wrong engine is one line in well under a second, before torch, transformers or the model
load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from danlu.errors import DanluError


def serve(
    source: str | Path,
    *,
    workers: int = 1,
    engine: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    quantize: str | None = None,
    trust_remote_code: bool = False,
    vllm: Any = None,
    **settings: Any,
) -> int:
    """Serve a finished run's predictions, a local language model's chat completions (a Hugging Face
    directory whose config.json names a *ForCausalLM architecture, or a .gguf file), or a local encoder's
    embeddings and zero-shot labels (a CLIP, SigLIP or encoder-only text directory: OpenAI's
    /v1/embeddings and /v1/zero-shot, danlu.serve.embeddings), until SIGINT or SIGTERM; returns the exit
    code.

    Args:
        workers: server processes (runs only).
        engine: runs: "torch" (default) or "onnx"; chat models: "auto" (default: llama.cpp for a .gguf
            file when llama-cpp-python is installed, vllm for a directory when vLLM is installed, else
            torch), "torch", "llama.cpp" or "vllm".
        dtype, device, quantize, trust_remote_code: how a chat model is loaded (as `danlu chat`).
        vllm: danlu.serve.chat.model.VllmOptions (max_model_len, kv_cache_gb, tensor_parallel).
        settings: the fields of danlu.serve.settings.ServeSettings (runs: host, port, api_key, engine,
            max_batch, max_rows, timeout_s, ...), ChatSettings (chat models: host, port, api_key,
            max_batch, max_tokens, template, ...) or EmbedSettings (encoders: max_batch, max_rows,
            truncate, matryoshka, ...).

    Raises:
        DanluError: a bad run directory, model, setting or warm-up, before anything is bound.
    """
    from danlu.embeddings.detect import is_encoder_model
    from danlu.serve.chat.model import check_path, is_causal_lm, looks_like_model, served_model
    from danlu.serve.settings import ChatSettings, EmbedSettings, ServeSettings, check_address

    source = served_model(str(source))  # a fine-tuned causal LM's run: the model it holds
    if is_encoder_model(source):
        if workers != 1:
            raise DanluError("an embedding model is served by one process", "leave out --workers")
        if engine not in (None, "auto", "torch"):
            raise DanluError(f"an embedding model runs on torch, not {engine}", "leave out --engine")
        settings.pop("trust_model_code", None)
        embed_settings = EmbedSettings(
            model=str(source), dtype="float32" if dtype == "auto" else dtype, **settings
        )
        embed_settings.check()  # before torch is imported
        check_address(embed_settings.host, embed_settings.port)
        from danlu.serve import shell
        from danlu.serve.embeddings import create_embed_app

        return shell.run(create_embed_app(embed_settings))
    if not (is_causal_lm(source) or looks_like_model(str(source))):
        if workers < 1:
            raise DanluError("--workers must be at least 1", "e.g. --workers 2")
        if engine in ("llama.cpp", "vllm"):
            raise DanluError(
                f"--engine {engine} runs chat models; a run serves on torch or onnx",
                "pass --engine torch or onnx",
            )
        engine = "torch" if engine in (None, "auto") else engine
        run_settings = ServeSettings(run_dir=str(source), engine=engine, **settings)
        run_settings.check()  # before torch is imported
        check_address(run_settings.host, run_settings.port)
        from danlu.serve import shell
        from danlu.serve.app import create_app

        app = create_app(run_settings)  # fail here, before binding, on a bad run or warm-up
        if workers == 1:
            return shell.run(app)
        return shell.run_workers("danlu.serve.app:app_from_env", run_settings, workers)
    check_path(str(source))  # a hub id or a missing file is the first thing to say
    if engine == "onnx":
        raise DanluError(
            "--engine onnx serves runs; a chat model runs on torch, llama.cpp or vllm",
            "pass --engine auto, torch, llama.cpp or vllm",
        )
    if workers != 1:
        raise DanluError("a chat model is served by one process", "leave out --workers; raise --max-batch")
    chat_settings = ChatSettings(**settings)
    chat_settings.check()  # before torch is imported and the model loads
    check_address(chat_settings.host, chat_settings.port)
    from danlu.serve import shell
    from danlu.serve.chat.app import create_chat_app
    from danlu.serve.chat.model import load_chat_model

    chat = load_chat_model(
        str(source), dtype, device, trust_remote_code, quantize, engine or "auto", serving=True, vllm=vllm
    )
    return shell.run(create_chat_app(chat, chat_settings, engine_thread=False))
