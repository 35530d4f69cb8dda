"""Conversations to fine-tune on: rows of a JSONL, JSON (an array, as alpaca_data.json, or one object per
line, as `datasets` writes .json) or Parquet file in any of the common shapes, each normalized to a list
of messages ({"role", "content"} with role system, user or assistant):

- OpenAI chat: {"messages": [{"role": ..., "content": ...}, ...]} (multi-turn; content a string or a list
  of text parts);
- ShareGPT: {"conversations": [{"from": ..., "value": ...}, ...]}, "from" one of human, gpt and system (or
  user and assistant), as ShareGPT-style datasets hold them; {"role", "content"} turns there are read too;
- prompt and completion: {"prompt": ..., "completion": ...}, each a string (a user turn, an assistant
  turn) or a list of messages; an optional "system" string;
- alpaca: {"instruction": ..., "input": ..., "output": ...} ("input" optional, appended to the
  instruction after a blank line, as the alpaca recipe does); an optional "system" string;
- plain text: {"text": ...} and none of the keys above (other keys, such as an id or a source, are
  ignored): a document to train on every token of, with no chat template (continued pre-training), kept
  as the string itself. A file holds texts or conversations, not both.

A row in none of these shapes, or with values of the wrong type, is the file's error and names its line.
A row that is well formed but cannot be trained on (a role other than the three, no assistant turn) is
skipped and counted by reason, for the report."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu.data.sources import PARQUET, parquet_shards
from danlu.errors import DanluError, not_utf8
from danlu.serve.chat.templates import ROLES, content_text

SHAPES = "messages, conversations, prompt/completion, instruction/output or text"
UNKNOWN_ROLE = "a role other than system, user and assistant"
NO_ASSISTANT = "no assistant turn"
EMPTY_TEXT = "an empty text"
CONVERSATION_KEYS = ("messages", "conversations", "prompt", "completion", "instruction", "output")
Row = list[dict[str, str]] | str  # a conversation's messages, or a plain text
# ShareGPT's speakers as roles; another (function_call, observation, tool) is kept, so its row is counted
# under UNKNOWN_ROLE as an OpenAI row with such a role is.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class Conversations:
    """The trainable conversations (or plain texts) of a file, in file order, with the 1-based line (JSON
    Lines), item (a JSON array) or row (Parquet) each came from, and how many rows were skipped, by
    reason."""

    messages: list[Row] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    unit: str = "line"  # what lines[i] counts: line, item or row
    texts: bool = False  # the rows are plain texts, not conversations


class RowError(ValueError):
    """A malformed row: what is wrong with it, for the caller to place in the file."""


def kind(texts: bool) -> str:
    """What a file's rows are, as reports and logs count them: texts or conversations."""
    return "texts" if texts else "conversations"


def row_unit(path: Path) -> str:
    """What a row's number counts in `path`: 'row' (Parquet), 'item' (a .json file holding an array) or
    'line' (JSON Lines, whether named .jsonl or .json).

    Raises:
        DanluError: the file is none of these.
    """
    suffix = path.suffix.lower()
    if suffix in PARQUET or path.is_dir():  # a file, or shards (a pattern or a folder of them)
        return "row"
    if suffix in (".jsonl", ".json"):
        return "item" if suffix == ".json" and _first_character(path) == "[" else "line"
    raise DanluError(
        f"'{path}' is not a conversation file",
        "use JSONL (one conversation per line), JSON (an array of conversations) or Parquet",
    )


def _first_character(path: Path) -> str:
    """The first character that is not white space (nor a byte-order mark), '' for none."""
    with path.open(encoding="utf-8-sig", errors="replace") as text:
        while chunk := text.read(4096):
            if stripped := chunk.lstrip():
                return stripped[0]
    return ""


def read_rows(path: Path, unit: str) -> Iterator[tuple[int, Any]]:
    """(line, item or row number from 1, the row as parsed) of a .jsonl, .json or .parquet file whose
    row_unit is `unit`. A byte-order mark before the first row (as Windows tools write UTF-8) is skipped."""
    try:
        if unit == "item":
            yield from enumerate(_json_array(path), 1)
        elif unit == "line":
            with path.open(encoding="utf-8-sig") as lines:
                for number, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as exc:
                        raise _not_json_lines(path, number, exc) from None
                    yield number, row
        else:
            yield from _parquet_rows(path)
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc, "save it as UTF-8") from None


def _json_array(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise DanluError(
            f"{path.name} is not a JSON array: {exc}", "write a JSON array of objects, or one object per line"
        ) from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    for shard in parquet_shards(path) or [path]:  # shards: rows numbered on across the files
        try:
            batches = pq.ParquetFile(shard).iter_batches(batch_size=4096)
        except (pa.ArrowException, OSError) as exc:
            raise DanluError(f"cannot read '{shard}' as Parquet: {exc}", "check the file") from None
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield number, row


def _not_json_lines(path: Path, number: int, exc: ValueError) -> DanluError:
    """A line that is not JSON; said as such when the whole file is one JSON object over several lines."""
    fix = "write one JSON object per line, or a JSON array of objects"
    try:
        whole = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        keys = ", ".join(sorted(map(str, whole))) or "none"
        return DanluError(
            f"{path.name} is one JSON object (its keys: {keys}), not a conversation per line", fix
        )
    return DanluError(f"{path.name} line {number} is not JSON: {exc}", fix)


def read_conversations(path: Path) -> Conversations:
    """Every row of the file normalized to messages (or a plain text). Raises DanluError naming the first
    malformed row, or the first row of the other kind in a file of texts or of conversations."""
    found = Conversations(unit=row_unit(path))
    unit = found.unit
    first: int | None = None
    for number, row in read_rows(path, unit):
        try:
            messages = to_row(row)
        except RowError as exc:
            raise DanluError(f"{path.name} {unit} {number}: {exc}", f"give each row {SHAPES}") from None
        if first is None:
            first, found.texts = number, isinstance(messages, str)
        elif isinstance(messages, str) != found.texts:
            kinds = ("a conversation", "texts") if found.texts else ("a text", "conversations")
            raise DanluError(
                f"{path.name} {unit} {number} is {kinds[0]}, and the rows before it are {kinds[1]}",
                "put texts and conversations in separate files: a run trains on one kind",
            )
        reason = untrainable(messages)
        if reason is not None:
            found.skipped[reason] += 1
            continue
        found.messages.append(messages)
        found.lines.append(number)
    return found


def to_row(row: Any, answered: bool = True) -> Row:
    """One row as messages, or as its text when it is a plain text ({"text"} without a conversation's
    keys). Raises RowError as to_messages does, or for a text that is not a string."""
    if isinstance(row, dict) and "text" in row and not any(key in row for key in CONVERSATION_KEYS):
        return _text(row["text"], "text")
    return to_messages(row, answered)


def to_messages(row: Any, answered: bool = True) -> list[dict[str, str]]:
    """One row as messages. answered=False (prompts to answer): completion and output may be left out.
    Raises RowError when the row has no known shape or a value of a wrong type."""
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, not {type(row).__name__}")
    system = _system(row)
    if "messages" in row:
        return [*system, *_message_list(row["messages"], "messages")]
    if "conversations" in row:
        return [*system, *_message_list(row["conversations"], "conversations")]
    if "prompt" in row or "completion" in row:
        if "prompt" not in row or (answered and "completion" not in row):
            raise RowError("a row with prompt needs completion too (and the other way round)")
        prompt = _turns(row["prompt"], "prompt", "user")
        if "completion" not in row:
            return [*system, *prompt]
        return [*system, *prompt, *_turns(row["completion"], "completion", "assistant")]
    if "instruction" in row or "output" in row:
        if "instruction" not in row or (answered and "output" not in row):
            raise RowError("an alpaca row needs both instruction and output")
        instruction = _text(row["instruction"], "instruction")
        extra = _text(row.get("input") or "", "input")
        question = [
            *system,
            {"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
        ]
        if "output" not in row:
            return question
        return [*question, {"role": "assistant", "content": _text(row["output"], "output")}]
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise RowError(f"no conversation in it (its keys: {keys})")


def read_prompts(path: Path) -> list[Row]:
    """Every row of a file as messages to answer (a trailing assistant turn, a reference answer, is
    dropped), or as a text to continue. A malformed row, a role other than the three or an empty text is
    an error naming its line."""
    prompts: list[Row] = []
    unit = row_unit(path)
    for number, row in read_rows(path, unit):
        try:
            messages = to_row(row, answered=False)
        except RowError as exc:
            raise DanluError(f"{path.name} {unit} {number}: {exc}", f"give each row {SHAPES}") from None
        if isinstance(messages, str):
            if not messages:
                raise DanluError(f"{path.name} {unit} {number}: {EMPTY_TEXT}", "give a text to continue")
            prompts.append(messages)
            continue
        if untrainable(messages) == UNKNOWN_ROLE:
            raise DanluError(f"{path.name} {unit} {number}: {UNKNOWN_ROLE}", "use system, user and assistant")
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise DanluError(f"{path.name} {unit} {number}: nothing to answer", "give a user message")
        prompts.append(messages)
    return prompts


def untrainable(messages: Row) -> str | None:
    """Why a well-formed conversation (or text) cannot be trained on, or None."""
    if isinstance(messages, str):
        return None if messages else EMPTY_TEXT
    if any(m["role"] not in ROLES for m in messages):
        return UNKNOWN_ROLE
    if not any(m["role"] == "assistant" for m in messages):
        return NO_ASSISTANT
    return None


def _system(row: dict) -> list[dict[str, str]]:
    if row.get("system") in (None, ""):
        return []
    return [{"role": "system", "content": _text(row["system"], "system")}]


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{where} must be a string, not {type(value).__name__}")
    return value


def _turns(value: Any, where: str, role: str) -> list[dict[str, str]]:
    """A prompt or completion: a string (one turn of `role`) or a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _message_list(value, where)


def _message_list(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RowError(f"{where} must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(value):
        if isinstance(message, dict) and "from" in message and "role" not in message:
            message = _sharegpt_turn(message, f"{where}[{i}]")
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RowError(f'{where}[{i}] must be an object with a "role" and a "content"')
        try:
            content = content_text(message.get("content", ""), f"{where}[{i}]")
        except DanluError as exc:
            raise RowError(exc.message) from None
        messages.append({"role": message["role"], "content": content})
    return messages


def _sharegpt_turn(turn: dict, where: str) -> dict[str, Any]:
    """A ShareGPT turn ({"from", "value"}) as a message."""
    speaker = turn["from"]
    if not isinstance(speaker, str):
        raise RowError(f'{where}["from"] must be a string, not {type(speaker).__name__}')
    return {"role": SHAREGPT_ROLES.get(speaker.lower(), speaker), "content": turn.get("value", "")}
