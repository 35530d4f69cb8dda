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

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from danlu.env.probes import memory_room
from danlu.errors import DanluError, one_line
from danlu.hf import forward_with_cache, takes
from danlu.serve.chat.kvcache import (
    GROW,
    LAYER_TYPES,
    SlotCache,
    attention_masks,
    bucket,
    bytes_per_token,
    supported,
)

log = logging.getLogger("danlu")


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
    """A Hugging Face causal LM over a slot cache (danlu.serve.chat.kvcache): each held slot's keys and
    values sit in a storage row of their own, written in place at the sequence's positions, so joining
    copies nothing and a decode step costs what the rows hold, not rows x the longest. The held slots take
    rows [0, n): when one leaves, the last row moves into its place (one row's positions copied), so the
    storage never holds more rows than the batch bucket of the sequences in it. The running sequences'
    tokens are one pass over batch rows [0, B), B the highest running row + 1 (on a GPU, rounded up to
    its bucket), where rows that hold no running sequence write to the spare column and are ignored. The
    step's prompt chunks follow, in passes of their own, left-padded together. A new sequence whose
    prompt starts with what another holds starts from a copy of those positions (share).

    On a GPU each bucket's decode step is a CUDA graph, captured the first time the bucket runs (after
    two warm-up passes) and replayed with the step's tokens, positions and rows copied into its inputs:
    one launch instead of one per kernel. A graph attends over every position the cache holds (its
    shapes are fixed), and is captured again when the cache grows. A capture that fails turns graphs off
    with one log line; decoding goes on eagerly.

    fits() counts the storage the sequences would need: their batch bucket x the longest. The storage
    never holds more than max_batch_tokens positions: where growing would pass it, it is cut to what the
    step needs (the rows held, their longest position), which admission keeps within it."""

    name = "torch"
    # a step's prompt tokens stay within prefill_chunk while none is decoding too: more in one step
    # delays every first token of them
    idle_prefill = None
    shares = True

    def share(self, source: int, target: int, tokens: int) -> None:
        """Give the empty slot `target` a copy of slot `source`'s positions [0, tokens)."""
        row = self._hold(target, tokens)
        with torch.inference_mode():  # the storage is made of inference tensors
            self._reserve()
            self.cache.copy(self.row_of[source], row, tokens)

    def __init__(
        self, model: Any, device: str, max_batch: int, max_batch_tokens: int, graphs: bool | None = None
    ) -> None:
        """graphs: decode steps as CUDA graphs (None: on a CUDA device)."""
        if not supported(model.config):
            kinds = sorted(set(model.config.layer_types) - LAYER_TYPES)
            raise DanluError(
                "the torch engine serves full and sliding-window attention; this model has "
                f"{', '.join(kinds)} layers",
                "serve it with --engine vllm where vLLM supports it",
            )
        self.model, self.device = model, torch.device(device)
        self.config = model.config
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        # the masks' dtype: the activations' (quantized weights compute in float)
        self.dtype = model.dtype if model.dtype.is_floating_point else torch.float32
        self.graphs_on = self.device.type == "cuda" if graphs is None else graphs
        self.pad = self.graphs_on  # decode batches padded to their bucket: a graph per bucket, not per size
        # on a GPU the cache grows in bigger steps: each growth captures the graphs again
        self.cache = SlotCache(grow=4 * GROW if self.graphs_on else GROW)
        self.graphs: dict[int, _Graph] = {}  # bucket -> its captured decode step, for the cache's storage
        self.graphs_storage = -1  # the cache storage the graphs were captured on
        self.graph_pool: Any = None
        # slot -> its storage row, for the slots with positions in the cache (running or mid-prompt): rows
        # [0, n), in no order
        self.row_of: dict[int, int] = {}
        self.length: dict[int, int] = {}  # slot -> the positions it holds once this step is done
        self.running: set[int] = set()  # slots whose prompt is done: one token per step from now on
        # a prompt chunk needs one row of logits, not one per token: the vocabulary projection is a large
        # share of a prefill
        self.last_logits = takes(type(model), "logits_to_keep")
        self.packed = None
        if self.device.type == "cpu":  # every layer where the copies fit in half of what the KV budget leaves
            kv_budget = max_batch_tokens * bytes_per_token(self.config, self.dtype)
            self.packed = Packed.of(model, room=max(memory_room() - kv_budget, 0) // 2)
        if self.packed is not None:
            what = "every linear layer" if self.packed.every else "the vocabulary projection"
            log.debug("%s packed for oneDNN (%d MiB)", what, self.packed.nbytes >> 20)

    @property
    def packed_bytes(self) -> int:
        """The memory the packed copies of the model's layers take, for /v1/models (0: none packed)."""
        return 0 if self.packed is None else self.packed.nbytes

    @property
    def decode_mode(self) -> str:
        """How decode steps run, for /v1/models: "cuda graphs" or "eager"."""
        return "cuda graphs" if self.graphs_on else "eager"

    def fits(self, widths: list[int]) -> bool:
        return bucket(len(widths), self.max_batch) * max(widths) <= self.max_batch_tokens

    def _hold(self, slot: int, length: int) -> int:
        """The slot's storage row (the next free one for a slot new to the cache); it will hold `length`
        positions."""
        row = self.row_of.setdefault(slot, len(self.row_of))
        self.length[slot] = length
        return row

    def _reserve(self) -> None:
        """Storage for every held row and position: the rows' batch bucket x the longest held."""
        rows = bucket(len(self.row_of), self.max_batch)
        self.cache.reserve(rows, max(self.length.values()), most=self.max_batch_tokens)

    def forward(self, chunks: list[Chunk]) -> list[torch.Tensor | Exception | None]:
        results: list[torch.Tensor | Exception | None] = [None] * len(chunks)
        decoding = {c.slot: i for i, c in enumerate(chunks) if c.slot in self.running}
        one_each = all(len(chunks[i].tokens) == 1 for i in decoding.values())
        if sorted(decoding) != sorted(self.running) or not one_each:
            raise RuntimeError("a decode step must give every running row exactly one token")
        prompts = [i for i, c in enumerate(chunks) if c.slot not in decoding]
        groups = _groups([chunks[i] for i in prompts])
        for c in chunks:
            self._hold(c.slot, c.start + len(c.tokens))
        with torch.inference_mode():
            # storage rows to the batch bucket: growing one row at a time as prompts arrive would
            # reallocate (and fault in fresh pages for) every layer's cache once per admitted sequence
            self._reserve()
            if decoding:
                try:
                    logits = self._decode({slot: chunks[i] for slot, i in decoding.items()})
                except Exception as exc:  # the pass the running rows share: they fail, prompts go on
                    logits = {slot: exc for slot in decoding}
                for slot, i in decoding.items():
                    results[i] = logits[slot]
            done: dict[int, torch.Tensor | Exception | None] = {}
            for group in groups:
                done.update(self._prefill(group))
            for i in prompts:
                results[i] = done[chunks[i].slot]
        return results

    def _prefill(self, group: list[Chunk]) -> dict[int, torch.Tensor | Exception | None]:
        """Prompt chunks in one pass, left-padded to the longest; when it fails, each alone, so that only
        the chunk at fault fails."""
        try:
            return self._prefill_pass(group)
        except Exception as exc:
            if len(group) == 1:
                return {group[0].slot: exc}
        done: dict[int, torch.Tensor | Exception | None] = {}
        for chunk in group:
            done.update(self._prefill([chunk]))
        return done

    def _prefill_pass(self, group: list[Chunk]) -> dict[int, torch.Tensor | None]:
        width = max(len(c.tokens) for c in group)
        spare, tokens, where, rows, write = self.cache.spare, [], [], [], []
        for c in group:  # padding: position 0, written to the spare column
            pad, held = width - len(c.tokens), list(range(c.start, c.start + len(c.tokens)))
            tokens.append([0] * pad + c.tokens)
            where.append([0] * pad + held)
            rows.append([self.row_of[c.slot]] * width)
            write.append([spare] * pad + held)
        inputs = torch.tensor([tokens, where, rows, write], dtype=torch.long).to(
            self.device, non_blocking=True
        )
        read_rows = [self.row_of[c.slot] for c in group]
        consecutive = read_rows == list(range(read_rows[0], read_rows[0] + len(read_rows)))
        read = slice(read_rows[0], read_rows[0] + len(read_rows))
        if not consecutive:  # rows gathered: a copy of what they hold
            read = torch.tensor(read_rows, device=self.device)
        seen = max(c.start + len(c.tokens) for c in group)
        self.cache.set_pass(inputs[2], inputs[3], read, seen)
        mask = attention_masks(self.config, inputs[1], seen, self.dtype)
        extra = {"logits_to_keep": 1} if self.last_logits else {}
        with self._packed():
            logits, _ = forward_with_cache(
                self.model,
                self.cache,
                input_ids=inputs[0],
                attention_mask=mask,
                position_ids=inputs[1],
                **extra,
            )
        done: dict[int, torch.Tensor | None] = {}
        for i, c in enumerate(group):
            done[c.slot] = logits[i, -1] if c.logits else None  # None: the rest of the prompt in later steps
            if c.logits:
                self.running.add(c.slot)
        return done

    def _decode(self, chunks: dict[int, Chunk]) -> dict[int, torch.Tensor]:
        by_row = {self.row_of[slot]: chunk for slot, chunk in chunks.items()}
        top = max(by_row) + 1
        batch = bucket(top, self.max_batch) if self.pad else top
        tokens = [by_row[r].tokens[0] if r in by_row else 0 for r in range(batch)]
        where = [by_row[r].start if r in by_row else 0 for r in range(batch)]
        write = [by_row[r].start if r in by_row else self.cache.spare for r in range(batch)]
        # one copy to the device: tokens, positions, write rows and write positions (a hole writes to
        # its row's spare column)
        inputs = torch.tensor([tokens, where, list(range(batch)), write], dtype=torch.long)
        inputs = inputs.to(self.device, non_blocking=True)
        graph = self._graph(batch) if self.graphs_on else None
        if graph is not None:
            logits = graph.run(inputs)
        else:
            logits = self._decode_pass(inputs[:, :, None], max(where) + 1)
        return {slot: logits[self.row_of[slot], -1] for slot in chunks}

    def _decode_pass(self, inputs: torch.Tensor, width: int) -> torch.Tensor:
        """inputs [4, B, 1]: each batch row's token, position, write row and write position."""
        self.cache.set_pass(inputs[2], inputs[3], slice(0, inputs.shape[1]), width)
        mask = attention_masks(self.config, inputs[1], width, self.dtype)
        with self._packed():
            logits, _ = forward_with_cache(
                self.model, self.cache, input_ids=inputs[0], attention_mask=mask, position_ids=inputs[1]
            )
        return logits

    def _packed(self) -> contextlib.AbstractContextManager:
        return self.packed.swapped() if self.packed is not None else contextlib.nullcontext()

    def _graph(self, batch: int) -> _Graph | None:
        """The bucket's captured decode step (captured now when it has none for this storage); None when
        capturing fails, which turns graphs off."""
        if self.graphs_storage != self.cache.storage:
            self.graphs, self.graphs_storage = {}, self.cache.storage
        if batch not in self.graphs:
            try:
                if self.graph_pool is None:
                    self.graph_pool = torch.cuda.graph_pool_handle()
                self.graphs[batch] = _Graph(self, batch)
            except Exception as exc:
                log.warning("CUDA graphs off: capturing a decode step failed: %s", one_line(exc))
                self.graphs_on, self.graphs = False, {}
                return None
        return self.graphs[batch]

    def free(self, slot: int) -> None:
        self.running.discard(slot)
        self.length.pop(slot, None)
        row = self.row_of.pop(slot, None)
        last = len(self.row_of)
        # the last row moves into the freed one, so the held rows stay [0, n) (where the storage has them)
        if row is not None and row != last and last < self.cache.rows:
            moved = next(s for s, r in self.row_of.items() if r == last)
            with torch.inference_mode():
                self.cache.copy(last, row, self.length[moved])
            self.row_of[moved] = row
        # nothing in the cache: its memory goes back until the next request (not where graphs were
        # captured over it: they would be captured again for every request after a pause)
        if not self.row_of and not self.graphs:
            self.cache.release()

    def close(self) -> None:
        self.row_of, self.length, self.running, self.graphs = {}, {}, set(), {}
        self.cache.release()


class PackedLinear:
    """One float32 Linear through oneDNN with its weight packed once in the kernel's blocked layout. Called
    in the Linear's place (its forward swapped for the block of a pass: Packed.swapped)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        self.linear = linear
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(hidden, self.weight, self.bias, "none", [], "")


class Packed:
    """A CPU model's float32 Linear layers through oneDNN, each weight packed once in the kernel's blocked
    layout. A decode step reads every weight for a few rows, where the plain matmul is far from this CPU's
    bandwidth: SmolLM2-135M's 16-row step takes about 83-93 ms instead of 91-97 with only the vocabulary
    projection packed and 104-117 with nothing packed, the [49152, 576] projection alone 8-10 ms instead
    of 19-21 (benchmarks/chat_steps.py --at, three runs). The packed copies cost the weights' size in
    memory (the originals stay: the vocabulary projection is often the embedding too, and `generate` on
    the same model object must be unchanged). The vocabulary projection, the largest matrix of a small
    model, is always packed; every other layer too where their copies fit in the room the executor gives
    (half of what this process can still take once the KV cache's budget is counted: memory_room, in a
    container under its limit). The packed layers are swapped in only for the executor's own passes.
    Results differ from the plain matmul's in the last bits, as a different batch size already makes them
    differ."""

    def __init__(self, layers: list[PackedLinear], every: bool) -> None:
        self.layers = layers
        self.every = every  # every layer packed, not the vocabulary projection alone
        self.nbytes = sum(p.linear.weight.nbytes for p in layers)

    @classmethod
    def of(cls, model: Any, room: int | None = None) -> Packed | None:
        """The model's packed layers: every one where their copies fit in `room` bytes (default: half of
        memory_room()), else the vocabulary projection alone; None where this torch or CPU has no such
        kernel or no such layer is a plain float32 Linear (quantized, bfloat16, wrapped by hooks) whose
        packed kernel agrees with it."""
        if not torch.backends.mkldnn.is_available():
            return None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        linears = [m for m in model.modules() if _packable(m) and m is not head]
        if _packable(head):
            linears.insert(0, head)
        if room is None:
            room = memory_room() // 2
        every = sum(m.weight.nbytes for m in linears) <= room
        if not every:  # the vocabulary projection alone: the largest matrix of a small model
            linears = linears[:1] if linears and linears[0] is head else []
        agree: dict[tuple[int, int, bool], bool] = {}  # one probe per shape: the same kernel for each
        layers = []
        for linear in linears:
            shape = (linear.in_features, linear.out_features, linear.bias is not None)
            if agree.get(shape) is False:  # this kernel disagreed with, or refused, this shape already
                continue
            try:
                packed = PackedLinear(linear)
                if shape not in agree:
                    agree[shape] = _agrees(packed)
            except (RuntimeError, AttributeError) as exc:  # no oneDNN kernel for this CPU, torch or shape
                log.debug("linear layer %s unpacked: %s", shape, one_line(exc))
                agree[shape] = False
            if agree[shape]:
                layers.append(packed)
        return cls(layers, every) if layers else None

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The packed layers compute in place of the model's inside the block."""
        try:
            for packed in self.layers:
                packed.linear.forward = packed
            yield
        finally:
            for packed in self.layers:
                vars(packed.linear).pop("forward", None)


def _packable(module: Any) -> bool:
    """A plain float32 Linear with real weights that nothing wraps (accelerate's offloading hooks set
    forward on the module)."""
    return (
        type(module) is torch.nn.Linear
        and module.weight.dtype == torch.float32
        and not module.weight.is_meta
        and "forward" not in vars(module)
    )


def _agrees(packed: PackedLinear) -> bool:
    probe = torch.randn(3, 1, packed.linear.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return torch.allclose(packed(probe), packed.linear(probe), rtol=1e-4, atol=1e-4)


class _Graph:
    """One bucket's decode step as a CUDA graph: static input buffers (token, position, write row per
    batch row), the step captured over them, and its logits buffer, valid until the next replay."""

    def __init__(self, executor: TorchExecutor, batch: int) -> None:
        device, cache = executor.device, executor.cache
        self.inputs = torch.zeros((4, batch), dtype=torch.long, device=device)
        # every row a hole while warming up and capturing: written to its spare column
        self.inputs[2] = torch.arange(batch, device=device)
        self.inputs[3] = cache.spare

        def step() -> torch.Tensor:
            return executor._decode_pass(self.inputs[:, :, None], cache.cap)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: lazy initialisations happen outside the capture
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=executor.graph_pool):
            self.logits = step()

    def run(self, inputs: torch.Tensor) -> torch.Tensor:
        self.inputs.copy_(inputs)
        self.graph.replay()
        return self.logits


def _groups(chunks: list[Chunk], waste: float = 1.25) -> list[list[Chunk]]:
    """Prompt chunks in groups that share a pass: longest first, each group as long as padding every
    chunk to its longest adds at most `waste` - 1 to the tokens it computes."""
    groups: list[list[Chunk]] = []
    for chunk in sorted(chunks, key=lambda c: len(c.tokens), reverse=True):
        group = groups[-1] if groups else None
        if group and (len(group) + 1) * len(group[0].tokens) <= waste * (
            sum(len(c.tokens) for c in group) + len(chunk.tokens)
        ):
            group.append(chunk)
        else:
            groups.append([chunk])
    return groups
