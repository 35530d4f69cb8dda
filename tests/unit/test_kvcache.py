"""The torch executor's slot cache on tensors: writes land at each row's own positions, growing keeps
every row's contents (and cutting back past the budget, what is asked), a hole writes only to its row's
spare column, masks keep rows to their own positions (and
sliding-window layers to their window), and batches pad to their bucket."""

from types import SimpleNamespace

import pytest
import torch

from danlu.serve.chat.kvcache import GROW, SlotCache, attention_masks, bucket, bytes_per_token, supported


def nbytes(cache: SlotCache) -> int:
    return sum(t.numel() * t.element_size() for t in (*cache.keys, *cache.values))


def kv(batch: int, count: int, fill: float) -> torch.Tensor:
    """Keys [batch, 2 heads, count, 4] whose every value says which batch row, head and position wrote it
    (head 1's are 0.25 above head 0's)."""
    rows = torch.arange(batch, dtype=torch.float32)[:, None, None, None]
    heads = torch.tensor([0.0, 0.25])[None, :, None, None]
    positions = torch.arange(count, dtype=torch.float32)[None, None, :, None]
    return (fill + 100 * rows + heads + positions).expand(batch, 2, count, 4).clone()


def prefill(cache: SlotCache, row: int, start: int, count: int) -> None:
    """One prompt chunk of `count` tokens from `start` into `row`."""
    positions = torch.arange(start, start + count)[None]
    cache.set_pass(torch.full((1, count), row), positions, slice(row, row + 1), start + count)


def test_prefill_and_decode_write_at_each_rows_own_positions():
    cache = SlotCache()
    cache.reserve(3, 5)
    assert (cache.rows, cache.cap) == (3, GROW)
    prefill(cache, 1, 0, 5)
    keys, values = cache.update(kv(1, 5, 0), kv(1, 5, 0.5), 0)
    assert keys.shape == (1, 2, 5, 4) and torch.equal(keys, kv(1, 5, 0))
    assert torch.equal(values, kv(1, 5, 0.5))
    prefill(cache, 1, 5, 2)  # a prompt's second chunk attends to the first
    keys, _ = cache.update(kv(1, 2, 1000), kv(1, 2, 1000), 0)
    assert keys.shape == (1, 2, 7, 4) and torch.equal(keys[:, :, 5:], kv(1, 2, 1000))
    # decode: row 0 at position 3, row 1 at position 7, row 2 a hole (written to its spare column)
    before = cache.keys[0][2, :, :GROW].clone()
    s = cache.spare
    cache.set_pass(torch.tensor([[0], [1], [2]]), torch.tensor([[3], [7], [s]]), slice(0, 3), 8)
    keys, _ = cache.update(kv(3, 1, 5000), kv(3, 1, 5000), 0)
    assert keys.shape == (3, 2, 8, 4)
    assert keys.data_ptr() == cache.keys[0].data_ptr()  # a view of the storage: nothing copied
    assert float(cache.keys[0][0, 0, 3, 0]) == 5000 and float(cache.keys[0][1, 0, 7, 0]) == 5100
    assert float(cache.keys[0][1, 1, 7, 3]) == 5100.25  # each head in its own place
    assert torch.equal(cache.keys[0][2, :, :GROW], before)  # the hole's positions are untouched
    assert float(cache.keys[0][2, 0, s, 0]) == 5200 and cache.keys[0].shape == (3, 2, GROW + 1, 4)
    assert len(cache) == 1


def test_prompts_prefilled_together_left_padded_write_only_their_own_positions():
    """Two chunks in one pass: row 2's 3 tokens at 0..2 and row 0's 1 token at 4 (its first 4 already
    there), left-padded to 3; the padding writes to row 0's spare column; rows 2 and 0 are read (a
    gather)."""
    cache = SlotCache()
    cache.reserve(3, 8)
    prefill(cache, 0, 0, 4)
    cache.update(kv(1, 4, 300), kv(1, 4, 300), 0)
    before = cache.keys[0][0, :, :4].clone()
    s = cache.spare
    rows, positions = torch.tensor([[2, 2, 2], [0, 0, 0]]), torch.tensor([[0, 1, 2], [s, s, 4]])
    cache.set_pass(rows, positions, torch.tensor([2, 0]), 5)
    keys, _ = cache.update(kv(2, 3, 9000), kv(2, 3, 9000), 0)
    assert keys.shape == (2, 2, 5, 4)
    assert torch.equal(cache.keys[0][2, :, :3], kv(2, 3, 9000)[0])
    assert torch.equal(cache.keys[0][0, :, :4], before)  # its first four positions kept
    assert float(cache.keys[0][0, 0, 4, 0]) == 9000 + 100 + 2  # its one token: batch row 1, column 2
    assert torch.equal(keys[1, :, :4], before) and torch.equal(keys[0, :, :3], kv(2, 3, 9000)[0])


def test_growing_keeps_every_row_and_release_frees():
    cache = SlotCache()
    cache.reserve(2, 10)
    prefill(cache, 1, 0, 10)
    cache.update(kv(1, 10, 7), kv(1, 10, 7), 0)
    cache.reserve(5, GROW + 1)  # more rows and more positions: the storage moves
    assert (cache.rows, cache.cap) == (5, 2 * GROW)
    assert cache.keys[0].shape == (5, 2, 2 * GROW + 1, 4)
    assert torch.equal(cache.keys[0][1, :, :10], kv(1, 10, 7)[0])
    assert nbytes(cache) == 2 * 5 * 2 * (2 * GROW + 1) * 4 * 4
    cache.reserve(1, 3)  # never shrinks while it has room
    assert (cache.rows, cache.cap) == (5, 2 * GROW)
    cache.release()
    assert nbytes(cache) == 0 and (cache.rows, cache.cap) == (0, 0)


def test_growing_past_the_budget_cuts_the_storage_to_what_is_asked():
    """A cap grown for one long sequence does not stay for a wider batch after it: where rows x cap would
    pass `most`, the storage is cut to the rows and positions asked (rounded up only within `most`)."""
    cache = SlotCache()
    cache.reserve(1, 3 * GROW)  # one long sequence
    prefill(cache, 0, 0, 3 * GROW)
    cache.update(kv(1, 3 * GROW, 0), kv(1, 3 * GROW, 0), 0)
    most = 4 * GROW
    cache.reserve(4, 40, most=most)  # it left its row at 40 positions; 4 short rows now
    assert (cache.rows, cache.cap) == (4, GROW) and cache.positions <= most
    assert torch.equal(cache.keys[0][0, :, :40], kv(1, 40, 0)[0])  # what the row holds, kept
    cache.reserve(4, GROW + 10, most=most + 40)  # rounding up stops at the budget
    assert (cache.rows, cache.cap) == (4, GROW + 10) and cache.positions <= most + 40
    assert torch.equal(cache.keys[0][0, :, :40], kv(1, 40, 0)[0])
    cache.reserve(2, 3 * GROW, most=12 * GROW)  # within the budget: grown as usual, rows kept
    assert (cache.rows, cache.cap) == (4, 3 * GROW)


def test_copy_gives_a_row_anothers_positions():
    cache = SlotCache()
    cache.reserve(2, 6)
    prefill(cache, 0, 0, 6)
    cache.update(kv(1, 6, 3), kv(1, 6, 3), 0)
    cache.copy(0, 1, 4)
    assert torch.equal(cache.keys[0][1, :, :4], cache.keys[0][0, :, :4])
    assert not torch.equal(cache.keys[0][1, :, 4:6], cache.keys[0][0, :, 4:6])


def allowed(mask: torch.Tensor) -> list[list[int]]:
    """Which key positions each query of batch row 0 sees."""
    return [row.nonzero().flatten().tolist() for row in (mask[0, 0] == 0)]


def test_masks_keep_each_row_to_its_positions_and_window():
    llama = SimpleNamespace()
    mask = attention_masks(llama, torch.tensor([[2], [0]]), 4, torch.float32)
    assert mask.shape == (2, 1, 1, 4) and mask.dtype == torch.float32
    assert allowed(mask) == [[0, 1, 2]] and allowed(mask[1:]) == [[0]]
    assert float(mask.min()) == torch.finfo(torch.float32).min  # finite: a hole's row cannot be NaN
    causal = attention_masks(llama, torch.arange(2, 5)[None], 5, torch.bfloat16)  # a prompt chunk at 2..4
    assert causal.dtype == torch.bfloat16 and allowed(causal) == [[0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4]]
    mistral = SimpleNamespace(sliding_window=2)
    assert allowed(attention_masks(mistral, torch.arange(3)[None], 3, torch.float32)) == [[0], [0, 1], [1, 2]]
    off = SimpleNamespace(sliding_window=2, use_sliding_window=False)
    assert allowed(attention_masks(off, torch.tensor([[2]]), 3, torch.float32)) == [[0, 1, 2]]
    hybrid = SimpleNamespace(sliding_window=2, layer_types=["sliding_attention", "full_attention"])
    masks = attention_masks(hybrid, torch.tensor([[2]]), 3, torch.float32)
    assert allowed(masks["sliding_attention"]) == [[1, 2]] and allowed(masks["full_attention"]) == [[0, 1, 2]]
    full = SimpleNamespace(sliding_window=2, layer_types=["full_attention"] * 2)
    assert isinstance(attention_masks(full, torch.tensor([[2]]), 3, torch.float32), torch.Tensor)


@pytest.mark.parametrize(
    ("rows", "most", "size"), [(1, 8, 1), (3, 8, 4), (5, 8, 8), (9, 12, 12), (17, 64, 32), (40, 40, 40)]
)
def test_a_batch_pads_to_its_bucket_within_max_batch(rows, most, size):
    assert bucket(rows, most) == size


def test_supported_attention_kinds():
    assert supported(SimpleNamespace()) and supported(SimpleNamespace(layer_types=["full_attention"]))
    assert supported(SimpleNamespace(layer_types=["sliding_attention", "full_attention"]))
    assert not supported(SimpleNamespace(layer_types=["linear_attention", "full_attention"]))


def test_bytes_per_token_counts_keys_and_values_of_every_layer():
    """SmolLM2-135M: 30 layers x (keys + values) x 3 KV heads x 64 = 11,520 numbers a position."""
    smollm = SimpleNamespace(
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576
    )
    assert bytes_per_token(smollm, torch.float32) == 30 * 2 * 3 * 64 * 4 == 46_080
    assert bytes_per_token(smollm, torch.bfloat16) == 23_040
    explicit = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, head_dim=32, hidden_size=64)
    assert bytes_per_token(explicit, torch.float32) == 2 * 2 * 4 * 32 * 4  # no KV heads named: every head
    assert bytes_per_token(SimpleNamespace(), torch.float32) == 0
