"""Continuous batching on a Hugging Face causal LM, in one generating thread.

Each step: (1) admit: prefill at most `prefill_chunk` prompt tokens in all, oldest waiting sequence
first, each into its own KV cache (a long prompt takes several steps, so running streams are not
stalled by it); a sequence whose prompt is done samples its first token and joins the batch; (2) decode:
one forward pass over every running sequence with the shared KV cache, each sequence sampled with its
own parameters and generator; finished or cancelled sequences leave at once.

The shared cache holds the running sequences left-padded to a common length, with an attention mask and
per-sequence position ids, as `generate` does for a batch of prompts: joining pads the shorter side,
leaving drops the row and any columns that only padding used. So its size is rows x the longest row:
a sequence is admitted only while (admitted sequences) x (the longest any of them may grow, prompt plus
max_tokens) stays within `max_batch_tokens`; one that does not fit waits for others to finish, and
never runs the process out of memory.

A failure inside one sequence (its prefill, its sampling) ends that sequence with an error and no other;
only a failed decode pass, which all running sequences share, ends those running."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from danlu.errors import DanluError
from danlu.serve.chat.model import ChatModel
from danlu.serve.chat.sampling import SamplingParams, choose, generator_for, penalize
from danlu.serve.chat.text import Detokenizer, StopStrings

log = logging.getLogger("danlu")


@dataclass
class Event:
    """What a sequence reports: text (a delta; may be empty at the end), and when done, why."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None


@dataclass
class Sequence:
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]  # called on the generating thread
    output: list[int] = field(default_factory=list)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    # engine-private state
    cache: Any = None
    prefilled: int = 0
    generator: torch.Generator | None = None
    detok: Detokenizer | None = None
    stops: StopStrings | None = None
    prompt_tensor: torch.Tensor | None = None

    def cancel(self) -> None:
        """Stop generating at the next step boundary and free the slot (safe from any thread)."""
        self.cancelled = True


class Engine:
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
        self.model = chat.model
        self.device = torch.device(chat.device)
        self.max_batch = max_batch
        # cache cells of the running batch (rows x the longest row); None: max_batch x the context
        self.max_batch_tokens = max_batch_tokens or max_batch * chat.context
        self.prefill_chunk = prefill_chunk
        self.extra_stops = extra_stops or []
        self.on_step = on_step  # (running, waiting) after each step: the server's gauges
        self.inbox: queue.Queue[Sequence] = queue.Queue()
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.cache: Any = None  # the running sequences' shared KV cache
        self.mask: torch.Tensor | None = None  # [running, cached tokens]: 1 where a token is real
        self._stop = threading.Event()
        self._driven = threading.Event()  # a run() is generating, in some thread
        self._stopped = threading.Event()  # the last run() has returned
        self._thread: threading.Thread | None = None

    # --- the caller's side ---------------------------------------------------------------------------

    def start(self) -> None:
        """Generate on a thread of its own (tests, benchmarks). The server and the terminal chat drive the
        engine from the main thread instead: torch's parallel CPU kernels run up to 1.8x slower when
        called from any other thread."""
        self._thread = threading.Thread(target=self.run, name="danlu-chat-engine", daemon=True)
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
                for sequence in self.running + self.waiting:
                    self._finish(sequence, "cancelled")
                self.running, self.waiting = [], []
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

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raises DanluError when a sequence could never run: its prompt fills the context, or alone it
        needs more cache than max_batch_tokens."""
        context = self.chat.context
        if prompt_tokens + 1 > context:
            raise DanluError(
                f"the prompt has {prompt_tokens} tokens; the model's context is {context}",
                "shorten the conversation",
            )
        need = self.reserved(prompt_tokens, max_tokens)
        if need > self.max_batch_tokens:
            raise DanluError(
                f"the prompt's {prompt_tokens} tokens and max_tokens {max_tokens} need {need} cache "
                f"tokens, over the engine's max_batch_tokens: this server's --max-batch-tokens is "
                f"{self.max_batch_tokens}",
                "lower max_tokens or shorten the prompt",
            )

    def submit(self, sequence: Sequence) -> Sequence:
        """Queue a sequence; it runs once it fits the batch.

        Raises:
            DanluError: it can never run (check_fits).
        """
        self.check_fits(len(sequence.prompt), sequence.params.max_tokens)
        self.inbox.put(sequence)
        return sequence

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        return len(self.running), len(self.waiting) + self.inbox.qsize()

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

    # --- the generating thread -----------------------------------------------------------------------

    def _once(self, wait: float) -> None:
        """Take what was submitted and run one step; when idle, wait up to `wait` seconds for work."""
        idle = not self.running and not self.waiting
        try:
            item = self.inbox.get(timeout=wait) if idle and wait else self.inbox.get_nowait()
        except queue.Empty:
            item = None
        while item is not None:
            self.waiting.append(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None
        if self._stop.is_set() or (not self.running and not self.waiting):
            return
        with torch.inference_mode():
            self.step()

    def step(self) -> None:
        """One engine step: drop cancelled sequences, prefill one chunk, decode every running sequence."""
        self.waiting = [s for s in self.waiting if not self._dropped(s)]
        self._leave([i for i, s in enumerate(self.running) if s.cancelled], "cancelled")
        budget = self.prefill_chunk  # prompt tokens this step, over every sequence it admits
        for sequence in list(self.waiting):
            if budget <= 0 or not self._has_room(sequence):
                break  # oldest first: a large request is not overtaken for ever by small ones
            try:
                budget -= self._prefill(sequence, budget)
            except Exception as exc:  # this sequence's prompt or first token: it alone ends
                self._fail([sequence], exc)
                if sequence in self.waiting:
                    self.waiting.remove(sequence)
        if self.running:
            try:
                self._decode()
            except Exception as exc:  # the pass every running sequence shares: they end, the queue stays
                self._fail(self.running, exc)
                self.running, self.cache, self.mask = [], None, None
        if self.on_step is not None:
            self.on_step(*self.load)

    def _fail(self, sequences: list[Sequence], exc: Exception) -> None:
        """End sequences with an error; the details go to the log, never to another request."""
        log.error("generation failed for %d sequence(s)", len(sequences), exc_info=exc)
        for sequence in sequences:
            self._finish(sequence, "error", error=str(exc).splitlines()[0] if str(exc) else repr(exc))

    def reserved(self, prompt_tokens: int, max_tokens: int) -> int:
        """The most cache positions a sequence can fill: its prompt and max_tokens, within the context."""
        return min(prompt_tokens + max_tokens, self.chat.context)

    def _has_room(self, sequence: Sequence) -> bool:
        """Whether the batch can take one more sequence (already prefilling counts as taken): at most
        max_batch of them, whose rows x longest reserved length fit max_batch_tokens."""
        if sequence.prefilled:
            return True  # admitted in an earlier step, its prompt not yet done
        admitted = self.running + [s for s in self.waiting if s.prefilled]
        widths = [self.reserved(len(s.prompt), s.params.max_tokens) for s in (*admitted, sequence)]
        return len(admitted) < self.max_batch and len(widths) * max(widths) <= self.max_batch_tokens

    def _dropped(self, sequence: Sequence) -> bool:
        if sequence.cancelled:
            self._finish(sequence, "cancelled")
        return sequence.cancelled

    def _prefill(self, sequence: Sequence, budget: int) -> int:
        """Prefill up to `budget` more prompt tokens; a finished prompt samples its first token and joins
        the batch. Returns the tokens prefilled."""
        if sequence.prompt_tensor is None:
            sequence.prompt_tensor = torch.tensor(sequence.prompt, dtype=torch.long)
            sequence.generator = generator_for(sequence.params)
            sequence.detok = Detokenizer(self.chat.tokenizer)
            sequence.stops = StopStrings([*sequence.params.stop, *self.extra_stops])
        start = sequence.prefilled
        chunk = sequence.prompt_tensor[start : start + budget].to(self.device)[None, :]
        out = self.model(input_ids=chunk, cache=sequence.cache, use_cache=True)
        sequence.cache = out.cache
        sequence.prefilled += chunk.shape[1]
        if sequence.prefilled < len(sequence.prompt):
            return chunk.shape[1]  # the rest of the prompt in later steps
        self.waiting.remove(sequence)
        if not self._advance(sequence, out.logits[0, -1]):  # else done after one token
            self._join(sequence)
        return chunk.shape[1]

    def _join(self, sequence: Sequence) -> None:
        """Add a prefilled sequence's cache to the shared one, left-padding the shorter side."""
        own = sequence.cache
        sequence.cache = None
        length = own.get_seq_length()
        own_mask = torch.ones((1, length), dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self.mask = own, own_mask
        else:
            shared = self.cache.get_seq_length()
            width = max(shared, length)
            # built whole before any is assigned: a failure here leaves the shared cache as it was
            joined = [
                (
                    torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)]),
                    torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)]),
                )
                for mine, theirs in zip(self.cache.layers, own.layers, strict=True)
            ]
            mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(own_mask, width, dim=1)])
            for layer, (keys, values) in zip(self.cache.layers, joined, strict=True):
                layer.keys, layer.values = keys, values
            self.mask = mask
        self.running.append(sequence)

    def _decode(self) -> None:
        tokens = torch.tensor([[s.output[-1]] for s in self.running], dtype=torch.long, device=self.device)
        mask = torch.cat(
            [self.mask, torch.ones((len(self.running), 1), dtype=torch.long, device=self.device)], 1
        )
        if bool(self.mask.all()):  # no padding (one sequence, or all alike): the model's own fast path
            out = self.model(input_ids=tokens, cache=self.cache, use_cache=True)
        else:
            positions = self.mask.sum(dim=1, keepdim=True)  # each row's own next position
            out = self.model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=positions,
                cache=self.cache,
                use_cache=True,
            )
        self.cache, self.mask = out.cache, mask
        logits = out.logits[:, -1]
        done = []
        for i, sequence in enumerate(self.running):
            try:
                if self._advance(sequence, logits[i]):
                    done.append(i)
            except Exception as exc:  # this sequence's sampling: it alone ends, the batch goes on
                self._fail([sequence], exc)
                done.append(i)
        self._leave(done, None)

    def _advance(self, sequence: Sequence, logits: torch.Tensor) -> bool:
        """Sample the sequence's next token and emit its text; True when the sequence is finished."""
        row = logits.float().cpu()
        params = sequence.params
        penalize(row, params, sequence.prompt_tensor, sequence.output)
        token = choose(row, params, sequence.generator)
        sequence.output.append(token)
        if sequence.first_token_at is None:
            sequence.first_token_at = time.perf_counter()
        if token in self.chat.eos_ids:
            self._finish(sequence, "stop", flush=True)
            return True
        text, stopped = sequence.stops.push(sequence.detok.add(token))
        if stopped:
            self._finish(sequence, "stop", text)
            return True
        total = len(sequence.prompt) + len(sequence.output)
        if len(sequence.output) >= params.max_tokens or total >= self.chat.context:
            self._finish(sequence, "length", text, flush=True)
            return True
        if text:
            sequence.emit(Event(text))
        return False

    def _finish(
        self, sequence: Sequence, reason: str, text: str = "", error: str | None = None, flush: bool = False
    ) -> None:
        """Report the end once. flush: the text held back (an incomplete character, a possible start of
        a stop string) goes out too, unless a stop string completes in it."""
        if sequence.finish_reason is not None:
            return
        if flush:
            rest, stopped = sequence.stops.push(sequence.detok.flush())
            text += rest if stopped else rest + sequence.stops.flush()
        sequence.finish_reason = reason
        sequence.finished_at = time.perf_counter()
        sequence.cache = None
        sequence.emit(Event(text, reason, error))

    def _leave(self, rows: list[int], reason: str | None) -> None:
        """Drop rows from the batch (finished, or cancelled: then finish them with `reason`)."""
        if not rows:
            return
        for i in rows:
            if reason is not None:
                self._finish(self.running[i], reason)
        leaving = set(rows)
        keep = [i for i in range(len(self.running)) if i not in leaving]
        self.running = [self.running[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.mask = self.mask[index]
        first = int((self.mask.sum(dim=0) > 0).nonzero()[0])  # columns only padding used go
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
