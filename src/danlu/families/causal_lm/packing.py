"""Packing (data.packing: true): several conversations in one row of up to data.max_length tokens, so that a
batch of short conversations is not mostly padding. Each conversation keeps its own positions (from 0)
and attends only to itself: the row's attention mask is block-diagonal and causal, so a packed row gives
every conversation exactly the loss it gets alone (tested). The first token of each conversation is not
trained (it would be predicted from the conversation before it)."""

from __future__ import annotations

import numpy as np
import torch

from danlu.training.objectives import IGNORE


def first_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Conversations (by index) into packs of at most `capacity` tokens: longest first, each into the first
    pack with room. Deterministic; packs hold their conversations in the order placed."""
    packs: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-int(lengths[k]), k)):
        size = int(lengths[i])
        slot = next((p for p, free in enumerate(room) if free >= size), None)
        if slot is None:
            packs.append([i])
            room.append(capacity - size)
        else:
            packs[slot].append(i)
            room[slot] -= size
    return packs


def pack(
    ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, rows: np.ndarray, capacity: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The conversations `rows` (of flat ids/labels with offsets) packed into rows of at most `capacity`
    tokens: flat ids, labels (a conversation's first token untrained), positions (from 0 in each
    conversation), segments (the conversation's place in its row), and the packed rows' offsets."""
    lengths = offsets[rows + 1] - offsets[rows]
    packs = first_fit(lengths, capacity)
    out_ids, out_labels, positions, segments = [], [], [], []
    sizes = []
    for members in packs:
        size = 0
        for place, k in enumerate(members):
            r = rows[k]
            start, end = offsets[r], offsets[r + 1]
            out_ids.append(ids[start:end])
            piece = labels[start:end].copy()
            piece[0] = IGNORE
            out_labels.append(piece)
            positions.append(np.arange(end - start, dtype=np.int32))
            segments.append(np.full(end - start, place, dtype=np.int32))
            size += end - start
        sizes.append(size)
    packed_offsets = np.zeros(len(packs) + 1, dtype=np.int64)
    np.cumsum(sizes, out=packed_offsets[1:])

    def flat(pieces: list[np.ndarray], dtype) -> np.ndarray:
        return np.concatenate(pieces).astype(dtype) if pieces else np.zeros(0, dtype)

    return (
        flat(out_ids, np.int32),
        flat(out_labels, np.int32),
        flat(positions, np.int32),
        flat(segments, np.int32),
        packed_offsets,
    )


def block_mask(segments: torch.Tensor) -> torch.Tensor:
    """[rows, 1, tokens, tokens] boolean attention mask from each token's segment (-1 on padding): a
    token sees the tokens of its own conversation up to itself. A padding token sees itself alone (a row
    that sees nothing would make NaN, which the next layer's masked product would spread as 0 x NaN)."""
    tokens = segments.shape[1]
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] >= 0)
    itself = torch.eye(tokens, dtype=torch.bool)[None]
    return ((same & causal[None]) | itself)[:, None]
