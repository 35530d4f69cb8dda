"""Continuous batching in one generating thread: the scheduler. The model runs in an executor
(danlu.serve.chat.executor: torch, or llama.cpp for GGUF files) and what its logits become is the output
processor's (danlu.serve.chat.output), so every executor samples, detokenizes and stops alike.

Each step: (1) drop cancelled sequences and free their slots; (2) one chunk per running sequence (its last
token, to decode) and, within `prefill_chunk` prompt tokens in all, prompt chunks of waiting sequences,
oldest first (a long prompt takes several steps, so running streams are not stalled by it; with none
running, the executor's idle_prefill, when it has one, bounds them instead); (3) one
executor pass over all chunks; each chunk that ends a sequence's pending tokens gives its next token, and
a sequence whose prompt is done joins the running batch.

Admission: a sequence takes a slot only while the executor says every admitted sequence, grown to its
prompt plus max_tokens, fits its cache (`max_batch_tokens`), and at most `max_batch` run; one that does
not fit waits for others to finish and never runs the process out of memory. Should the executor still
find no room for a step, the youngest admitted sequence is preempted: its cache is dropped, and it goes
back to the front of the queue to be recomputed (prompt and output so far), its stream unbroken, and
nothing more is admitted until a sequence leaves (so the step that had no room is not retried as it was).

Prefix sharing (executors that can: llama.cpp, torch): a newly admitted sequence starts from the cells of the
longest prefix of its tokens that an admitted sequence holds (the same tokens at the same positions:
what it would compute itself), so a system prompt every request shares is computed once while any
request holding it runs. A waiting request that shares SHARE_MIN or more leading tokens with a prompt
prefilled in this step joins one step later, to share them.

A failure inside one sequence (its prefill, its sampling) ends that sequence with an error and no other;
only a failed shared pass ends the sequences in it."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from danlu.errors import DanluError, one_line
from danlu.serve.chat.executor import Chunk, Executor, NoRoom
from danlu.serve.chat.model import ChatModel
from danlu.serve.chat.output import Event, OutputProcessor, Sequence
from danlu.serve.chat.sampling import SamplingParams

__all__ = ["Engine", "Event", "Sequence"]
log = logging.getLogger("danlu")
SHARE_MIN = 16  # leading tokens in common with a prompt being prefilled that are worth a step's wait


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens a and b have in common, at most limit."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Scheduler:
    """What every scheduler shares (Engine here, VllmEngine for vLLM): generating in the calling thread or
    a thread of its own, stopping, queueing, and the blocking iterator of one sequence's events.
    Subclasses give _once (take what was submitted, run a step), _cancel_all, close, load, kv_usage and
    check_fits."""

    thread_name = "danlu-chat-engine"

    def __init__(
        self,
        chat: ChatModel,
        max_batch: int = 8,
        prefill_chunk: int = 512,
        extra_stops: list[str] | None = None,
        on_step: Callable[[int, int], None] | None = None,
        max_batch_tokens: int | None = None,
    ) -> None:
        self.chat = chat
        self.max_batch = max_batch
        # cache cells of the running batch, as the executor counts them; None: max_batch x the context
        self.max_batch_tokens = max_batch_tokens or max_batch * chat.context
        self.prefill_chunk = prefill_chunk
        self.output = OutputProcessor(chat.tokenizer, chat.eos_ids, chat.context, extra_stops or [])
        self.on_step = on_step  # (running, waiting) after each step: the server's gauges
        self.preemptions = 0
        self.shared_tokens = 0  # prompt tokens taken from another sequence's cells, not computed
        self.inbox: queue.Queue[Sequence] = queue.Queue()
        self._stop = threading.Event()
        self._driven = threading.Event()  # a run() is generating, in some thread
        self._stopped = threading.Event()  # the last run() has returned
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Generate on a thread of its own (tests, benchmarks). The server and the terminal chat drive the
        engine from the main thread instead: torch's parallel CPU kernels run up to 1.8x slower when
        called from any other thread."""
        self._thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self._thread.start()

    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """Generate in the calling thread until until() is true, or until stop(), which ends the
        unfinished sequences as cancelled."""
        self._stopped.clear()
        self._driven.set()
        try:
            while not self._stop.is_set() and not until():
                self._once(wait=0.5)
            if self._stop.is_set():
                self._cancel_all()
        finally:
            self._driven.clear()
            self._stopped.set()

    def stop(self) -> None:
        """Stop generating; unfinished sequences end as cancelled. Waits for the generating thread."""
        self._stop.set()
        self.inbox.put(None)  # type: ignore[arg-type]  # wakes the loop
        if self._thread is not None:
            self._thread.join(timeout=30)
        elif self._driven.is_set():
            self._stopped.wait(timeout=30)
        if not self._driven.is_set():  # nothing generates any more: the model's memory goes
            self.close()

    def submit(self, sequence: Sequence) -> Sequence:
        """Queue a sequence; it runs once it fits the batch.

        Raises:
            DanluError: it can never run (check_fits).
        """
        self.check_fits(len(sequence.prompt), sequence.params.max_tokens)
        self.inbox.put(sequence)
        return sequence

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[Event]:
        """A blocking iterator of events for one sequence (the terminal chat, tests, benchmarks). With no
        thread generating, the caller's thread runs the steps."""
        events: queue.Queue[Event] = queue.Queue()
        sequence = self.submit(Sequence(prompt, params, events.put))
        inline = not self._driven.is_set()
        try:
            while True:
                if inline and events.empty():
                    self._once(wait=0)
                    continue
                event = events.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            sequence.cancel()

    def answer_all(self, prompts: list[list[int]], params: SamplingParams) -> list[tuple[str, str]]:
        """Every prompt's whole answer and finish reason, in order, generated together in batches of
        max_batch on the calling thread (danlu evaluate and predict on a fine-tuned model)."""
        texts: list[list[str]] = [[] for _ in prompts]
        reasons: list[str | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="answer", unit="prompt", disable=len(prompts) < 16)

        def emit_for(i: int) -> Callable[[Event], None]:
            def emit(event: Event) -> None:
                texts[i].append(event.text)
                if event.finish_reason is not None:
                    reasons[i] = event.finish_reason
                    bar.update(1)

            return emit

        with bar:
            for i, prompt in enumerate(prompts):
                self.submit(Sequence(prompt, params, emit_for(i)))
            self.run(until=lambda: all(r is not None for r in reasons))
        return [("".join(t), str(r)) for t, r in zip(texts, reasons, strict=True)]

    @property
    def kv_usage(self) -> float:
        """The share of the KV cache that running sequences hold, 0 to 1."""
        raise NotImplementedError

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raises DanluError when a sequence could never run: its prompt fills the context."""
        context = self.chat.context
        if prompt_tokens + 1 > context:
            raise DanluError(
                f"the prompt has {prompt_tokens} tokens; the model's context is {context}",
                "shorten the conversation",
            )

    def _take(self, wait: float = 0) -> list[Sequence]:
        """Everything submitted so far, in order; with wait, up to that many seconds for the first."""
        taken: list[Sequence] = []
        try:
            item = self.inbox.get(timeout=wait) if wait > 0 else self.inbox.get_nowait()
            while True:
                if item is not None:  # None: stop() waking the loop
                    taken.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            return taken

    def close(self) -> None:
        raise NotImplementedError

    def _once(self, wait: float) -> None:
        raise NotImplementedError

    def _cancel_all(self) -> None:
        raise NotImplementedError


class Engine(Scheduler):
    def __init__(self, chat: ChatModel, **options: Any) -> None:
        """options: Scheduler's (max_batch, prefill_chunk, extra_stops, on_step, max_batch_tokens)."""
        super().__init__(chat, **options)
        self.executor: Executor = chat.executor(self.max_batch, self.max_batch_tokens, self.prefill_chunk)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.free_slots = list(range(self.max_batch))
        self._held = False  # after a preemption, nothing is admitted until a running sequence leaves

    # --- the caller's side ---------------------------------------------------------------------------

    def close(self) -> None:
        self.executor.close()

    def _cancel_all(self) -> None:
        for sequence in self.running + self.waiting:
            self._release(sequence, "cancelled")
        self.running, self.waiting = [], []

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raises DanluError when a sequence could never run: its prompt fills the context, or alone it
        needs more cache than max_batch_tokens."""
        super().check_fits(prompt_tokens, max_tokens)
        need = self.reserved(prompt_tokens, max_tokens)
        if not self.executor.fits([need]):
            raise DanluError(
                f"the prompt's {prompt_tokens} tokens and max_tokens {max_tokens} need {need} cache "
                f"tokens, over the engine's max_batch_tokens: this server's --max-batch-tokens is "
                f"{self.max_batch_tokens}",
                "lower max_tokens or shorten the prompt",
            )

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        return len(self.running), len(self.waiting) + self.inbox.qsize()

    @property
    def kv_usage(self) -> float:
        """Cache tokens the admitted sequences hold, over max_batch_tokens."""
        held = sum(s.computed for s in (*self.running, *self.waiting) if s.slot is not None)
        return min(1.0, held / self.max_batch_tokens)

    # --- the generating thread -----------------------------------------------------------------------

    def _once(self, wait: float) -> None:
        """Take what was submitted and run one step; when idle, wait up to `wait` seconds for work."""
        idle = not self.running and not self.waiting
        self.waiting.extend(self._take(wait if idle else 0))
        if self._stop.is_set() or (not self.running and not self.waiting):
            return
        self.step()

    def step(self) -> None:
        """One engine step: drop cancelled sequences, then one executor pass over every running
        sequence's next token and as much waiting prompt as the chunk budget allows."""
        for sequence in [s for s in self.running + self.waiting if s.cancelled]:
            self._release(sequence, "cancelled")
        chunks, owners = [], []
        for sequence in self.running:
            chunks.append(Chunk(sequence.slot, sequence.pending(), sequence.computed, True))
            owners.append(sequence)
        # prompt tokens this step, over every sequence it admits; more when none is decoding
        budget = self.prefill_chunk if self.running else self.executor.idle_prefill or self.prefill_chunk
        starting: list[list[int]] = []  # prompts this step prefills from their start
        for sequence in self.waiting:
            if sequence.slot is None and self._worth_waiting(sequence, starting):
                break  # next step it shares that prompt's cells instead of computing them again
            if budget <= 0 or not self._admit(sequence):
                break  # oldest first: a large request is not overtaken for ever by small ones
            if sequence.computed == 0:
                starting.append(sequence.prompt)
            pending = sequence.pending()
            take = pending[:budget]
            chunks.append(Chunk(sequence.slot, take, sequence.computed, len(take) == len(pending)))
            owners.append(sequence)
            budget -= len(take)
        if chunks:
            self._run(chunks, owners)
        if self.on_step is not None:
            self.on_step(*self.load)

    def _run(self, chunks: list[Chunk], owners: list[Sequence]) -> None:
        try:
            with torch.inference_mode():
                results = self.executor.forward(chunks)
        except NoRoom:
            self._preempt()
            return
        except Exception as exc:  # the pass the step's sequences share: they end, the queue stays
            self._fail(owners, exc)
            return
        ready: list[tuple[Sequence, torch.Tensor]] = []  # sequences with their next token's logits
        for chunk, sequence, result in zip(chunks, owners, results, strict=True):
            if isinstance(result, Exception):
                self._fail([sequence], result)
                continue
            sequence.computed += len(chunk.tokens)
            if not chunk.logits:
                continue
            if sequence in self.waiting:  # its prompt is done: it runs from now on
                self.waiting.remove(sequence)
                self.running.append(sequence)
            ready.append((sequence, result))
        if not ready:
            return
        try:
            tokens = self.output.sample(ready)
        except Exception as exc:  # the step's sampling as a whole (stacking the rows): its sequences end
            self._fail([s for s, _ in ready], exc)
            return
        for (sequence, _), token in zip(ready, tokens, strict=True):
            try:
                if isinstance(token, Exception):
                    raise token
                done = self.output.accept(sequence, token)
            except Exception as exc:  # this sequence's sampling or text: it alone ends, the batch goes on
                self._fail([sequence], exc)
                continue
            if done:
                self._release(sequence, None)

    def _admit(self, sequence: Sequence) -> bool:
        """Give a waiting sequence a slot when the batch can take it (one admitted in an earlier step
        keeps its slot): at most max_batch of them, all fitting the executor's cache."""
        if sequence.slot is not None:
            return True
        if self._held and self.running:  # the cache was full: room comes when a sequence leaves
            return False
        admitted = self.running + [s for s in self.waiting if s.slot is not None]
        widths = [self.reserved(len(s.prompt), s.params.max_tokens) for s in (*admitted, sequence)]
        if not self.free_slots or not self.executor.fits(widths):
            return False
        # the lowest free slot (any would do: each executor maps slots to its own storage)
        sequence.slot = min(self.free_slots)
        self.free_slots.remove(sequence.slot)
        if self.executor.shares:
            self._share(sequence, admitted)
        return True

    def _share(self, sequence: Sequence, admitted: list[Sequence]) -> None:
        """Start a newly admitted sequence from the longest prefix of its tokens that an admitted one
        already holds in the cache (a shared system prompt, a conversation's earlier turns): the executor
        gives it those cells, and only the rest is computed. Its last token is always its own, for the
        logits."""
        tokens = sequence.prompt + sequence.output
        best, length = None, 0
        for other in admitted:
            held = (other.prompt + other.output)[: other.computed]
            n = common_prefix(held, tokens, len(tokens) - 1)
            if n > length:
                best, length = other, n
        if best is not None:
            self.executor.share(best.slot, sequence.slot, length)
            sequence.computed = length
            self.shared_tokens += length

    def _worth_waiting(self, sequence: Sequence, starting: list[list[int]]) -> bool:
        """Whether a waiting sequence shares SHARE_MIN or more leading tokens with a prompt this step
        prefills from its start (requests that arrive together with one system prompt): it then joins a
        step later, sharing those cells."""
        if not self.executor.shares:
            return False
        tokens = sequence.prompt + sequence.output
        return any(common_prefix(p, tokens, len(tokens) - 1) >= SHARE_MIN for p in starting)

    def _preempt(self) -> None:
        """The cache had no room for the step: the youngest admitted sequence gives its slot back and
        waits at the front of the queue, to be recomputed from its prompt and output so far."""
        admitted = self.running + [s for s in self.waiting if s.slot is not None]
        victim = max(admitted, key=lambda s: s.submitted)
        if len(admitted) == 1:  # alone and still no room: it can never run
            self._fail([victim], RuntimeError("the executor's cache has no room for one sequence"))
            return
        log.info("KV cache full: preempting a sequence of %d tokens", len(victim.prompt) + len(victim.output))
        self.executor.free(victim.slot)
        self.free_slots.append(victim.slot)
        victim.slot, victim.computed = None, 0
        victim.preempted += 1
        self.preemptions += 1
        self._held = True
        if victim in self.running:
            self.running.remove(victim)
        else:
            self.waiting.remove(victim)
        self.waiting.insert(0, victim)

    def _fail(self, sequences: list[Sequence], exc: Exception) -> None:
        """End sequences with an error; the details go to the log, never to another request."""
        cause = f"{type(exc).__name__}: {one_line(exc)}"
        # one line; the traceback with --debug (a log at debug level)
        debug = log.isEnabledFor(logging.DEBUG)
        log.error(
            "generation failed for %d sequence(s): %s", len(sequences), cause, exc_info=exc if debug else None
        )
        for sequence in sequences:
            self._release(sequence, "error", error=one_line(exc))

    def _release(self, sequence: Sequence, reason: str | None, error: str | None = None) -> None:
        """Take a sequence out of the batch and free its slot; with a reason, also report its end."""
        if reason is not None:
            self.output.finish(sequence, reason, error=error)
        if sequence.slot is not None:
            self.executor.free(sequence.slot)
            self.free_slots.append(sequence.slot)
            sequence.slot = None
            self._held = False
        if sequence in self.running:
            self.running.remove(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)

    def reserved(self, prompt_tokens: int, max_tokens: int) -> int:
        """The most cache positions a sequence can fill: its prompt and max_tokens, within the context."""
        return min(prompt_tokens + max_tokens, self.chat.context)


def engine_for(chat: ChatModel, **options: Any) -> Scheduler:
    """The scheduler for a chat model: vLLM's own for the vllm engine, danlu's Engine for the others."""
    if chat.engine == "vllm":
        from danlu.serve.chat.vllm import VllmEngine

        return VllmEngine(chat, **options)
    return Engine(chat, **options)
