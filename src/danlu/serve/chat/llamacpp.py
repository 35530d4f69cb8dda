"""The llama.cpp executor: GGUF files on llama.cpp's own kernels (the quantized weights as they are), through
llama-cpp-python's low-level C API, batched continuously.

One llama.cpp context serves every sequence: `n_seq_max` is --max-batch, the KV cache is unified (any
sequence may use any cell, so one long conversation and many short ones share the same cells, instead of
each slot owning n_ctx / n_seq_max of them), and each engine step is one `llama_batch` mixing prompt
chunks and every running sequence's decode token, with logits asked for only where a sequence needs its
next token. A sequence's slot is its llama.cpp seq_id; freeing it removes its cells. When llama_decode
finds no cells for a step (it leaves the cache as it was), the executor raises NoRoom and the scheduler
preempts.

The C API moves: the KV functions were renamed twice in a year (llama_kv_cache_* -> llama_kv_self_* ->
llama_memory_*), as were the model and context constructors; `_Api` is the one place that knows."""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from danlu.errors import DanluError
from danlu.serve.chat.executor import Chunk, NoRoom

log = logging.getLogger("danlu")
GGML_LOG_LEVEL_ERROR = 4
IDLE_PREFILL = 2048
INSTALL = "pip install 'danlu[llama]' (it builds llama.cpp from source where no wheel fits: minutes)"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


class _Api:
    """The llama.cpp functions danlu calls, under whichever names this llama-cpp-python has."""

    _lock = threading.Lock()
    _instance: _Api | None = None

    def __init__(self) -> None:
        try:
            import llama_cpp
        except ImportError as exc:  # an install that does not load (a broken build) says why too
            raise DanluError(f"llama-cpp-python does not import: {exc}", INSTALL) from None
        self.lib = lib = llama_cpp
        self.version = getattr(llama_cpp, "__version__", "?")
        self.load_model = _first(lib, "llama_model_load_from_file", "llama_load_model_from_file")
        self.free_model = _first(lib, "llama_model_free", "llama_free_model")
        self.new_context = _first(lib, "llama_init_from_model", "llama_new_context_with_model")
        if hasattr(lib, "llama_memory_seq_rm"):
            self.seq_rm = lambda ctx, seq: lib.llama_memory_seq_rm(lib.llama_get_memory(ctx), seq, -1, -1)
            self.seq_cp = lambda ctx, src, dst, n: lib.llama_memory_seq_cp(
                lib.llama_get_memory(ctx), src, dst, 0, n
            )
        else:
            remove = _first(lib, "llama_kv_self_seq_rm", "llama_kv_cache_seq_rm")
            copy = _first(lib, "llama_kv_self_seq_cp", "llama_kv_cache_seq_cp")
            self.seq_rm = lambda ctx, seq: remove(ctx, seq, -1, -1)
            self.seq_cp = lambda ctx, src, dst, n: copy(ctx, src, dst, 0, n)
        if hasattr(lib, "llama_vocab_n_tokens"):
            self.n_vocab = lambda model: lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        else:
            self.n_vocab = lib.llama_n_vocab
        self.n_ctx_train = _first(lib, "llama_model_n_ctx_train", "llama_n_ctx_train")
        if hasattr(lib, "llama_model_get_vocab"):
            self.vocab = lib.llama_model_get_vocab
        else:  # tokenize took the model itself
            self.vocab = lambda model: model
        # llama.cpp logs every load to stderr: its errors go to danlu's log, the rest to debug
        self._log_callback = lib.llama_log_callback(_route_log)
        lib.llama_log_set(self._log_callback, ctypes.c_void_p(0))
        lib.llama_backend_init()

    @classmethod
    def get(cls) -> _Api:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance


def _first(lib: Any, *names: str) -> Any:
    for name in names:
        if hasattr(lib, name):
            return getattr(lib, name)
    raise DanluError(
        f"this llama-cpp-python ({getattr(lib, '__version__', '?')}) has none of {', '.join(names)}",
        "pip install -U 'llama-cpp-python>=0.3.16,<0.4'",
    )


def _route_log(level: int, text: bytes, _data: Any) -> None:
    message = text.decode("utf-8", "replace").rstrip()
    if message:
        log.log(logging.WARNING if level == GGML_LOG_LEVEL_ERROR else logging.DEBUG, "llama.cpp: %s", message)


def reference_llama(path: str | Path, **kwargs: Any) -> Any:
    """llama-cpp-python's own high-level `Llama` on a GGUF file, its weights in the same plain CPU buffers
    as danlu's executor (see LlamaCppModel.load): the reference danlu's tests and benchmarks compare with."""
    import llama_cpp
    from llama_cpp import llama_cpp as c_api

    default = c_api.llama_model_default_params

    def plain():
        params = default()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    c_api.llama_model_default_params = plain
    try:
        return llama_cpp.Llama(str(path), verbose=False, **kwargs)
    finally:
        c_api.llama_model_default_params = default


def threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class LlamaCppModel:
    """A GGUF file loaded by llama.cpp (weights mapped, not copied)."""

    path: Path
    pointer: Any
    n_vocab: int
    n_ctx_train: int
    size: int  # bytes of weights
    description: str  # llama.cpp's: architecture, size, file type ("llama 135M Q4_1")

    @classmethod
    def load(cls, path: Path) -> LlamaCppModel:
        api = _Api.get()
        lib = api.lib
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0  # danlu's llama.cpp executor runs on the CPU
        if hasattr(params, "use_extra_bufts"):
            # weights in plain CPU buffers: llama.cpp's AMX buffers (chosen wherever the CPU reports AMX)
            # crash its batched matmuls on quantized weights on such machines (segfault in
            # ggml_backend_amx_mul_mat on a Xeon with AMX, llama-cpp-python 0.3.36)
            params.use_extra_bufts = False
        pointer = api.load_model(str(path).encode(), params)
        if not pointer:
            raise DanluError(
                f"llama.cpp cannot load '{path}' (see the log above)",
                "check the GGUF file, or serve it with --engine torch",
            )
        buffer = ctypes.create_string_buffer(256)
        lib.llama_model_desc(pointer, buffer, len(buffer))
        return cls(
            path,
            pointer,
            int(api.n_vocab(pointer)),
            int(api.n_ctx_train(pointer)),
            int(lib.llama_model_size(pointer)),
            buffer.value.decode("utf-8", "replace"),
        )

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of text (no BOS, special tokens as text)."""
        api = _Api.get()
        data = text.encode("utf-8")
        tokens = (api.lib.llama_token * (len(data) + 8))()
        n = api.lib.llama_tokenize(
            api.vocab(self.pointer), data, len(data), tokens, len(tokens), False, False
        )
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens")
        return list(tokens[:n])

    def logits(self, ids: list[int]) -> np.ndarray:
        """The logits [len(ids), vocab] of one sequence, every position, in one pass."""
        executor = LlamaCppExecutor(self, 1, len(ids) + 1, len(ids), logits_all=True)
        try:
            rows = executor.forward([Chunk(0, ids, 0, True)])[0]
            return rows.numpy()
        finally:
            executor.close()

    def greedy(self, ids: list[int], tokens: int) -> list[int]:
        """The argmax continuation of ids, `tokens` long (the export's check)."""
        executor = LlamaCppExecutor(self, 1, len(ids) + tokens + 1, len(ids))
        out: list[int] = []
        try:
            pending, start = list(ids), 0
            while len(out) < tokens:
                row = executor.forward([Chunk(0, pending, start, True)])[0]
                start += len(pending)
                out.append(int(row.argmax()))
                pending = [out[-1]]
            return out
        finally:
            executor.close()

    def __del__(self) -> None:
        if getattr(self, "pointer", None) and _Api._instance is not None:
            _Api._instance.free_model(self.pointer)
            self.pointer = None


class LlamaCppExecutor:
    name = "llama.cpp"
    shares = True

    def __init__(
        self, model: LlamaCppModel, max_batch: int, cells: int, prefill_chunk: int, logits_all: bool = False
    ) -> None:
        """logits_all: a chunk that asks for logits gets them at every position [tokens, vocab] (the
        export's perplexity check), not only at its last."""
        self.api = api = _Api.get()
        lib = api.lib
        self.model, self.budget, self.logits_all = model, cells, logits_all
        # a step holds prefill_chunk prompt tokens and every running sequence's token; with nothing
        # decoding, up to IDLE_PREFILL prompt tokens: prompts that arrive together get their first tokens
        # from one llama_decode (split into n_ubatch pieces inside it), not one chunk after another
        self.idle_prefill = max(prefill_chunk, IDLE_PREFILL)
        self.n_batch = self.idle_prefill + max_batch
        params = lib.llama_context_default_params()
        params.n_ctx = cells
        params.n_batch = self.n_batch
        params.n_ubatch = min(self.n_batch, 512)
        params.n_seq_max = max_batch
        if hasattr(params, "kv_unified"):
            params.kv_unified = True
        params.n_threads = params.n_threads_batch = threads()
        params.no_perf = True
        if hasattr(params, "flash_attn_type"):  # as llama-cpp-python's Llama runs by default
            params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = api.new_context(model.pointer, params)
        if not self.ctx:
            raise DanluError(
                f"llama.cpp cannot make a context of {cells} cells for {max_batch} sequences (see the log)",
                "lower --max-batch-tokens or --max-batch",
            )
        self.cells = int(lib.llama_n_ctx(self.ctx))  # llama.cpp rounds n_ctx up (to 256s) from the budget
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)

    def fits(self, widths: list[int]) -> bool:
        return sum(widths) <= self.budget  # unified cells: sequences take what they use, no more

    def forward(self, chunks: list[Chunk]) -> list[torch.Tensor | Exception | None]:
        lib, batch = self.api.lib, self.batch
        total = sum(len(chunk.tokens) for chunk in chunks)
        if total > self.n_batch:  # checked before writing: the batch's arrays hold n_batch tokens
            raise RuntimeError(f"a step of {total} tokens is over the context's batch of {self.n_batch}")
        wanted: list[tuple[int, int]] = []  # (chunk, batch index) where logits come back
        n = 0
        for i, chunk in enumerate(chunks):
            last = len(chunk.tokens) - 1
            for j, token in enumerate(chunk.tokens):
                batch.token[n] = token
                batch.pos[n] = chunk.start + j
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = chunk.slot
                wanted_here = chunk.logits and (j == last or self.logits_all)
                batch.logits[n] = wanted_here
                if wanted_here:
                    wanted.append((i, n))
                n += 1
        batch.n_tokens = n
        code = lib.llama_decode(self.ctx, batch)
        if code == 1:
            raise NoRoom()
        if code != 0:
            raise RuntimeError(f"llama_decode failed with code {code}")
        rows: dict[int, list[np.ndarray]] = {}
        for i, index in wanted:
            row = np.ctypeslib.as_array(
                lib.llama_get_logits_ith(self.ctx, index), shape=(self.model.n_vocab,)
            )
            rows.setdefault(i, []).append(row.copy())
        results: list[torch.Tensor | Exception | None] = [None] * len(chunks)
        for i, got in rows.items():
            results[i] = torch.from_numpy(np.stack(got) if self.logits_all else got[0])
        return results

    def free(self, slot: int) -> None:
        self.api.seq_rm(self.ctx, slot)  # cells another sequence shares stay, for it

    def share(self, source: int, target: int, tokens: int) -> None:
        # in the unified cache a copy adds `target` to the cells' sequences: no data moves, no cell is used
        self.api.seq_cp(self.ctx, source, target, tokens)

    def close(self) -> None:
        if self.ctx:
            self.api.lib.llama_batch_free(self.batch)
            self.api.lib.llama_free(self.ctx)
            self.ctx = None

    def __del__(self) -> None:
        if getattr(self, "ctx", None):
            self.close()
