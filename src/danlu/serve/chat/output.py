"""The output processor: what happens to a sequence's next-token logits, whichever executor computed them.
Penalties and sampling with the request's own parameters and random source, the incremental detokenizer,
stop strings held back until they cannot start a stop, end-of-sequence tokens, max_tokens and the
context, and the one event that says a sequence ended and why."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from danlu.serve.chat.sampling import History, SamplingParams, penalize, penalized, random_source, sample
from danlu.serve.chat.text import Detokenizer, StopStrings


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
    # the scheduler's: the executor's slot while admitted, and how many of prompt + output are in its cache
    slot: int | None = None
    computed: int = 0
    preempted: int = 0  # times its cache was dropped for room and recomputed
    # the output processor's
    source: random.Random | None = None  # the request's uniform numbers, one per sampled token
    history: History | None = None  # the tokens it holds, as its penalties read them (penalized only)
    detok: Detokenizer | None = None
    stops: StopStrings | None = None

    def cancel(self) -> None:
        """Stop generating at the next step boundary and free the slot (safe from any thread)."""
        self.cancelled = True

    def pending(self) -> list[int]:
        """The tokens the executor has yet to see: the prompt's rest, or the last token sampled."""
        done = self.computed
        if done < len(self.prompt):
            return self.prompt[done:] + self.output
        return self.output[done - len(self.prompt) :]


class OutputProcessor:
    def __init__(self, tokenizer: Any, eos_ids: set[int], context: int, extra_stops: list[str]) -> None:
        self.tokenizer, self.eos_ids, self.context = tokenizer, eos_ids, context
        self.extra_stops = extra_stops

    def _begin(self, sequence: Sequence) -> None:
        sequence.source = random_source(sequence.params)
        sequence.detok = Detokenizer(self.tokenizer)
        sequence.stops = StopStrings([*sequence.params.stop, *self.extra_stops])

    def sample(self, ready: list[tuple[Sequence, torch.Tensor]]) -> list[int | Exception]:
        """The next token of each sequence from its logits [vocab], every row at once on the logits'
        device: the penalized rows' penalties (sampling.penalize), then the tokens (sampling.sample),
        then one copy of the step's tokens to the host. A row that cannot be penalized, or whose
        probabilities are not numbers, gives its exception, for that sequence alone."""
        rows = torch.stack([logits for _, logits in ready]).float()
        params = [s.params for s, _ in ready]
        for sequence, _ in ready:
            if sequence.detok is None:
                self._begin(sequence)
            if sequence.history is None and penalized(sequence.params):
                # kept from here on by accept; an engine that samples itself (vLLM) never needs one
                sequence.history = History(sequence.prompt, sequence.output)
        failed: dict[int, Exception] = {}
        if any(penalized(p) for p in params):
            failed = penalize(rows, params, [s.history for s, _ in ready])
        uniforms = [0.0 if p.greedy else s.source.random() for (s, _), p in zip(ready, params, strict=True)]
        tokens = sample(rows, params, uniforms)
        for i, token in enumerate(tokens):
            if token < 0 and i not in failed:
                failed[i] = ValueError("the model's next-token logits are not finite numbers")
        return [failed.get(i, token) for i, token in enumerate(tokens)]

    def accept(self, sequence: Sequence, token: int) -> bool:
        """The sequence's next token, sampled here or by an engine that samples itself (vLLM): emit its
        text; True when the sequence is finished (and its end emitted)."""
        if sequence.detok is None:
            self._begin(sequence)
        params = sequence.params
        sequence.output.append(token)
        if sequence.history is not None:
            sequence.history.add(token)
        if sequence.first_token_at is None:
            sequence.first_token_at = time.perf_counter()
        if token in self.eos_ids:
            self.finish(sequence, "stop", flush=True)
            return True
        text, stopped = sequence.stops.push(sequence.detok.add(token))
        if stopped:
            self.finish(sequence, "stop", text)
            return True
        total = len(sequence.prompt) + len(sequence.output)
        if len(sequence.output) >= params.max_tokens or total >= self.context:
            self.finish(sequence, "length", text, flush=True)
            return True
        if text:
            sequence.emit(Event(text))
        return False

    def finish(
        self, sequence: Sequence, reason: str, text: str = "", error: str | None = None, flush: bool = False
    ) -> None:
        """Report the end once. flush: the text held back (an incomplete character, a possible start of
        a stop string) goes out too, unless a stop string completes in it."""
        if sequence.finish_reason is not None:
            return
        if flush and sequence.stops is not None:
            rest, stopped = sequence.stops.push(sequence.detok.flush())
            text += rest if stopped else rest + sequence.stops.flush()
        sequence.finish_reason = reason
        sequence.finished_at = time.perf_counter()
        sequence.emit(Event(text, reason, error))
