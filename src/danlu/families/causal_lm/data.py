"""Conversation data for fine-tuning: read the file, split it (or read data.validation / data.test),
render and tokenize every conversation once with the run's chat template (tokens.py: which tokens are
trained), and batch as texts are (per-batch padding, training batches grouped by length), with the
labels as each batch's target."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from danlu.config import Config, DataConfig, ModelConfig, TrainConfig
from danlu.data.batches import Batch, sharded
from danlu.data.dataset import Dataset, Fingerprinted, HeldOut, assemble
from danlu.data.sources import file_fingerprint
from danlu.data.split import split_indices
from danlu.errors import DanluError
from danlu.families.causal_lm.conversations import Conversations, Row, kind, read_conversations
from danlu.families.causal_lm.packing import block_mask, pack
from danlu.families.causal_lm.pretrained import check_same_weights, new_state, tokenizer_of
from danlu.families.causal_lm.state import CausalLMState
from danlu.families.causal_lm.tokens import Encoded as TokenLabels
from danlu.families.causal_lm.tokens import encode, encode_texts, show
from danlu.families.text.data import GROUP_BATCHES, TextPart
from danlu.serve.chat.templates import Template
from danlu.training import distributed
from danlu.training.objectives import IGNORE, trained_tokens

log = logging.getLogger("danlu")
TOO_LONG = "longer than data.max_length"
ONE_TOKEN = "a single token: nothing to predict"
TEXT_BATCH = 1000  # texts tokenized per call of the tokenizer
PROGRESS_FROM = 2000  # conversations: tokenizing fewer shows no progress bar


@dataclass
class ConversationSource(Fingerprinted):
    """A conversation file: its path as the config names it, and its fingerprint."""

    name: str

    def fingerprint(self) -> dict:
        return file_fingerprint(self.name)


class ChatPart(TextPart):
    """A split's token ids and labels (flat, aligned), batched with per-batch padding; each batch's target
    is its labels [rows, tokens] (IGNORE where not trained, and on padding). A training step's unit is a
    trained token: each global batch comes with its count, for loss scaling over processes.

    Packed (packing.py), a row holds several conversations: then `positions` and `segments` (flat, aligned)
    give each token its position in its conversation and the conversation's place in the row, and batches
    carry position_ids and a block-diagonal attention mask."""

    def __init__(
        self,
        ids: np.ndarray,
        labels: np.ndarray,
        offsets: np.ndarray,
        rows: np.ndarray,
        pad_id: int,
        positions: np.ndarray | None = None,
        segments: np.ndarray | None = None,
        conversations: int | None = None,
    ):
        trained = np.array(
            [trained_tokens(labels[None, offsets[r] : offsets[r + 1]]) for r in rows], np.int64
        )
        super().__init__(ids, offsets, rows, torch.from_numpy(trained), pad_id)
        self.labels = torch.from_numpy(labels)  # int32, aligned with self.ids
        self.positions = None if positions is None else torch.from_numpy(positions)
        self.segments = None if segments is None else torch.from_numpy(segments)
        self.conversations = len(rows) if conversations is None else conversations
        self.texts = False  # the rows are pieces of plain texts (conversations counts the texts)
        self.skipped: Counter = Counter()  # conversations left out of this split, by reason

    @property
    def trained(self) -> int:
        return int(self.target.sum())

    def _batch(self, rows: torch.Tensor) -> Batch:
        lengths = self.lengths[rows]
        width = int(lengths.max()) if len(rows) else 0
        position = torch.arange(width)
        mask = position[None, :] < lengths[:, None]
        index = (self.starts[rows][:, None] + position[None, :]).clamp_(max=max(len(self.ids) - 1, 0))
        ids = torch.where(mask, self.ids[index], self.pad_id).long()
        labels = torch.where(mask, self.labels[index], IGNORE).long()
        if self.segments is None:
            inputs = {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}
        else:
            segments = torch.where(mask, self.segments[index], -1)
            positions = torch.where(mask, self.positions[index], 0).long()
            attention = block_mask(segments)
            inputs = {
                "input_ids": ids,
                "attention_mask": attention,
                "labels": labels,
                "position_ids": positions,
            }
        return Batch(inputs, labels).to(self.device)

    def train_batches(
        self, batch_size: int, shuffle: torch.Generator, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[Batch, int]]:
        return sharded(
            self.batches(batch_size, shuffle), rank, world, units=lambda b: trained_tokens(b.target)
        )


def encode_all(
    state: CausalLMState,
    template: Template,
    conversations: list[Row],
    lines: list[int],
    on_long: str,
    name: str,
    unit: str = "line",
) -> Encoded:
    """Every conversation's ids and labels (or every text's pieces), flat, with offsets; the positions
    (in `conversations`) kept, and the skipped ones counted by reason."""
    if conversations and isinstance(conversations[0], str):
        return _encode_texts(template.tokenizer, conversations, state.max_length, name)
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    kept: list[int] = []
    skipped: Counter = Counter()
    bar = tqdm(
        conversations, desc=f"tokenize {name}", unit="conv", disable=len(conversations) < PROGRESS_FROM
    )
    for i, messages in enumerate(bar):
        encoded = encode(template, messages, state.loss_on, state.end_ids)
        if len(encoded.input_ids) > state.max_length:
            if on_long == "error":
                raise DanluError(
                    f"{name}: the conversation at {unit} {lines[i]} has {len(encoded.input_ids)} tokens, "
                    f"over data.max_length={state.max_length}",
                    "raise data.max_length, shorten it, or set data.on_long=skip",
                )
            skipped[TOO_LONG] += 1
            continue
        ids.append(np.asarray(encoded.input_ids, dtype=np.int32))
        labels.append(np.asarray(encoded.labels, dtype=np.int32))
        kept.append(i)
    return Encoded.of(ids, labels, kept, skipped)


def _encode_texts(tokenizer: Any, texts: list[str], max_length: int, name: str) -> Encoded:
    """Plain texts, tokenized in batches, each cut into pieces of at most max_length tokens
    (tokens.encode_texts); a text's pieces stay together, so a split never divides a text."""
    ids: list[np.ndarray] = []
    kept: list[int] = []
    pieces = [0]
    skipped: Counter = Counter()
    bar = tqdm(total=len(texts), desc=f"tokenize {name}", unit="text", disable=len(texts) < PROGRESS_FROM)
    for start in range(0, len(texts), TEXT_BATCH):
        for i, encoded in enumerate(encode_texts(tokenizer, texts[start : start + TEXT_BATCH], max_length)):
            if not encoded:
                skipped[ONE_TOKEN] += 1
                continue
            ids.extend(np.asarray(piece.input_ids, dtype=np.int32) for piece in encoded)
            kept.append(start + i)
            pieces.append(pieces[-1] + len(encoded))
        bar.update(min(TEXT_BATCH, len(texts) - start))
    bar.close()
    encoded = Encoded.of(ids, ids, kept, skipped)  # every token trained: the labels are the ids
    encoded.pieces = np.asarray(pieces, dtype=np.int64)
    return encoded


@dataclass
class Encoded:
    """Conversations rendered and tokenized: flat ids and labels with offsets, which conversations were
    kept (positions in the file's trainable conversations), and which were skipped, by reason. Texts
    may be cut into several rows (pieces): text k's rows are pieces[k]:pieces[k + 1]."""

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    kept: list[int]
    skipped: Counter
    pieces: np.ndarray | None = None  # None: one row per kept conversation

    @classmethod
    def of(
        cls, ids: list[np.ndarray], labels: list[np.ndarray], kept: list[int], skipped: Counter
    ) -> Encoded:
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in ids], out=offsets[1:])
        flat_ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        flat_labels = np.concatenate(labels) if labels else np.zeros(0, np.int32)
        return cls(flat_ids, flat_labels, offsets, kept, skipped)

    def part(
        self, rows: np.ndarray, pad_id: int, device: torch.device, pack_to: int | None = None
    ) -> ChatPart:
        """The part of kept conversations `rows` (positions in `kept`); with pack_to, packed into rows of
        at most that many tokens."""
        conversations = len(rows)
        if self.pieces is not None:  # a text's every piece
            rows = np.concatenate(
                [np.arange(self.pieces[r], self.pieces[r + 1]) for r in rows] or [np.zeros(0, np.int64)]
            )
        if pack_to is None:
            part = ChatPart(self.ids, self.labels, self.offsets, rows, pad_id, conversations=conversations)
        else:
            ids, labels, positions, segments, offsets = pack(
                self.ids, self.labels, self.offsets, rows, pack_to
            )
            packs = np.arange(len(offsets) - 1)
            part = ChatPart(ids, labels, offsets, packs, pad_id, positions, segments, conversations)
        part.texts = self.pieces is not None
        return part.to(device)


def encode_file(
    state: CausalLMState, template: Template, spec: str, on_long: str
) -> tuple[Conversations, Encoded]:
    found = read_conversations(Path(spec))
    encoded = encode_all(state, template, found.messages, found.lines, on_long, Path(spec).name, found.unit)
    encoded.skipped += found.skipped
    if encoded.skipped:
        rows = len(found.messages) + sum(found.skipped.values())
        left_out = sum(encoded.skipped.values())
        log.warning(
            "%s: %d of %d %s left out (%s)",
            spec,
            left_out,
            rows,
            kind(found.texts),
            _counted(encoded.skipped),
        )
    return found, encoded


def load(
    config: DataConfig,
    device: torch.device,
    state: CausalLMState | None = None,
    cache: Path | None = None,
    model: ModelConfig | None = None,
    train: TrainConfig | None = None,
) -> Dataset:
    """Conversations, split into parts. A new run fits its state from model.pretrained and the config;
    a resumed one (state given) renders with the state's own template."""
    if state is None:
        state = new_state(config, model or ModelConfig(), train or TrainConfig())
    else:  # resuming: the checkpoints may hold a LoRA adapter alone, over these very weights
        check_same_weights(state)
    template = Template.of_source(tokenizer_of(state), state.template, state.template_name)
    found, encoded = encode_file(state, template, config.train, config.on_long)
    if encoded.kept and distributed.world_from_env().main:
        first = encoded.part(np.arange(1), state.pad_id, torch.device("cpu"))
        shown = "a text's first piece" if found.texts else "a conversation"
        log.info("%s as trained (trained tokens between [[ ]]):\n%s", shown, _shown(state, first))
    if not encoded.kept:
        reasons = _counted(encoded.skipped) or "it is empty"
        raise DanluError(
            f"'{config.train}' holds no conversation to train on ({reasons})",
            "give rows with an assistant turn, within data.max_length tokens, or texts",
        )
    source = ConversationSource(config.train)
    train_rows, val_rows, test_rows = split_indices(len(encoded.kept), None, config)
    pack_to = state.max_length if config.packing else None

    def held(name: str, rows: np.ndarray, where: ConversationSource, of: tuple) -> HeldOut:
        conversations, kept = of[0].messages, of[1].kept
        indices = np.asarray([kept[r] for r in rows], dtype=np.int64)  # in the file's conversations
        return HeldOut(name, where, [conversations[i] for i in indices], indices)

    def own(name: str):
        rows = val_rows if name == "validation" else test_rows
        if not len(rows):
            return None, None
        return encoded.part(rows, state.pad_id, device, pack_to), held(name, rows, source, (found, encoded))

    def separate(name: str, spec: str):
        other = encode_file(state, template, spec, config.on_long)
        rows = np.arange(len(other[1].kept))
        part = other[1].part(rows, state.pad_id, device, pack_to)
        return part, held(name, rows, ConversationSource(spec), other)

    def sample(n: int) -> HeldOut:
        return held("none", train_rows[:n], source, (found, encoded))

    train_part = encoded.part(train_rows, state.pad_id, device, pack_to)
    train_part.skipped = encoded.skipped
    train_part.group_batches = GROUP_BATCHES if config.group_by_length else 1
    return assemble(config, state, train_part, source, own, separate, sample)


def _shown(state: CausalLMState, part: ChatPart) -> str:
    ids = part.ids[int(part.starts[0]) : int(part.starts[0] + part.lengths[0])].tolist()
    labels = part.labels[int(part.starts[0]) : int(part.starts[0] + part.lengths[0])].tolist()
    return show(tokenizer_of(state), TokenLabels(ids, labels))


def sample_text(config: Config) -> str:
    """The first trainable conversation of data.train as the model is trained on it, with its trained
    tokens between [[ ]] and how many there are."""
    state = new_state(config.data, config.model, config.train)
    template = Template.of_source(tokenizer_of(state), state.template, state.template_name)
    found, encoded = encode_file(state, template, config.data.train, config.data.on_long)
    if not encoded.kept:
        raise DanluError(
            f"'{config.data.train}' holds no conversation to train on", "give rows with an assistant turn"
        )
    first = encoded.part(np.arange(1), state.pad_id, torch.device("cpu"))
    how = (
        f"plain text, no chat template, every token trained ({first.n_rows} piece{'s' * (first.n_rows > 1)} "
        f"of up to data.max_length={state.max_length} tokens; the first shown)"
        if found.texts
        else f"chat template '{state.template_name}', train.loss_on={state.loss_on}"
    )
    return (
        f"{config.data.train} {found.unit} {found.lines[encoded.kept[0]]}, {how}: {int(first.target[0])} "
        f"trained tokens between [[ ]]\n{_shown(state, first)}"
    )


def _counted(skipped: Counter) -> str:
    return ", ".join(f"{n} with {reason}" for reason, n in skipped.most_common())


# --- items: conversations as the run directory stores them -------------------------------------------


def store_rows(items: list[Row]) -> bytes:
    rows = ({"text": m} if isinstance(m, str) else {"messages": m} for m in items)
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def read_stored(path: Path) -> Iterator[list[list[dict[str, str]]]]:
    yield read_conversations(path).messages


def nbytes(items: list) -> int:
    return sum(len(row) if isinstance(row, str) else sum(len(m["content"]) for m in row) for row in items)


def count(items: list) -> int:
    return len(items)


def select(source: ConversationSource, indices: np.ndarray, state: Any) -> list:
    messages = read_conversations(Path(source.name)).messages
    return [messages[i] for i in indices]


def reopen(spec: str, data: DataConfig, chunk_rows: int) -> ConversationSource:
    return ConversationSource(spec)


def read(spec: str, state: Any, chunk_rows: int = 0) -> Iterator[list]:
    yield read_conversations(Path(spec)).messages
