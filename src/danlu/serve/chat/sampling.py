"""Per-request sampling: greedy or temperature / top-k / top-p sampling, with the OpenAI frequency and
presence penalties (additive, on the generated tokens' counts) and Hugging Face's repetition penalty
(multiplicative, on prompt and generated tokens).

A step's rows are sampled together on the logits' device (sample): one softmax over the rows that are
not greedy, their top-k and top-p sets (on a CPU from the few most likely tokens of each row rather than
a sort of the whole vocabulary; on an accelerator from one sort, so that the step reads back only its
tokens), and one draw each by inverse transform: the token where the row's cumulative
probability first passes its own uniform number, which comes from the request's own random source
(seeded by the request, or fresh entropy; never the process's global RNG). So a seeded request samples
the same tokens whichever rows share its steps, and on any device up to the logits' numerics."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

# Temperatures below this are greedy: logits divided by them overflow float32, and the softmax of such a
# temperature puts all its mass on the top token anyway.
GREEDY_BELOW = 1e-5
# The most likely tokens per row a top-p set is first looked for in on a CPU (or the row's top_k, where
# larger, to the next power of two; rows of one width are drawn together); a row whose set is not settled
# within them is looked at again with 8 times as many, up to the whole vocabulary. For 16 SmolLM2 streams at
# temperature 0.7 and top_p 0.9, 9 of 65 steps took a later round over 64 tokens, and 304 of 513 over 512
# tokens with repetition_penalty 1.1, which flattens the rows as they hold more tokens
# (benchmarks/chat_steps.py --top-p prints this). The rows that need one are few and not foreseeable from
# their earlier sets: over 256 such tokens a set held a median of 4 tokens, over 64 in 2.5% of row-steps, and
# a set over 32 was followed by one over 64 in 10% of next steps (chat_steps.py --set-sizes), so every row
# starts from 64 rather than widening for all. Sorting the 49,152-token vocabulary takes 20 to 30 times as
# long as finding the top 64 on a CPU. On an accelerator every row's sets come from one sort of its whole
# vocabulary instead (device_candidates): a later round there waits mid-step for the device to finish all the
# work queued before it, and at 64 streams most steps would take one (with 2.5% of row-steps over 64 tokens,
# 1 - 0.975^64 = 80% of steps).
CANDIDATES = 64
UNSETTLED = -2  # _draw_cut's token for a row whose top-p set its candidates do not settle


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1


def random_source(params: SamplingParams) -> random.Random:
    """The request's own source of uniform numbers, one per sampled token: seeded by its seed, or by
    fresh entropy."""
    return random.Random(params.seed)


def penalized(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.frequency_penalty or params.presence_penalty)


_Parts = tuple[list[np.ndarray], list[np.ndarray]]  # each row's positions, each row's values


class History:
    """The tokens a penalized sequence holds, as the penalties read them: its distinct tokens (prompt and
    output: the repetition penalty) and each output token's count (the frequency and presence penalties).
    Kept as the sequence grows (add), so a step's penalties cost one numpy copy of what it holds, not a
    set and a Counter rebuilt from every token in Python."""

    def __init__(self, prompt: list[int], output: Iterable[int] = ()) -> None:
        self.distinct: dict[int, None] = dict.fromkeys(prompt)  # in the order first held
        self.counts: dict[int, int] = {}
        self.low = min(self.distinct, default=sys.maxsize)  # nothing held: no token to check
        self.high = max(self.distinct, default=-1)
        for token in output:
            self.add(token)

    def add(self, token: int) -> None:
        """An output token."""
        self.counts[token] = self.counts.get(token, 0) + 1
        if token not in self.distinct:
            self.distinct[token] = None
            self.low, self.high = min(self.low, token), max(self.high, token)


def penalize(
    logits: torch.Tensor, params: list[SamplingParams], histories: list[History | None]
) -> dict[int, Exception]:
    """Apply each row's penalties to contiguous logits [rows, vocab], in place, on their device: the
    repetition penalty on the tokens of the row's prompt and output, then the frequency and presence
    penalties on its output's counts (histories: each row's History; None for a row without penalties).
    Every penalized row at once, touching only the logits of the tokens they hold (their positions and
    amounts worked out on the host: one copy of each to the device). Returns an exception for each row
    that cannot be penalized (a token the vocabulary lacks), which is left as it was."""
    vocab = logits.shape[-1]
    failed: dict[int, Exception] = {}
    repeat: _Parts = ([], [])  # positions in the flattened logits, each one's penalty
    count: _Parts = ([], [])  # positions, each one's amount to subtract
    for i, history in enumerate(histories):
        p = params[i]
        if history is None:
            continue
        if history.low < 0 or history.high >= vocab:
            failed[i] = ValueError(f"a token of this sequence is outside the model's {vocab} logits")
            continue
        if p.repetition_penalty != 1.0:
            seen = np.fromiter(history.distinct, np.int64, len(history.distinct))
            repeat[0].append(i * vocab + seen)
            repeat[1].append(np.full(len(seen), p.repetition_penalty))
        if history.counts and (p.frequency_penalty or p.presence_penalty):
            n = len(history.counts)
            count[0].append(i * vocab + np.fromiter(history.counts.keys(), np.int64, n))
            amounts = np.fromiter(history.counts.values(), np.float64, n)
            count[1].append(p.frequency_penalty * amounts + p.presence_penalty)
    flat = logits.view(-1)
    if repeat[0]:
        where, penalty = _on(logits, repeat)
        values = flat.index_select(0, where)
        flat.index_copy_(0, where, torch.where(values > 0, values / penalty, values * penalty))
    if count[0]:
        flat.index_add_(0, *_on(logits, count), alpha=-1)
    return failed


def _on(logits: torch.Tensor, pairs: _Parts) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' positions and values, joined, as tensors on the logits' device."""
    positions = torch.from_numpy(np.concatenate(pairs[0]))
    values = torch.from_numpy(np.concatenate(pairs[1])).to(logits.dtype)
    return positions.to(logits.device, non_blocking=True), values.to(logits.device, non_blocking=True)


def sample(
    logits: torch.Tensor, params: list[SamplingParams], uniforms: list[float], candidates: int | None = None
) -> list[int]:
    """The next token of each row of (penalized) float32 logits [rows, vocab], with its row's parameters
    and uniform number in [0, 1) (unused by greedy rows); -1 for a row whose logits are not numbers
    (NaN, or an infinite top logit) or whose probabilities are not finite numbers. Greedy rows take one
    argmax. Rows with neither top_k nor top_p draw from their whole vocabulary; the others from their
    most likely tokens (_draw_cut), rows looking at as many together (first_width of candidates, default
    device_candidates: one row's large top_k does not widen the others'). One copy of the tokens to the
    host, and one more for each later round a row's top-p set needs (none where candidates is the
    vocabulary, an accelerator's default)."""
    top, tokens = logits.max(dim=-1)
    tokens = torch.where(torch.isfinite(top), tokens, -1)  # NaN or infinite logits: no token
    vocab = logits.shape[-1]
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    whole = [i for i in drawn if params[i].top_p >= 1.0 and not _top_k(params[i], vocab)]
    cut = sorted(set(drawn) - set(whole))
    if whole:
        _put(tokens, whole, _draw_whole(*_rows(logits, whole, params, uniforms)))
    if candidates is None:
        candidates = device_candidates(logits.device, vocab)
    widths = {i: first_width(_top_k(params[i], vocab), candidates) for i in cut}
    for width in dict.fromkeys(widths.values()):
        rows = [i for i in cut if widths[i] == width]
        _put(tokens, rows, _draw_cut(*_rows(logits, rows, params, uniforms), width))
    result = tokens.tolist()
    left = [i for i in cut if result[i] == UNSETTLED]
    while left:  # top-p sets not within the candidates: those rows again, with 8 times as many
        width = min(8 * max(widths[i] for i in left), vocab)
        again = _draw_cut(*_rows(logits, left, params, uniforms), width).tolist()
        for i, token in zip(left, again, strict=True):
            result[i], widths[i] = token, width
        left = [i for i in left if result[i] == UNSETTLED]
    return result


def device_candidates(device: torch.device, vocab: int) -> int:
    """How many of each row's most likely tokens its sets are first looked for in on the device: CANDIDATES
    on a CPU, where a later round costs only its own work; the whole vocabulary elsewhere, so that a step
    never waits for the device before its tokens are read back (see CANDIDATES)."""
    return CANDIDATES if device.type == "cpu" else vocab


def first_width(top_k: int, candidates: int = CANDIDATES) -> int:
    """How many of a row's most likely tokens its set is first looked for in: candidates, or its top_k
    (0: off) where larger, to the next power of two."""
    return 1 << (max(candidates, top_k) - 1).bit_length()


def _rows(
    logits: torch.Tensor, rows: list[int], params: list[SamplingParams], uniforms: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' logits (all of them: no copy) and settings [rows, 4] (float64, on their device): each
    row's temperature, top_p, top_k (0 where it is off: at or above the vocabulary, however large) and
    uniform number."""
    vocab = logits.shape[-1]
    settings = torch.tensor(
        [[params[i].temperature, params[i].top_p, _top_k(params[i], vocab), uniforms[i]] for i in rows],
        dtype=torch.float64,
    ).to(logits.device, non_blocking=True)
    if len(rows) == logits.shape[0]:
        return logits, settings
    return logits.index_select(0, torch.tensor(rows, device=logits.device)), settings


def _top_k(params: SamplingParams, vocab: int) -> int:
    """The row's top_k, 0 where it is off (0, or at or above the vocabulary)."""
    return params.top_k if 0 < params.top_k < vocab else 0


def _put(tokens: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
    if len(rows) == tokens.shape[0]:
        tokens.copy_(values)
    else:
        tokens.index_copy_(0, torch.tensor(rows, device=tokens.device), values)


def _probs(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits / temperature[:, None].to(logits.dtype), dim=-1)


def _draw_whole(logits: torch.Tensor, settings: torch.Tensor) -> torch.Tensor:
    """Draw from every token of the vocabulary."""
    return _inverse(_probs(logits, settings[:, 0]).double(), settings[:, 3])


def _draw_cut(logits: torch.Tensor, settings: torch.Tensor, width: int) -> torch.Tensor:
    """Draw from the row's top-k set and, within it, the smallest set of most likely tokens whose
    probability (out of the top-k set's) reaches top_p: the first token always stays. Both are found
    among the row's `width` most likely tokens, which settle them when its top_k is within them, or it
    has none and their mass reaches its top_p; UNSETTLED otherwise."""
    vocab = logits.shape[-1]
    width = min(width, vocab)
    temperature, top_p, top_k, uniform = settings.T
    probs = _probs(logits, temperature)
    if width == vocab:  # ties in the vocabulary's order, on every device
        values, order = probs.sort(dim=-1, descending=True, stable=True)
    else:
        values, order = probs.topk(width, dim=-1)  # most likely first
    top_k = torch.where(top_k > 0, top_k, vocab)
    within = top_k <= width  # the row's top-k set is among the candidates
    position = torch.arange(width, device=logits.device)
    values = values.double().masked_fill(position >= top_k[:, None], 0)
    mass = values.cumsum(dim=-1)
    threshold = top_p * torch.where(within, mass[:, -1], 1.0)  # of the top-k set's mass, or of all
    # settled: its sets are known (the top-p set of a top-k set beyond the candidates is not: its mass is
    # unknown), or its probabilities are not numbers (it fails, below)
    reached = (top_k == vocab) & (mass[:, -1] >= threshold)
    settled = within | reached | ~torch.isfinite(mass[:, -1]) | (width == vocab)
    values = values.masked_fill((mass - values >= threshold[:, None]) & (position > 0), 0)
    index = _inverse(values, uniform)
    tokens = torch.where(index >= 0, order.gather(1, index.clamp(min=0)[:, None])[:, 0], -1)
    return torch.where(settled, tokens, UNSETTLED)


def _inverse(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Each row's index where its cumulative weight [rows, n] (float64, not negative) first passes
    uniform x its total: index i with probability weight i / total. A row whose weights are not finite
    gives -1."""
    cumulative = weights.cumsum(dim=-1)
    total = cumulative[:, -1].contiguous()  # searchsorted copies a strided one, with a warning
    index = torch.searchsorted(cumulative, (uniform * total)[:, None], right=True)[:, 0]
    # rounding can put uniform x total at the total itself: the last token with weight instead (the first
    # whose cumulative weight is the total)
    last = torch.searchsorted(cumulative, total[:, None])[:, 0]
    index = torch.minimum(index, last)
    return torch.where(torch.isfinite(total) & (total > 0), index, -1)
