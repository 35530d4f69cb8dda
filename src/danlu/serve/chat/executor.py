"""Executors: what runs the model for the scheduler. One small interface, two implementations (torch here,
llama.cpp in danlu.serve.chat.llamacpp):

    forward(chunks) -> one result per chunk: the next-token logits [vocab] where the chunk asked for
                       them, None where it did not, or the exception that failed that chunk alone
    free(slot)      -> the slot's cache is dropped (a finished, cancelled or preempted sequence)
    share(a, b, n)  -> slot b starts with slot a's first n positions (where `shares`: llama.cpp)
    fits(widths)    -> whether sequences that may each grow to these many cache cells fit together

A chunk is some of one sequence's tokens, at the positions that follow what its slot holds. A step's
chunks mix prompt chunks (chunked prefill) and every running sequence's one decode token. An executor
raises NoRoom when its cache cannot take the step (the scheduler then preempts a sequence and retries);
any other exception fails every sequence of the step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from danlu.hf import forward_with_cache


@dataclass(frozen=True)
class Chunk:
    slot: int
    tokens: list[int]
    start: int  # the position of tokens[0]: the tokens the slot's cache already holds
    logits: bool  # the sequence needs its next token after this chunk


class NoRoom(Exception):
    """The cache has no cells for this step's tokens."""


class Executor(Protocol):
    name: str  # "torch" | "llama.cpp", as /v1/models and /metrics say
    # prompt tokens one step may take while no sequence is decoding (nothing to stall); None: prefill_chunk
    idle_prefill: int | None
    shares: bool  # share() works: one slot may start from another's cells

    def share(self, source: int, target: int, tokens: int) -> None:
        """Give the empty slot `target` the cells of positions [0, tokens) of slot `source`."""

    def forward(self, chunks: list[Chunk]) -> list[torch.Tensor | Exception | None]: ...

    def free(self, slot: int) -> None: ...

    def fits(self, widths: list[int]) -> bool: ...

    def close(self) -> None: ...


class TorchExecutor:
    """A Hugging Face causal LM. A prompt is prefilled into a cache of its own; once done it joins the
    shared cache, where the running sequences sit left-padded to a common length with an attention mask
    and per-sequence position ids, as `generate` does for a batch of prompts: joining pads the shorter
    side, leaving drops the row and any columns that only padding used. So the cache holds rows x the
    longest row, and that is what fits() counts against max_batch_tokens."""

    name = "torch"
    idle_prefill = None  # prompts prefill one by one: a bigger step only delays the first of them
    shares = False  # left-padded rows have no cells to share

    def share(self, source: int, target: int, tokens: int) -> None:
        raise NotImplementedError("the torch executor does not share cache cells")

    def __init__(self, model: Any, device: str, max_batch_tokens: int) -> None:
        self.model, self.device = model, torch.device(device)
        self.max_batch_tokens = max_batch_tokens
        self.own: dict[int, Any] = {}  # slot -> the cache of a prompt being prefilled
        self.rows: list[int] = []  # slots in the shared cache, in row order
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [rows, cached tokens]: 1 where a token is real

    def fits(self, widths: list[int]) -> bool:
        return len(widths) * max(widths) <= self.max_batch_tokens

    def forward(self, chunks: list[Chunk]) -> list[torch.Tensor | Exception | None]:
        results: list[torch.Tensor | Exception | None] = [None] * len(chunks)
        with torch.inference_mode():
            decoding = {c.slot: i for i, c in enumerate(chunks) if c.slot in self.rows}
            if decoding:  # first, while the shared cache holds only the running rows
                one_each = all(len(chunks[i].tokens) == 1 for i in decoding.values())
                if sorted(decoding) != sorted(self.rows) or not one_each:
                    raise RuntimeError("a decode step must give every running row exactly one token")
                rows = list(self.rows)
                try:
                    logits = self._decode([chunks[decoding[slot]].tokens[0] for slot in rows])
                except Exception as exc:  # the pass the running rows share: they fail, prompts go on
                    logits = [exc] * len(rows)
                for row, slot in enumerate(rows):
                    results[decoding[slot]] = logits[row]
            for i, chunk in enumerate(chunks):
                if chunk.slot in decoding:
                    continue
                try:
                    results[i] = self._prefill(chunk)
                except Exception as exc:  # this sequence's prompt: it alone fails
                    self.own.pop(chunk.slot, None)
                    results[i] = exc
        return results

    def _prefill(self, chunk: Chunk) -> torch.Tensor | None:
        ids = torch.tensor([chunk.tokens], dtype=torch.long, device=self.device)
        logits, self.own[chunk.slot] = forward_with_cache(self.model, self.own.get(chunk.slot), input_ids=ids)
        if not chunk.logits:
            return None  # the rest of the prompt in later steps
        self._join(chunk.slot, self.own.pop(chunk.slot))
        return logits[0, -1]

    def _join(self, slot: int, own: Any) -> None:
        """Add a prefilled sequence's cache to the shared one, left-padding the shorter side."""
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
        self.rows.append(slot)

    def _decode(self, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)
        mask = torch.cat([self.mask, torch.ones((len(tokens), 1), dtype=torch.long, device=self.device)], 1)
        try:
            if bool(self.mask.all()):  # no padding (one sequence, or all alike): the model's own fast path
                logits, cache = forward_with_cache(self.model, self.cache, input_ids=ids)
            else:
                positions = self.mask.sum(dim=1, keepdim=True)  # each row's own next position
                logits, cache = forward_with_cache(
                    self.model, self.cache, input_ids=ids, attention_mask=mask, position_ids=positions
                )
        except Exception:  # the pass every running row shares: the shared cache is gone with them
            self.rows, self.cache, self.mask = [], None, None
            raise
        self.cache, self.mask = cache, mask
        return logits[:, -1]

    def free(self, slot: int) -> None:
        self.own.pop(slot, None)
        if slot not in self.rows:
            return
        keep = [i for i, s in enumerate(self.rows) if s != slot]
        self.rows = [self.rows[i] for i in keep]
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

    def close(self) -> None:
        self.own, self.rows, self.cache, self.mask = {}, [], None, None


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
