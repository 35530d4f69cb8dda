"""Text data: read the table, split it, fit the target, tokenize every text once (cached under
RUN/cache/), and batch with dynamic padding: each batch is padded only to its own longest text, and
training batches group texts of similar length so little of each batch is padding."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from danlu import __version__
from danlu.config import DataConfig, ModelConfig, TrainConfig
from danlu.data.batches import Batch, sharded
from danlu.data.dataset import Dataset, HeldOut, assemble
from danlu.data.sources import open_table
from danlu.data.split import split_indices
from danlu.errors import DanluError
from danlu.families.tabular.schema import infer_task
from danlu.families.target import TargetFitter, row_name
from danlu.families.text.pretrained import check_dir, check_max_length, load_tokenizer, tokenizer_fingerprint
from danlu.families.text.state import TextState
from danlu.run import atomic_write

log = logging.getLogger("danlu")
TOKENIZE_CHUNK = 4096  # texts per tokenizer call (the fast tokenizer spreads a call over threads)
GROUP_BATCHES = 50  # length grouping: sort within windows of this many batches, then shuffle the batches


def texts_of(frame: pd.DataFrame, column: str, name: str | None) -> list[str]:
    """The column's texts; missing values are an error naming the row, numbers are refused. name: the
    file, in errors; None for rows to predict (which have their own, run-independent fixes)."""
    where = f"'{name}'" if name is not None else "the input"
    if column not in frame.columns:
        shown = ", ".join(map(str, list(frame.columns)[:20]))
        fix = (
            f"set data.text to one of: {shown}" if name is not None else f"give the rows a '{column}' column"
        )
        raise DanluError(f"text column '{column}' is not in {where}", fix)
    values = frame[column]
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        raise DanluError(
            f"data.text column '{column}' of {where} holds numbers, not text",
            "name the column of texts in data.text (numeric columns belong to the tabular family)"
            if name is not None
            else f"give '{column}' the texts to predict",
        )
    missing = values.isna()
    if missing.any():
        row = int(missing.to_numpy().argmax())
        raise DanluError(
            f"text column '{column}' is empty at {row_name(frame.index[row])} of {where}",
            "drop rows without text, or fill them in",
        )
    return values.astype(str).tolist()


def tokenize(tokenizer, texts: list[str], max_length: int, progress: bool = False):
    """Token ids of every text (special tokens added, truncated to max_length), as one flat int32 array
    and offsets [n + 1]: no padding is stored."""
    pieces, lengths = [], []
    bar = tqdm(total=len(texts), unit="text", desc="tokenize", disable=None if progress else True)
    with bar:
        for start in range(0, len(texts), TOKENIZE_CHUNK):
            encoded = tokenizer(
                texts[start : start + TOKENIZE_CHUNK],
                truncation=True,
                max_length=max_length,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
            lengths.extend(len(ids) for ids in encoded)
            pieces.append(np.fromiter((t for ids in encoded for t in ids), dtype=np.int32))
            bar.update(len(encoded))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.int32)), offsets


def cached_tokens(cache: Path | None, source, texts: list[str], state: TextState, progress: bool):
    """tokenize(), or the same arrays from RUN/cache/tokens-KEY.npz: keyed by the data's fingerprint, the
    tokenizer files, the text column and max_length, so a resumed run does not tokenize again."""
    if cache is None:
        return tokenize(state.tokenizer(), texts, state.max_length, progress)
    settings = [source.fingerprint(), state.fingerprint, state.text_column, state.max_length, __version__]
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"tokens-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            if len(stored["offsets"]) == len(texts) + 1:
                return stored["ids"], stored["offsets"]
    ids, offsets = tokenize(state.tokenizer(), texts, state.max_length, progress)
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, ids=ids, offsets=offsets))
    return ids, offsets


class TextPart:
    """A split's token ids (flat, with offsets) and encoded targets; batches are padded per batch.

    Training batches are grouped by length: the epoch's permutation is cut into windows of GROUP_BATCHES
    batches, each window sorted by length and cut into batches, and the batches shuffled; all drawn from
    the epoch's generator, so resume and any process count see the same global batches. Other batches
    keep the rows' order (the Predictor relies on it)."""

    uneven = False
    group_batches = GROUP_BATCHES  # 1: batches drawn at random, not grouped by length

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, rows: np.ndarray, target: torch.Tensor, pad_id):
        self.ids = torch.from_numpy(ids)  # int32, shared by every part of a source: no copy per split
        self.starts = torch.from_numpy(offsets[rows])
        self.lengths = torch.from_numpy(offsets[rows + 1] - offsets[rows])
        self.target = target
        self.pad_id = pad_id
        self.device = torch.device("cpu")
        self.tokens = 0  # real and padded tokens in the training batches so far
        self.padded = 0

    @property
    def n_rows(self) -> int:
        return len(self.lengths)

    def to(self, device: torch.device) -> TextPart:
        self.device = device  # batches are built on the CPU and moved one at a time
        return self

    def _batch(self, rows: torch.Tensor) -> Batch:
        lengths = self.lengths[rows]
        width = int(lengths.max()) if len(rows) else 0
        position = torch.arange(width)
        mask = position[None, :] < lengths[:, None]
        index = (self.starts[rows][:, None] + position[None, :]).clamp_(max=max(len(self.ids) - 1, 0))
        ids = torch.where(mask, self.ids[index], self.pad_id).long()
        inputs = {"input_ids": ids, "attention_mask": mask.long()}
        return Batch(inputs, self.target[rows]).to(self.device)

    def batches(self, batch_size: int, shuffle: torch.Generator | None = None) -> Iterator[Batch]:
        if shuffle is None:
            for start in range(0, self.n_rows, batch_size):
                yield self._batch(torch.arange(start, min(start + batch_size, self.n_rows)))
            return
        for rows in self._grouped(batch_size, shuffle):
            self.tokens += len(rows) * int(self.lengths[rows].max())
            self.padded += len(rows) * int(self.lengths[rows].max()) - int(self.lengths[rows].sum())
            yield self._batch(rows)

    def _grouped(self, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        perm = torch.randperm(self.n_rows, generator=generator)
        window = batch_size * self.group_batches
        batches = []
        for start in range(0, self.n_rows, window):
            rows = perm[start : start + window]
            rows = rows[torch.argsort(self.lengths[rows], descending=True, stable=True)]
            batches.extend(rows[i : i + batch_size] for i in range(0, len(rows), batch_size))
        order = torch.randperm(len(batches), generator=generator)
        return [batches[i] for i in order]

    def train_batches(
        self, batch_size: int, shuffle: torch.Generator, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[Batch, int]]:
        return sharded(self.batches(batch_size, shuffle), rank, world)

    def by_length(self) -> tuple[TextPart, np.ndarray]:
        """The same rows, longest first, and the order they were taken in: batches of similar lengths
        pad less (the Predictor puts its outputs back in the rows' order). Longest first, so a batch too
        large for memory fails at once."""
        order = torch.argsort(self.lengths, descending=True, stable=True)
        part = copy.copy(self)
        part.starts, part.lengths, part.target = self.starts[order], self.lengths[order], self.target[order]
        return part, order.numpy()

    def padding_share(self) -> float | None:
        """Padding tokens over all tokens in the training batches built so far."""
        return self.padded / self.tokens if self.tokens else None


def _task(config: DataConfig, target: pd.Series) -> str:
    return config.task if config.task != "auto" else infer_task(target)


def _new_state(config: DataConfig, pretrained: str | None, train: pd.Series, task: str) -> TextState:
    path = check_dir(pretrained)
    check_max_length(config.max_length, path)
    tokenizer = load_tokenizer(path)
    if tokenizer.pad_token_id is None:
        raise DanluError(f"the tokenizer of '{path}' has no padding token", "set one and save it again")
    fitter = TargetFitter(task, config.target)
    fitter.update(train)
    state = TextState(
        config.text, config.max_length, str(path.resolve()), int(tokenizer.pad_token_id), fitter.finish()
    )
    state.fingerprint = tokenizer_fingerprint(path)
    state._tokenizer = tokenizer
    return state


def part_of(frame: pd.DataFrame, state: TextState, name: str | None, labelled: bool = True) -> TextPart:
    """A part for new rows (no cache): validation/test files (labelled), the Predictor (not: a target
    column in a file to predict plays no part, and may hold labels the run never saw)."""
    texts = texts_of(frame, state.text_column, name)
    ids, offsets = tokenize(state.tokenizer(), texts, state.max_length)
    target = (
        torch.from_numpy(state.encode_target(frame[state.target].reset_index(drop=True)))
        if labelled
        else torch.zeros(len(frame))
    )
    return TextPart(ids, offsets, np.arange(len(texts)), target, state.pad_id)


def _separate(name: str, spec: str, state: TextState, device):
    table = open_table(spec)
    frame = table.read_all()
    if state.target not in frame.columns:
        raise DanluError(f"'{spec}' has no target column '{state.target}'", f"give {name} rows their labels")
    return part_of(frame, state, spec).to(device), HeldOut(name, table, frame)


def load(
    config: DataConfig,
    device: torch.device,
    state: TextState | None = None,
    cache: Path | None = None,
    model: ModelConfig | None = None,
    train: TrainConfig | None = None,
) -> Dataset:
    """Split the table, fit the state on the training rows (unless given; the tokenizer from
    model.pretrained), tokenize every text once (into `cache`, RUN/cache)."""
    if config.text is None:
        raise DanluError("the text family needs data.text", "name the column of texts: data.text=COLUMN")
    table = open_table(config.train)
    frame = table.read_all()
    if not len(frame):
        raise DanluError(f"'{config.train}' has no rows", "pass a file with texts")
    texts = texts_of(frame, config.text, table.name)
    if config.target not in frame.columns:
        raise DanluError(f"target column '{config.target}' is not in '{table.name}'", "check data.target")
    labels = frame[config.target]
    task = state.task if state is not None else _task(config, labels)
    train_idx, val_idx, test_idx = split_indices(
        len(frame), labels if task == "classification" else None, config
    )
    if state is None:
        state = _new_state(
            config, model.pretrained if model else None, labels.iloc[train_idx].reset_index(drop=True), task
        )
    ids, offsets = cached_tokens(cache, table, texts, state, progress=True)
    encoded = state.head.encode  # all rows at once: an unseen label outside training is named

    index = {"train": train_idx, "validation": val_idx, "test": test_idx}

    def own(name: str):
        if not len(index[name]):
            return None, None
        target = torch.from_numpy(encoded(labels.iloc[index[name]].reset_index(drop=True)))
        part = TextPart(ids, offsets, index[name], target, state.pad_id).to(device)
        part.group_batches = 1 if config.group_by_length is False else GROUP_BATCHES
        return part, HeldOut(name, table, frame.iloc[index[name]], index[name])

    def sample(rows: int) -> HeldOut:
        kept = train_idx[:rows]
        return HeldOut("none", table, frame.iloc[kept], kept)

    return assemble(
        config,
        state,
        own("train")[0],
        table,
        own,
        lambda name, spec: _separate(name, spec, state, device),
        sample,
    )
