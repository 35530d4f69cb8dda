"""The data files a config names are checked from their first rows before torch loads (the columns the
config names, and that data rows follow the header), with the same one line the data load gives after
reading the whole file; what the check cannot read or does not cover is left to the data load."""

import subprocess
import sys

import pandas as pd
import pytest

from danlu.config import DataConfig
from danlu.data.columns import check_data_files, header
from danlu.errors import DanluError
from danlu.families.tabular.schema import infer_schema

FRAME = pd.DataFrame({"price": [1.0, 2.5], "color": ["red", "blue"], "label": ["a", "b"]})


def refusal(data: DataConfig) -> str | None:
    try:
        check_data_files(data)
    except DanluError as error:
        return str(error)
    return None


@pytest.mark.parametrize(
    "named",
    [
        {"target": "lable"},
        {"target": "label", "features": ["price", "colour"]},
        {"target": "label", "features": ["prise", "colour"]},
        {"target": "weight"},  # nothing close: the columns alone
    ],
)
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_mistyped_column_is_the_tabular_familys_own_line(tmp_path, named, suffix):
    path = tmp_path / f"data{suffix}"
    FRAME.to_csv(path, index=False) if suffix == ".csv" else FRAME.to_parquet(path, index=False)
    data = DataConfig(train=str(path), **named)
    line = refusal(data)
    assert line is not None and "not in the data" in line
    with pytest.raises(DanluError) as after_loading:
        infer_schema(FRAME, data)  # what the data load says with the whole frame at hand
    assert line == str(after_loading.value)


def test_columns_that_are_there_pass_as_pandas_reads_the_header(tmp_path):
    plain = tmp_path / "plain.csv"
    FRAME.to_csv(plain, index=False)
    assert refusal(DataConfig(train=str(plain), target="label", features=["price", "color"])) is None
    # a byte-order mark before the first name, as spreadsheet programs write it
    marked = tmp_path / "marked.csv"
    marked.write_bytes(b"\xef\xbb\xbfprice,label\n1,a\n")
    assert header(marked) == ["price", "label"]
    assert refusal(DataConfig(train=str(marked), target="price")) is None
    # quoted names with commas
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('"size, cm",label\n1,x\n')
    assert refusal(DataConfig(train=str(quoted), target="label", features=["size, cm"])) is None


def test_text_and_image_columns_are_checked_and_conversations_have_no_target(tmp_path):
    texts = tmp_path / "texts.csv"
    pd.DataFrame({"review": ["good"], "label": [1]}).to_csv(texts, index=False)
    line = refusal(DataConfig(train=str(texts), text="revew", target="label"))
    expected = "text column 'revew' not in the data (fix: did you mean 'review'? available columns: "
    assert line == expected + "review, label)"
    assert "image column 'path'" in refusal(DataConfig(train=str(texts), image="path", target="label"))
    chats = tmp_path / "chats.parquet"
    pd.DataFrame({"messages": [[{"role": "user", "content": "hi"}]]}).to_parquet(chats)
    assert refusal(DataConfig(train=str(chats), family="causal_lm", target="label")) is None


def test_sources_without_a_readable_header_are_left_to_the_data_load(tmp_path):
    broken = tmp_path / "broken.csv"
    broken.write_bytes(b"\xff\xfe\x00label\n")  # not UTF-8: the data load names the parse error
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_text("not parquet")
    lines = tmp_path / "rows.jsonl"
    lines.write_text('{"x": 1, "label": "a"}\n')
    folder = tmp_path / "images"
    folder.mkdir()
    for path in (broken, bad_parquet, lines, folder):
        assert header(path) is None, path
        assert refusal(DataConfig(train=str(path), target="nowhere")) is None, path
    assert refusal(DataConfig(train="synthetic:classification", target="nowhere")) is None


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_file_without_data_rows_is_the_data_loads_own_line(tmp_path, suffix):
    from danlu.data.sources import open_table
    from danlu.families.tabular.data import _check_not_empty

    headed = tmp_path / f"headed{suffix}"
    write = FRAME.iloc[:0].to_csv if suffix == ".csv" else FRAME.iloc[:0].to_parquet
    write(headed, index=False)
    line = refusal(DataConfig(train=str(headed), target="label"))
    with pytest.raises(DanluError) as after_loading:
        _check_not_empty(open_table(str(headed)).read_all(), str(headed))
    assert line == str(after_loading.value) and "has no data rows" in line
    # the columns are checked first: a mistyped name is the mistake to fix
    assert "'lable' not in the data" in refusal(DataConfig(train=str(headed), target="lable"))
    assert refusal(DataConfig(train=str(headed))) == line  # nothing named: the rows are still checked


@pytest.mark.parametrize("content", ["", "\n\n", "  \n"])
def test_an_empty_csv_is_the_data_loads_own_line(tmp_path, content):
    from danlu.data.sources import open_table

    empty = tmp_path / "empty.csv"
    empty.write_text(content)
    line = refusal(DataConfig(train=str(empty), target="label"))
    with pytest.raises(DanluError) as after_loading:
        open_table(str(empty))
    assert line == str(after_loading.value) and "is empty" in line


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_repeated_column_name_is_the_data_loads_own_line(tmp_path, suffix):
    """pandas would rename the second 'a' to 'a.1'; the data load refuses the file, and so does the check,
    whatever the config names (a name it looks for is there, and one it misses is the lesser mistake)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from danlu.data.sources import open_table

    repeated = tmp_path / f"repeated{suffix}"
    if suffix == ".csv":
        repeated.write_text("a,b,a,label\n1,2,3,x\n")
    else:
        arrays = [pa.array([value]) for value in (1, 2, 3)] + [pa.array(["x"])]
        pq.write_table(pa.Table.from_arrays(arrays, names=["a", "b", "a", "label"]), repeated)
    with pytest.raises(DanluError) as after_loading:
        open_table(str(repeated))
    expected = str(after_loading.value)
    assert "two columns named 'a' (columns 1 and 3)" in expected
    for named in ({"target": "label"}, {"target": "label", "features": ["a", "a.1"]}, {"target": "lable"}):
        assert refusal(DataConfig(train=str(repeated), **named)) == expected
    # columns of no name are pandas' 'Unnamed: N', each its own: not repeats
    unnamed = tmp_path / "unnamed.csv"
    unnamed.write_text(",,label\n1,2,x\n")
    assert refusal(DataConfig(train=str(unnamed), target="label")) is None


def test_blank_lines_after_the_header_are_not_rows_and_rows_after_them_are(tmp_path):
    blank = tmp_path / "blank.csv"
    blank.write_text("price,label\n\n\n")
    assert "has no data rows" in refusal(DataConfig(train=str(blank), target="label"))
    late = tmp_path / "late.csv"
    late.write_text("price,label\n\n\n1,a\n")
    assert refusal(DataConfig(train=str(late), target="label")) is None


def test_validation_and_test_files_are_checked_and_named(tmp_path):
    train = tmp_path / "train.csv"
    FRAME.to_csv(train, index=False)
    renamed = tmp_path / "renamed.csv"
    FRAME.rename(columns={"label": "class"}).to_csv(renamed, index=False)
    headed = tmp_path / "headed.parquet"
    FRAME.iloc[:0].to_parquet(headed, index=False)
    line = refusal(DataConfig(train=str(train), validation=str(renamed), target="label"))
    expected = f"target column 'label' not in data.validation '{renamed}' (fix: available columns: "
    assert line == expected + "price, color, class)"
    line = refusal(DataConfig(train=str(train), test=str(renamed), target="label", features=["price"]))
    assert line is not None and line.startswith(f"target column 'label' not in data.test '{renamed}'")
    assert refusal(DataConfig(train=str(train), test=str(headed), target="label")) == (
        f"'{headed}' has no data rows (fix: pass a file with at least a few rows)"
    )
    assert (
        refusal(DataConfig(train=str(train), validation=str(train), test=str(train), target="label")) is None
    )


def test_the_check_imports_neither_torch_nor_pandas_when_the_columns_are_there(tmp_path):
    path = tmp_path / "data.csv"
    FRAME.to_csv(path, index=False)
    code = (
        "import sys; from danlu.config import DataConfig, check_data\n"
        f"check_data(DataConfig(train={str(path)!r}, target='label', features=['price']))\n"
        "print('torch' in sys.modules, 'pandas' in sys.modules)"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert ran.stdout.split() == ["False", "False"], ran.stderr
