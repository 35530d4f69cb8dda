"""The torch executor's KV cache: one row per scheduler slot, each sequence's keys and values written in
place at its own positions. Nothing is padded to the longest row and nothing is copied when a sequence
joins or leaves: a decode step reads a view of the rows [0, B) up to the longest position, with an
attention mask that keeps each row to its own positions.

Storage per layer is [rows + 1, kv_heads, cap, head_dim]; the last row is scratch, where the batch rows
that hold no running sequence (holes) write their step's keys. It grows, rows to the next batch bucket
and cap in steps of GROW positions, when a step needs more, and is released when no slot holds anything,
so a server that has answered one long request does not keep its cache.

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
        self.rows = 0  # batch rows (slots) the storage holds, besides the scratch row
        self.cap = 0  # positions per row
        self._pass: tuple[Any, ...] = ()

    # --- the executor's side ---------------------------------------------------------------------------

    def reserve(self, rows: int, positions: int) -> None:
        """Make room for slots [0, rows) and positions [0, positions), keeping what the rows hold."""
        if rows <= self.rows and positions <= self.cap:
            return
        new_rows, new_cap = max(rows, self.rows), max(self.cap, -(-positions // self.grow) * self.grow)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_zeros((new_rows + 1, old.shape[1], new_cap, old.shape[3]))
                grown[: self.rows, :, : self.cap] = old[: self.rows]
                store[i] = grown
        self.rows, self.cap = new_rows, new_cap
        self.storage += 1

    def release(self) -> None:
        """Drop the storage (nothing is held): the next pass allocates it again."""
        self.keys, self.values, self.rows, self.cap = [], [], 0, 0
        self.storage += 1

    def copy(self, source: int, target: int, positions: int) -> None:
        """Row `target` starts with row `source`'s first `positions` positions."""
        for store in (self.keys, self.values):
            for layer in store:
                layer[target, :, :positions] = layer[source, :, :positions]

    def set_pass(self, rows: torch.Tensor, positions: torch.Tensor, read: slice | torch.Tensor, width: int):
        """What the next forward pass writes and reads: its token (i, j) writes at storage row rows[i, j],
        position positions[i, j] (the scratch row for padding and holes); its batch row i attends to
        storage row read[i] up to `width` (read a slice: a view, nothing copied)."""
        self._pass = (rows, positions, read, width)

    @property
    def scratch(self) -> int:
        return self.rows

    # --- the model's side ------------------------------------------------------------------------------

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """Write this pass's keys and values [B, kv_heads, q, head_dim] of one layer; return the keys and
        values it attends to: [B, kv_heads, width, head_dim] views of the storage."""
        if layer_idx == len(self.keys):  # the first pass: this layer's storage, in its shapes
            shape = (self.rows + 1, keys.shape[1], self.cap, keys.shape[3])
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
