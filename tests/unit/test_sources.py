import numpy as np
import pandas as pd
import pytest
import torch

from danlu.data.batches import Batch, TensorPart, shuffle_generator, split_mask
from danlu.data.sources import NpyTable, ParquetTable, file_fingerprint, open_table, stream_frames
from danlu.errors import DanluError
from tests.conftest import regression_frame


def test_each_format_reads_the_same_frame(tmp_path):
    frame = regression_frame(100)
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet", index=False)
    np.savez(tmp_path / "d.npz", X=frame[["a", "b", "c"]].to_numpy(), price=frame["price"].to_numpy())
    np.save(tmp_path / "d.npy", frame.to_numpy())
    frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    # a byte-order mark, as Windows tools write UTF-8, is no part of the first column's name
    marked = tmp_path / "marked.jsonl"
    marked.write_text((tmp_path / "d.jsonl").read_text(), encoding="utf-8-sig")
    for name in ("d.csv", "d.parquet", "d.jsonl", "marked.jsonl"):
        pd.testing.assert_frame_equal(open_table(str(tmp_path / name)).read_all(), frame)
    (tmp_path / "latin.jsonl").write_bytes('{"city": "Köln"}\n'.encode("latin-1"))
    with pytest.raises(DanluError, match=r"latin.jsonl' is not UTF-8 text \(it holds byte 0xf6"):
        open_table(str(tmp_path / "latin.jsonl"))
    npz = open_table(str(tmp_path / "d.npz")).read_all()
    assert list(npz.columns) == ["x0", "x1", "x2", "price"]
    assert np.allclose(npz.to_numpy(), frame.to_numpy())
    npy = open_table(str(tmp_path / "d.npy"))
    assert isinstance(npy, NpyTable) and npy.columns == ["x0", "x1", "x2", "x3"]
    assert np.allclose(npy.read_all().to_numpy(), frame.to_numpy())


def test_npy_chunks_cover_the_file_in_order(tmp_path):
    array = np.arange(10_000 * 3, dtype=np.float32).reshape(10_000, 3)
    np.save(tmp_path / "big.npy", array)
    table = NpyTable(tmp_path / "big.npy", chunk_rows=1024)
    assert table.n_chunks == 10 and table.nbytes == array.nbytes
    chunks = [table.read_chunk(i) for i in range(table.n_chunks)]
    assert np.array_equal(pd.concat(chunks).to_numpy(), array)
    assert chunks[3].index[0] == 3 * 1024  # row numbers in errors refer to the file


def test_parquet_chunks_are_row_groups(tmp_path):
    frame = regression_frame(1000)
    frame.to_parquet(tmp_path / "d.parquet", row_group_size=300, index=False)
    table = ParquetTable(tmp_path / "d.parquet")
    assert table.n_chunks == 4
    pd.testing.assert_frame_equal(pd.concat(table.read_chunk(i) for i in range(4)), frame)


def test_stream_frames_csv_in_chunks(tmp_path):
    frame = regression_frame(250)
    frame.to_csv(tmp_path / "d.csv", index=False)
    chunks = list(stream_frames(str(tmp_path / "d.csv"), chunk_rows=100))
    assert [len(c) for c in chunks] == [100, 100, 50]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.csv", None, "not found"),
        ("d.txt", "a,b\n", "unsupported type"),
        ("e.csv", "", "is empty"),
    ],
)
def test_bad_files(tmp_path, name, content, expected):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DanluError, match=expected):
        open_table(str(tmp_path / name))


@pytest.mark.parametrize(
    "header",
    ["a,b,a", '"a","b","a"', "\ufeffa,b,a", "\n\na,b,a"],  # quoted, after a BOM, after blank lines
)
def test_a_csv_with_two_columns_of_one_name_is_refused_whole_or_streamed(tmp_path, header):
    """pandas renames a repeated column ('a' to 'a.1'): a model would train on, or be given, a column
    nobody named. Both ways a CSV is read refuse it, naming the two columns."""
    path = tmp_path / "d.csv"
    path.write_text(header + "\n1,2,3\n", encoding="utf-8")
    expected = "two columns named 'a' \\(columns 1 and 3\\)"
    with pytest.raises(DanluError, match=expected):
        open_table(str(path))
    with pytest.raises(DanluError, match=expected):
        list(stream_frames(str(path)))


@pytest.mark.parametrize(("separator", "called"), [(";", "';'"), ("\t", "tabs"), ("|", "'|'")])
def test_a_csv_separated_otherwise_is_named_not_a_missing_column(tmp_path, separator, called):
    """A file separated by semicolons (a European spreadsheet's CSV), tabs or bars reads as one column
    holding the whole header: said so, whole or streamed, not that every column is missing."""
    path = tmp_path / "d.csv"
    path.write_text(separator.join(["x", "y", "label"]) + "\n" + separator.join(["1,5", "2", "a"]) + "\n")
    expected = f"'{path}' is separated by {called}, not commas"
    with pytest.raises(DanluError, match=expected):
        open_table(str(path))
    with pytest.raises(DanluError, match=expected):
        list(stream_frames(str(path)))


def test_a_csv_of_one_column_is_read(tmp_path):
    """One column whose values hold semicolons, as texts do: only the header is looked at."""
    path = tmp_path / "d.csv"
    path.write_text('text\n"a; b"\nc|d\n')
    assert open_table(str(path)).read_all()["text"].tolist() == ["a; b", "c|d"]


def test_unnamed_columns_and_names_pandas_would_rename_are_not_repeats(tmp_path):
    """Empty header cells (pandas names each 'Unnamed: N'), and 'a' beside 'a.1' as written, are read."""
    path = tmp_path / "d.csv"
    path.write_text(",,a,a.1\n1,2,3,4\n")
    assert list(open_table(str(path)).read_all().columns) == ["Unnamed: 0", "Unnamed: 1", "a", "a.1"]


def test_a_parquet_file_with_two_columns_of_one_name_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_arrays([pa.array([1]), pa.array([2])], names=["x", "x"])
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(DanluError, match="two columns named 'x' \\(columns 1 and 2\\)"):
        open_table(str(tmp_path / "d.parquet"))


def test_split_mask_is_deterministic_and_proportional():
    a = split_mask(0, 3, 100_000, 0.1, 0.2)
    assert np.array_equal(a, split_mask(0, 3, 100_000, 0.1, 0.2))
    assert not np.array_equal(a, split_mask(0, 4, 100_000, 0.1, 0.2))
    shares = np.bincount(a) / len(a)
    assert np.allclose(shares, [0.7, 0.1, 0.2], atol=0.01)


def test_tensor_part_batches_cover_every_row_once_in_seeded_order():
    x = torch.arange(1000, dtype=torch.float32)[:, None]
    part = TensorPart(Batch({"x": x}, torch.arange(1000)))
    batches = list(part.batches(64, shuffle_generator(0, 1)))
    assert all(torch.equal(b.inputs["x"][:, 0].long(), b.target) for b in batches)  # rows stay whole
    first = torch.cat([b.target for b in batches])
    assert sorted(first.tolist()) == list(range(1000)) and first.tolist() != list(range(1000))
    again = torch.cat([b.target for b in part.batches(64, shuffle_generator(0, 1))])
    other_epoch = torch.cat([b.target for b in part.batches(64, shuffle_generator(0, 2))])
    assert torch.equal(first, again) and not torch.equal(first, other_epoch)
    assert torch.equal(torch.cat([b.target for b in part.batches(64)]), torch.arange(1000))


def test_a_large_split_gathers_each_batch_and_gives_the_same_batches(monkeypatch):
    from danlu.data import batches as module

    images = torch.randint(0, 255, (301, 1, 4, 4), dtype=torch.uint8)
    part = TensorPart(Batch({"images": images}, torch.arange(301)))
    whole = list(part.batches(32, shuffle_generator(5, 1)))
    monkeypatch.setattr(module, "EPOCH_GATHER_BYTES", 0)  # every split "large"
    gathered = list(part.batches(32, shuffle_generator(5, 1)))
    assert [b.rows for b in whole] == [b.rows for b in gathered] and len(whole) == 10
    for a, b in zip(whole, gathered, strict=True):
        assert torch.equal(a.inputs["images"], b.inputs["images"]) and torch.equal(a.target, b.target)


def test_numpy_files_that_are_not_what_their_names_say_are_one_line(tmp_path):
    """A pickled member (danlu never unpickles), an NPZ or NPY file cut short, an empty one: each is one
    line naming the file, for tables and for images (and family detection just says 'not images')."""
    from danlu.families.image.sources import looks_like_images, open_source

    np.savez(tmp_path / "objects.npz", X=np.array([{"a": 1}] * 4, dtype=object), label=np.arange(4))
    np.savez(tmp_path / "whole.npz", images=np.zeros((4, 8, 8), np.uint8), label=np.arange(4))
    np.save(tmp_path / "whole.npy", np.zeros((4, 3)))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "whole.npz").read_bytes()[:300])
    (tmp_path / "cut.npy").write_bytes((tmp_path / "whole.npy").read_bytes()[:100])
    (tmp_path / "empty.npz").write_bytes(b"")
    for name, expected in [
        ("objects.npz", "cannot read member 'X' of '.*objects.npz': Object arrays cannot be loaded"),
        ("cut.npz", "cannot read '.*cut.npz' as NPZ: "),
        ("empty.npz", "cannot read '.*empty.npz' as NPZ: "),
        ("cut.npy", "cannot read '.*cut.npy' as NPY: "),
    ]:
        with pytest.raises(DanluError, match=expected):
            open_table(str(tmp_path / name))
    with pytest.raises(DanluError, match=r"cannot read '.*cut\.npz' as NPZ: "):
        open_source(str(tmp_path / "cut.npz"))
    assert looks_like_images(str(tmp_path / "whole.npz"))
    assert not looks_like_images(str(tmp_path / "cut.npz")) and not looks_like_images(
        str(tmp_path / "empty.npz")
    )


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        # a spreadsheet's CSV in Windows-1252: 'München' is not UTF-8
        (
            "M\xfcnchen,3\n".encode("cp1252"),
            r"is not UTF-8 text \(it holds byte 0xfc, .*\(fix: save it as UTF-8",
        ),
        (b"1,2,3\n", "cannot parse '.*' as CSV: Error tokenizing data"),  # a row of three fields in two
    ],
)
def test_a_csv_problem_past_the_first_chunk_is_the_same_one_line(tmp_path, tail, expected):
    path = tmp_path / "d.csv"
    path.write_bytes(b"city,n\n" + b"Paris,1\n" * 3000 + tail)
    with pytest.raises(DanluError, match=expected):
        open_table(str(path))
    with pytest.raises(DanluError, match=expected):
        list(stream_frames(str(path), chunk_rows=1000))  # danlu predict's way: found in a later chunk


def test_parquet_shards_are_one_table_by_pattern_or_folder(tmp_path):
    frame = pd.DataFrame({"x": np.arange(10.0), "label": list("ab") * 5})
    folder = tmp_path / "data"
    folder.mkdir()
    for i, rows in enumerate((slice(0, 4), slice(4, 10))):
        frame.iloc[rows].to_parquet(folder / f"train-0000{i}-of-00002.parquet", row_group_size=3)
    for spec in (folder, folder / "train-*.parquet"):
        table = open_table(str(spec))
        assert table.n_rows == 10 and table.n_chunks == 4 and table.columns == ["x", "label"]
        pd.testing.assert_frame_equal(pd.concat([table.read_chunk(i) for i in range(4)]), frame)
        pd.testing.assert_frame_equal(table.read_all(), frame)
        assert [f["name"] for f in table.fingerprint()["files"]] == [
            "train-00000-of-00002.parquet",
            "train-00001-of-00002.parquet",
        ]
        assert pd.concat(stream_frames(str(spec))).reset_index(drop=True).equals(frame)
    before = file_fingerprint(folder)
    frame.iloc[:4].assign(x=-1.0).to_parquet(folder / "train-00000-of-00002.parquet")
    assert file_fingerprint(folder) != before  # a shard changed: the table did

    frame.iloc[:2].to_parquet(folder / "test-00000-of-00001.parquet")
    with pytest.raises(DanluError, match=r"holds the shards of 2 splits \(test, train\)"):
        open_table(str(folder))
    assert open_table(str(folder / "train-*.parquet")).n_rows == 10  # a pattern picks one split
    frame[["label", "x"]].to_parquet(folder / "train-00002-of-00002.parquet")
    with pytest.raises(DanluError, match=r"train-00002-of-00002.parquet' has the columns \['label', 'x'\]"):
        open_table(str(folder / "train-*.parquet"))
    with pytest.raises(DanluError, match="matches no file"):
        open_table(str(folder / "valid-*.parquet"))
    frame.to_csv(folder / "train.csv", index=False)
    with pytest.raises(DanluError, match="a pattern names Parquet shards"):
        open_table(str(folder / "*.csv"))
