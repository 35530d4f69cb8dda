"""Conversation files for fine-tuning: every common row shape normalized to messages, malformed rows named
by their line, untrainable rows counted by reason, JSONL, JSON and Parquet alike."""

import json

import pandas as pd
import pytest

from danlu.errors import DanluError
from danlu.families.causal_lm.conversations import (
    EMPTY_TEXT,
    NO_ASSISTANT,
    UNKNOWN_ROLE,
    RowError,
    read_conversations,
    read_prompts,
    to_messages,
    to_row,
)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"messages": [user("hi"), assistant("hello")]}, [user("hi"), assistant("hello")]),
        (
            {"messages": [user([{"type": "text", "text": "h"}, {"type": "text", "text": "i"}])]},
            [user("hi")],
        ),
        ({"prompt": "2+2?", "completion": "4"}, [user("2+2?"), assistant("4")]),
        (
            {"prompt": [user("a"), assistant("b"), user("c")], "completion": [assistant("d")]},
            [user("a"), assistant("b"), user("c"), assistant("d")],
        ),
        ({"instruction": "Add.", "input": "2 2", "output": "4"}, [user("Add.\n\n2 2"), assistant("4")]),
        ({"instruction": "Say hi.", "input": "", "output": "hi"}, [user("Say hi."), assistant("hi")]),
        (
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "2+2?"},
                    {"from": "gpt", "value": "4"},
                    {"from": "Human", "value": "and 3+3?"},
                    {"role": "assistant", "content": "6"},  # some ShareGPT-style sets mix in OpenAI's keys
                ]
            },
            [
                {"role": "system", "content": "Be brief."},
                user("2+2?"),
                assistant("4"),
                user("and 3+3?"),
                assistant("6"),
            ],
        ),
        (
            {"system": "Be brief.", "prompt": "2+2?", "completion": "4"},
            [{"role": "system", "content": "Be brief."}, user("2+2?"), assistant("4")],
        ),
    ],
)
def test_every_shape_becomes_messages(row, expected):
    assert to_messages(row) == expected


def test_a_file_keeps_its_trainable_rows_and_counts_the_rest(tmp_path):
    rows = [
        {"messages": [user("hi"), assistant("hello")]},
        {"messages": [user("hi")]},  # nothing to learn from
        {"messages": [user("hi"), {"role": "tool", "content": "{}"}, assistant("ok")]},
        {"prompt": "2+2?", "completion": "4"},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "observation", "value": "{}"}]},
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a blank line at the end is fine
    found = read_conversations(path)
    assert found.messages == [[user("hi"), assistant("hello")], [user("2+2?"), assistant("4")]]
    assert found.lines == [1, 4]
    assert dict(found.skipped) == {NO_ASSISTANT: 1, UNKNOWN_ROLE: 2}
    parquet = tmp_path / "chats.parquet"
    pd.DataFrame({"messages": [r["messages"] for r in rows[:3]]}).to_parquet(parquet)
    assert read_conversations(parquet).messages == [[user("hi"), assistant("hello")]]


def test_plain_texts_are_kept_as_strings_and_a_file_holds_one_kind(tmp_path):
    assert to_row({"text": "Once upon a time", "id": 7, "source": "wiki"}) == "Once upon a time"
    assert to_row({"text": "not this", "prompt": "2+2?", "completion": "4"}) == [user("2+2?"), assistant("4")]
    with pytest.raises(RowError, match="text must be a string, not list"):
        to_row({"text": ["a", "b"]})
    path = tmp_path / "texts.jsonl"
    rows = [{"text": "first"}, {"text": ""}, {"text": "third", "meta": {"n": 3}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = read_conversations(path)
    assert found.texts and found.messages == ["first", "third"] and found.lines == [1, 3]
    assert dict(found.skipped) == {EMPTY_TEXT: 1}
    with pytest.raises(DanluError, match="line 2: an empty text"):
        read_prompts(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], rows[2]]))
    assert read_prompts(path) == ["first", "third"]

    path.write_text(
        json.dumps({"text": "a text"}) + "\n" + json.dumps({"prompt": "q", "completion": "a"}) + "\n"
    )
    with pytest.raises(DanluError, match="line 2 is a conversation, and the rows before it are texts"):
        read_conversations(path)
    path.write_text(
        json.dumps({"prompt": "q", "completion": "a"}) + "\n" + json.dumps({"text": "a text"}) + "\n"
    )
    with pytest.raises(DanluError, match="line 2 is a text, and the rows before it are conversations"):
        read_conversations(path)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("[1, 2]", "line 2: a row must be a JSON object, not list"),
        ('{"prompt": "no completion"}', "line 2: a row with prompt needs completion"),
        ('{"messages": []}', "line 2: messages must be a non-empty list"),
        (
            '{"messages": [{"content": "no role"}]}',
            r"line 2: messages\[0\] must be an object with a \"role\"",
        ),
        ('{"instruction": 3, "output": "x"}', "line 2: instruction must be a string, not int"),
        (
            '{"conversations": [{"from": 1, "value": "x"}]}',
            r"line 2: conversations\[0\]\[\"from\"\] must be a string",
        ),
        ('{"body": "just text"}', r"line 2: no conversation in it \(its keys: body\)"),
        ("{not json", "line 2 is not JSON"),
    ],
)
def test_a_malformed_row_is_one_line_naming_it(tmp_path, line, match):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"prompt": "fine", "completion": "row"}) + "\n" + line + "\n")
    with pytest.raises(DanluError, match=match):
        read_conversations(path)


def test_prompts_to_answer_take_every_shape_without_an_answer(tmp_path):
    rows = [
        {"prompt": "2+2?"},
        {"instruction": "Add.", "input": "2 2"},
        {"messages": [user("hi"), assistant("hello"), user("and?"), assistant("a reference")]},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_prompts(path) == [
        [user("2+2?")],
        [user("Add.\n\n2 2")],
        [user("hi"), assistant("hello"), user("and?")],
    ]
    path.write_text(json.dumps({"messages": [assistant("only an answer")]}) + "\n")
    with pytest.raises(DanluError, match="line 1: nothing to answer"):
        read_prompts(path)
    with pytest.raises(RowError, match="an alpaca row needs both"):
        to_messages({"instruction": "x"})  # training still needs the answer


ROWS = [
    {"instruction": "Add.", "input": "2 2", "output": "4"},
    {"prompt": "hi"},  # no completion: a malformed row, named by where it is
]


FORMATS = {
    # alpaca_data.json's shape: one JSON array, pretty-printed
    "alpaca.json": (lambda rows: json.dumps(rows, indent=2), "utf-8", "item"),
    # `datasets` writes .json as JSON Lines
    "lines.json": (lambda rows: "\n".join(json.dumps(r) for r in rows), "utf-8", "line"),
    # Windows tools write UTF-8 with a byte-order mark, and CRLF line ends
    "marked.jsonl": (lambda rows: "\r\n".join(json.dumps(r) for r in rows), "utf-8-sig", "line"),
    "marked.json": (lambda rows: "\n  " + json.dumps(rows), "utf-8-sig", "item"),
}


@pytest.mark.parametrize("name", FORMATS)
def test_json_arrays_json_lines_and_a_byte_order_mark_are_read(tmp_path, name):
    write, encoding, unit = FORMATS[name]
    path = tmp_path / name
    path.write_text(write(ROWS), encoding=encoding, newline="")
    assert read_prompts(path) == [[user("Add.\n\n2 2")], [user("hi")]]
    with pytest.raises(DanluError, match=f"{name} {unit} 2: a row with prompt needs completion"):
        read_conversations(path)
    path.write_text(write(ROWS[:1]), encoding=encoding, newline="")
    found = read_conversations(path)
    assert found.messages == [[user("Add.\n\n2 2"), assistant("4")]] and found.lines == [1]
    assert found.unit == unit


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            json.dumps({"data": ROWS}, indent=2),
            r"is one JSON object \(its keys: data\), not a conversation per",
        ),
        (json.dumps(ROWS)[:-3], "is not a JSON array: "),
        ('{"prompt": "a", "completion": "b"}\n{oops', "line 2 is not JSON"),
    ],
)
def test_a_json_file_that_is_neither_is_one_line_saying_so(tmp_path, text, match):
    path = tmp_path / "chats.json"
    path.write_text(text)
    with pytest.raises(DanluError, match=match):
        read_conversations(path)


@pytest.mark.parametrize("name", ["chats.jsonl", "chats.json", "chats.parquet"])
def test_a_conversation_file_not_utf8_or_cut_short_is_one_line(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".parquet"):
        pd.DataFrame({"prompt": ["hi"], "completion": ["ho"]}).to_parquet(path)
        path.write_bytes(path.read_bytes()[:100])
        expected = "cannot read '.*chats.parquet' as Parquet: "
    else:
        row = json.dumps({"prompt": "Grüß Gott", "completion": "ja"}, ensure_ascii=False)
        path.write_bytes((f"[{row}]" if name.endswith(".json") else row + "\n").encode("cp1252"))
        expected = r"is not UTF-8 text \(it holds byte 0xfc, as Latin-1 and Windows-1252 files do\)"
    with pytest.raises(DanluError, match=expected):
        read_conversations(path)
    with pytest.raises(DanluError, match=expected):
        read_prompts(path)


def test_parquet_shards_of_conversations_are_read_in_order(tmp_path):
    from danlu.families.image.sources import looks_like_images

    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    pd.DataFrame(rows[:2]).to_parquet(folder / "train_sft-00000-of-00002.parquet")
    pd.DataFrame(rows[2:]).to_parquet(folder / "train_sft-00001-of-00002.parquet")
    for spec in (folder, folder / "train_sft-*.parquet"):
        found = read_conversations(spec)
        assert found.unit == "row" and found.lines == [1, 2, 3, 4, 5]
        assert found.messages == [[user(f"q{i}"), assistant(f"a{i}")] for i in range(5)]
    assert not looks_like_images(str(folder))  # a folder of Parquet shards is a table, not images
