"""Text files users write by hand read the same when a Windows tool saved them: UTF-8 with a byte-order
mark and CRLF line ends. Read as plain UTF-8, the mark would begin the first value: an API key that never
matches, a template that puts U+FEFF before every prompt, a label or a text embedded with it. A file
in another code page (Windows-1252) is one line naming it."""

import argparse

import pytest

from danlu.cli.serve import api_key
from danlu.embeddings.files import parse_labels, read_items
from danlu.serve.chat.templates import Template
from tests.chat_models import tiny_tokenizer

MARK = "\ufeff"


def windows(path, lines: list[str]):
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8-sig", newline="")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    return path


def test_an_api_key_file_saved_with_a_byte_order_mark(tmp_path, monkeypatch):
    monkeypatch.delenv("DANLU_API_KEY", raising=False)
    key_file = windows(tmp_path / "key", ["s3cret"])
    args = argparse.Namespace(api_key=None, api_key_file=str(key_file))
    assert api_key(args) == "s3cret"


def test_a_labels_file_and_a_text_file_saved_with_a_byte_order_mark(tmp_path):
    assert parse_labels(None, windows(tmp_path / "labels.txt", ["cat", "dog"])) == ["cat", "dog"]
    items = read_items(windows(tmp_path / "texts.txt", ["first text", "second"]))
    assert items.values == ["first text", "second"]


def test_a_template_file_saved_with_a_byte_order_mark_renders_as_without(tmp_path):
    tokenizer = tiny_tokenizer()
    source = [
        "{% for m in messages %}<|im_start|>{{ m.role }}",
        "{{ m.content }}<|im_end|>",
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant",
        "{% endif %}",
    ]
    plain = tmp_path / "plain.jinja"
    plain.write_text("\r\n".join(source) + "\r\n", newline="")
    messages = [{"role": "user", "content": "hi"}]
    expected = Template(tokenizer, str(plain)).render(messages)
    marked = Template(tokenizer, str(windows(tmp_path / "marked.jinja", source))).render(messages)
    assert marked == expected and not marked.startswith(MARK)


@pytest.mark.parametrize("name", ["key", "labels.txt"])
def test_a_mark_inside_a_value_is_kept(tmp_path, name):
    """Only a mark at the very start of the file is one; U+FEFF elsewhere is the value's own."""
    path = tmp_path / name
    path.write_text(f"a{MARK}b\n", encoding="utf-8")
    if name == "key":
        assert api_key(argparse.Namespace(api_key=None, api_key_file=str(path))) == f"a{MARK}b"
    else:
        assert parse_labels(None, path) == [f"a{MARK}b"]


@pytest.mark.parametrize("kind", ["texts", "template", "config"])
def test_a_text_file_in_another_code_page_is_one_line_naming_it(tmp_path, kind):
    """Saved as Windows-1252 (an old editor's or a spreadsheet's default): one line with the fix, not a
    UnicodeDecodeError traceback."""
    from danlu.config import load_config
    from danlu.errors import DanluError

    path = tmp_path / {"texts": "t.txt", "template": "t.jinja", "config": "c.yaml"}[kind]
    path.write_bytes("data:\n  train: Straße.csv\n".encode("cp1252"))
    read = {
        "texts": lambda: read_items(path),
        "template": lambda: Template(tiny_tokenizer(), str(path)),
        "config": lambda: load_config(path),
    }[kind]
    with pytest.raises(DanluError) as error:
        read()
    assert str(error.value).startswith(f"'{path}' is not UTF-8 text (it holds byte 0xdf, as Latin-1")
