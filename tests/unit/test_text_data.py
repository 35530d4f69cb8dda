"""Text batching (dynamic padding, length-grouped training batches), tokenization and its cache, the
pretrained-directory checks, and the warm-up schedule and weight-decay groups text training uses."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from danlu.config import TrainConfig
from danlu.data.batches import shuffle_generator
from danlu.errors import DanluError
from danlu.families.text.data import TextPart, texts_of
from danlu.families.text.pretrained import check_dir, check_max_length, position_limit
from danlu.training.trainer import build_optimizer, lr_at


def part(lengths, pad=0):
    ids = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = len(lengths)
    return TextPart(ids, offsets, np.arange(n), torch.arange(n), pad)


def test_batches_are_padded_to_their_own_longest_text_in_order():
    p = part([3, 1, 5, 2])
    first, second = p.batches(2)
    assert first.inputs["input_ids"].tolist() == [[1, 1, 1], [2, 0, 0]]
    assert first.inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert second.inputs["input_ids"].shape == (2, 5) and second.target.tolist() == [2, 3]
    assert first.inputs["input_ids"].dtype == torch.int64


def test_training_batches_group_lengths_cover_every_row_once_and_replay():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 200, size=2000).tolist()
    p = part(lengths)
    rows = [b.target.tolist() for b, _ in p.train_batches(32, shuffle_generator(0, 1))]
    assert sorted(r for batch in rows for r in batch) == list(range(2000))
    again = [b.target.tolist() for b, _ in part(lengths).train_batches(32, shuffle_generator(0, 1))]
    assert rows == again  # the epoch's generator decides everything: resume replays it
    assert rows != [b.target.tolist() for b, _ in part(lengths).train_batches(32, shuffle_generator(0, 2))]
    # length grouping: far less padding than batches of random rows
    random_pad = 0
    perm = torch.randperm(2000, generator=torch.Generator().manual_seed(0)).numpy()
    widths = np.asarray(lengths)
    for start in range(0, 2000, 32):
        chunk = widths[perm[start : start + 32]]
        random_pad += len(chunk) * chunk.max() - chunk.sum()
    assert p.padding_share() < 0.5 * random_pad / (random_pad + widths.sum())


def test_ungrouped_training_batches_are_the_epochs_permutation_cut_in_order():
    lengths = np.random.default_rng(1).integers(3, 200, size=200).tolist()
    p = part(lengths)
    p.group_batches = 1  # data.group_by_length: false
    rows = [sorted(b.target.tolist()) for b, _ in p.train_batches(8, shuffle_generator(0, 1))]
    perm = torch.randperm(200, generator=shuffle_generator(0, 1))
    cut = [tuple(sorted(perm[i : i + 8].tolist())) for i in range(0, 200, 8)]
    assert sorted(map(tuple, rows)) == sorted(cut)
    grouped = part(lengths)
    list(grouped.train_batches(8, shuffle_generator(0, 1)))
    assert grouped.padding_share() < 0.5 * p.padding_share()


def test_ranks_share_each_global_batch():
    p = part([4, 2, 7, 1, 3, 3, 5, 6])
    whole = [b.target.tolist() for b, _ in p.train_batches(4, shuffle_generator(1, 1))]
    shares = [
        [
            b.target.tolist()
            for b, _ in part([4, 2, 7, 1, 3, 3, 5, 6]).train_batches(4, shuffle_generator(1, 1), r, 2)
        ]
        for r in (0, 1)
    ]
    assert [a + b for a, b in zip(*shares, strict=True)] == whole


def test_text_columns_must_hold_text():
    frame = pd.DataFrame({"review": ["good", None], "n": [1, 2]})
    with pytest.raises(DanluError, match="holds numbers"):
        texts_of(frame, "n", "f.csv")
    with pytest.raises(DanluError, match="empty at row 2"):
        texts_of(frame, "review", "f.csv")
    with pytest.raises(DanluError, match=r"not in 'f\.csv'"):
        texts_of(frame, "text", "f.csv")


def _model_dir(path, files):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 128}))
    for name in files:
        (path / name).write_bytes(b"x")
    return path


def test_pretrained_directories_are_checked_before_loading(tmp_path):
    with pytest.raises(DanluError, match=r"needs model\.pretrained"):
        check_dir(None)
    with pytest.raises(DanluError) as hub:
        check_dir("sentence-transformers/all-MiniLM-L6-v2")
    assert "hub id" in hub.value.hint and "never downloads" in hub.value.hint
    pickle_only = _model_dir(tmp_path / "bin", ["pytorch_model.bin", "vocab.txt"])
    with pytest.raises(DanluError, match=r"pytorch_model\.bin, a pickle"):
        check_dir(str(pickle_only))
    no_tokenizer = _model_dir(tmp_path / "tok", ["model.safetensors"])
    with pytest.raises(DanluError, match="no tokenizer files"):
        check_dir(str(no_tokenizer))
    whole = _model_dir(tmp_path / "ok", ["model.safetensors", "tokenizer.json"])
    assert check_dir(str(whole)) == whole
    with pytest.raises(DanluError, match="beyond the 128 positions"):
        check_max_length(256, whole)
    check_max_length(128, whole)
    assert position_limit({"model_type": "roberta", "max_position_embeddings": 514}) == 512


def test_warmup_rises_linearly_then_the_schedule_decays_to_zero():
    tc = TrainConfig(lr=1.0, schedule="linear", warmup=0.1)
    assert [round(lr_at(s, 100, tc), 6) for s in (0, 5, 10, 55, 100)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    cosine = TrainConfig(lr=1.0, schedule="cosine", warmup=0.2)
    assert lr_at(10, 100, cosine) == pytest.approx(0.5) and lr_at(20, 100, cosine) == pytest.approx(1.0)


def test_weight_decay_skips_biases_and_norms_and_frozen_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.01), decay_matrices_only=True)
    decayed, plain = optimizer.param_groups
    assert [p.shape for p in decayed["params"]] == [(4, 4)] and decayed["weight_decay"] == 0.01
    assert len(plain["params"]) == 4 and plain["weight_decay"] == 0.0  # 2 biases, the norm's 2 vectors
