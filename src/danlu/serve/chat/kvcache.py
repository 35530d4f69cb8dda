"""The torch executor's KV cache: one row per sequence the executor holds, each sequence's keys and values
written in place at its own positions. Nothing is padded to the longest row and nothing is copied when a
sequence joins: a decode step reads a view of the rows [0, B) up to the longest position, with an
attention mask that keeps each row to its own positions.

Storage per layer is [rows, kv_heads, cap + 1, head_dim]; the last column is spare, where what a pass
writes and nobody reads goes (the batch rows that hold no running sequence, left padding). It grows, rows
to the next batch bucket and cap in steps of `grow` positions, when a step needs more, and is cut back to
what the step needs where growing would pass the executor's budget (so a cap grown for one long sequence
does not stay for every batch after it); it is released when nothing is held.

The model sees a transformers Cache: its attention layers call update(), which writes this pass's keys
and returns what the pass attends to. The executor passes the 4D masks and position ids itself, so the
model never asks the cache for lengths or masks (transformers returns a 4D mask as it is)."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

GROW = 256  # positions added to every row at once when a step needs more (on a CPU)
# the batch sizes a decode step is padded to: one CUDA graph each where graphs are used
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LAYER_TYPES = {"full_attention", "sliding_attention"}


def bucket(rows: int, most: int) -> int:
    """The smallest batch bucket that holds `rows` rows; `most` (the engine's max_batch) is one too."""
    for size in BUCKETS:
        if size >= rows:
            return min(size, most)
    return most


def bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of keys and values one cached position takes over every layer (0 where the config does not
    say its shapes)."""
    layers, heads = getattr(config, "num_hidden_layers", 0), getattr(config, "num_attention_heads", 0)
    if not layers or not heads:
        return 0
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers * 2 * kv_heads * head_dim * dtype.itemsize


def supported(config: Any) -> bool:
    """Whether a model's attention is what the slot cache and its masks serve: every layer full or
    sliding-window attention over the cache (not linear attention, state spaces or chunked attention)."""
    types = getattr(config, "layer_types", None)
    return types is None or set(types) <= LAYER_TYPES


def attention_masks(config: Any, positions: torch.Tensor, width: int, dtype: torch.dtype) -> Any:
    """The additive 4D masks [B, 1, q, width] for queries at `positions` [B, q] over cache positions
    [0, width): a query sees its own row's positions up to its own (and, in sliding-window layers, no
    further back than the window). A tensor, or a dict by layer type for models that mix them."""
    keys = torch.arange(width, device=positions.device)
    query = positions[:, None, :, None]
    causal = keys <= query
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:  # one kind for every layer: Mistral's window, unless the config turns it off
        slide = window if window and getattr(config, "use_sliding_window", True) else None
        return _additive(_windowed(causal, keys, query, slide), dtype)
    masks = {"full_attention": _additive(causal, dtype)}
    if "sliding_attention" in types:
        masks["sliding_attention"] = _additive(_windowed(causal, keys, query, window), dtype)
    return masks if len(set(types)) > 1 else masks[types[0]]


def _windowed(causal: torch.Tensor, keys: torch.Tensor, query: torch.Tensor, window: int | None):
    return causal if not window else causal & (keys > query - window)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # the dtype's lowest value, not -inf: a row that sees nothing (a hole) averages instead of giving NaN
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )


class SlotCache(Cache):
    """Per-slot rows of keys and values for every attention layer, allocated on the first pass and grown
    in steps. Before each forward the executor says what the pass writes and reads (set_pass): the prompt
    chunks of some sequences, or one token of every running sequence."""

    def __init__(self, grow: int = GROW) -> None:
        # Cache.__init__'s arguments differ between transformers versions; the model only calls update()
        self.grow = grow  # positions added to every row at once
        self.storage = 0  # counts allocations: what was captured over the storage is stale once it changes
        self.layers: list[Any] = []
        self.layer_class_to_replicate = None
        self.offloading = False
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = 0  # rows the storage holds: one per sequence the executor holds, to a batch bucket
        self.cap = 0  # positions per row
        self._pass: tuple[Any, ...] = ()

    # --- the executor's side ---------------------------------------------------------------------------

    def reserve(self, rows: int, positions: int, most: int | None = None) -> None:
        """Make room for rows [0, rows) and positions [0, positions), keeping what those hold. The storage
        grows to the larger of what it has and what is asked (positions rounded up to a step of `grow`);
        where that would pass `most` positions in all (rows x cap), it is cut to what is asked instead,
        rounded up only as far as `most` allows."""
        if rows <= self.rows and positions <= self.cap:
            return
        steps = -(-positions // self.grow) * self.grow
        new_rows, new_cap = max(rows, self.rows), max(self.cap, steps)
        if most is not None and new_rows * new_cap > most:
            new_rows, new_cap = rows, max(positions, min(steps, most // rows))
        keep_rows, keep_cap = min(new_rows, self.rows), min(new_cap, self.cap)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_zeros((new_rows, old.shape[1], new_cap + 1, old.shape[3]))
                grown[:keep_rows, :, :keep_cap] = old[:keep_rows, :, :keep_cap]
                store[i] = grown
        self.rows, self.cap = new_rows, new_cap
        self.storage += 1

    def release(self) -> None:
        """Drop the storage (nothing is held): the next pass allocates it again."""
        self.keys, self.values, self.rows, self.cap = [], [], 0, 0
        self.storage += 1

    def copy(self, source: int, target: int, positions: int) -> None:
        """Row `target` holds row `source`'s first `positions` positions."""
        for store in (self.keys, self.values):
            for layer in store:
                layer[target, :, :positions] = layer[source, :, :positions]

    def set_pass(self, rows: torch.Tensor, positions: torch.Tensor, read: slice | torch.Tensor, width: int):
        """What the next forward pass writes and reads: its token (i, j) writes at storage row rows[i, j],
        position positions[i, j] (the spare column, `spare`, for padding and holes); its batch row i
        attends to storage row read[i] up to `width` (read a slice: a view, nothing copied)."""
        self._pass = (rows, positions, read, width)

    @property
    def spare(self) -> int:
        """The column nobody reads: where a pass writes what it does not keep."""
        return self.cap

    @property
    def positions(self) -> int:
        """Token positions the storage holds, rows x cap (the spare column aside)."""
        return self.rows * self.cap

    # --- the model's side ------------------------------------------------------------------------------

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """Write this pass's keys and values [B, kv_heads, q, head_dim] of one layer; return the keys and
        values it attends to: [B, kv_heads, width, head_dim] views of the storage."""
        if layer_idx == len(self.keys):  # the first pass: this layer's storage, in its shapes
            shape = (self.rows, keys.shape[1], self.cap + 1, keys.shape[3])
            self.keys.append(keys.new_zeros(shape))
            self.values.append(values.new_zeros((*shape[:3], values.shape[3])))
        stored_keys, stored_values = self.keys[layer_idx], self.values[layer_idx]
        rows, positions, read, width = self._pass
        # keys [B, kv_heads, q, head_dim]: token (i, j)'s at (rows[i, j], positions[i, j])
        stored_keys[rows, :, positions] = keys.transpose(1, 2)
        stored_values[rows, :, positions] = values.transpose(1, 2)
        return stored_keys[read, :, :width], stored_values[read, :, :width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Not known to the cache: the executor always passes position ids, so the model never asks."""
        return 0

    def __len__(self) -> int:
        return len(self.keys)
