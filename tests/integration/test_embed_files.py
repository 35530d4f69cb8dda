"""What `danlu embed` reads and writes: image folders, a .txt, table columns of texts or image paths, each
item with its id; vectors to .npy (+ ids) or .parquet, in input order; clear errors for the rest."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from danlu.embeddings import load_image_text
from danlu.embeddings.files import (
    embed_items,
    parse_labels,
    read_items,
    read_vectors,
    write_vectors,
    zero_shot_items,
)
from danlu.errors import DanluError
from tests.embedding_models import tiny_image_text


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return load_image_text(tiny_image_text(tmp_path_factory.mktemp("clip") / "clip"))


def images_in(folder, n=5):
    rng = np.random.default_rng(1)
    (folder / "sub").mkdir(parents=True)
    for i in range(n):
        where = folder / ("sub" if i % 2 else "") / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(where)
    return folder


def test_inputs_of_every_kind_keep_their_order_and_ids(tmp_path):
    folder = images_in(tmp_path / "pics")
    items = read_items(folder)
    assert items.kind == "images" and items.ids == ["0.png", "2.png", "4.png", "sub/1.png", "sub/3.png"]
    (tmp_path / "t.txt").write_text("first text\n\nsecond text\n")
    assert read_items(tmp_path / "t.txt").values == ["first text", "second text"]
    pd.DataFrame({"review": ["good", "bad"], "pic": ["pics/0.png", "pics/sub/1.png"]}).to_csv(
        tmp_path / "t.csv"
    )
    texts, pictures = read_items(tmp_path / "t.csv", "review"), read_items(tmp_path / "t.csv", "pic")
    assert texts.kind == "texts" and texts.ids == ["0", "1"]
    assert pictures.kind == "images" and pictures.values[1] == str(tmp_path / "pics/sub/1.png")
    pd.DataFrame({"review": ["good", "bad"]}).to_parquet(tmp_path / "one.parquet")
    only = read_items(tmp_path / "one.parquet")  # a table of one column: that column, unasked
    assert only.kind == "texts" and only.values == ["good", "bad"]
    for source, column, message in [
        (tmp_path / "t.csv", None, "a table needs --column"),
        (tmp_path / "t.csv", "text", "no column 'text'"),
        (tmp_path / "nothing", None, "does not exist"),
    ]:
        with pytest.raises(DanluError, match=message):
            read_items(source, column)


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_vectors_and_ids_round_trip(tmp_path, suffix):
    vectors = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    write_vectors(vectors, ["a", "b", "c", "d"], tmp_path / f"v{suffix}")
    back, ids = read_vectors(tmp_path / f"v{suffix}")
    assert np.array_equal(back, vectors) and ids == ["a", "b", "c", "d"]
    with pytest.raises(DanluError, match=r"name a \.npy or \.parquet file"):
        write_vectors(vectors, list("abcd"), tmp_path / "v.csv")


def test_embedding_a_folder_and_texts_in_batches_equals_one_at_a_time(clip, tmp_path):
    items = read_items(images_in(tmp_path / "pics"))
    done = embed_items(clip, items, batch_size=2, progress=False)
    assert done.vectors.shape == (5, clip.dimensions) and done.truncated == 0
    for path, vector in zip(items.values, done.vectors, strict=True):
        assert np.allclose(clip.embed_images([path])[0], vector, atol=1e-5)
    long = "the quick brown fox jumps over the dog " * 8
    texts = embed_items(clip, read_items_of(tmp_path, ["a photo of a cat", long]), progress=False)
    assert texts.truncated == 1 and np.allclose(np.linalg.norm(texts.vectors, axis=1), 1, atol=1e-5)
    raw = embed_items(clip, read_items_of(tmp_path, ["a photo of a cat"]), normalize=False, progress=False)
    assert not np.isclose(np.linalg.norm(raw.vectors[0]), 1)


def read_items_of(tmp_path, texts):
    (tmp_path / "in.txt").write_text("\n".join(texts))
    return read_items(tmp_path / "in.txt")


def test_zero_shot_labels_each_image_with_the_models_own_probabilities(clip, tmp_path):
    folder = images_in(tmp_path / "pics")
    items = read_items(folder)
    templates = ["a photo of a {}.", "a picture of a {}."]
    frame = zero_shot_items(clip, items, ["cat", "dog", "car"], templates, batch_size=2)
    assert list(frame.columns) == ["path", "label", "proba_cat", "proba_dog", "proba_car"]
    assert frame["path"].tolist() == items.ids
    expected = clip.zero_shot(items.values, ["cat", "dog", "car"], templates)
    assert np.allclose(frame.filter(like="proba_").to_numpy(), expected, atol=1e-6)
    assert frame["label"].tolist() == [["cat", "dog", "car"][i] for i in expected.argmax(axis=1)]
    with pytest.raises(DanluError, match="images, not texts"):
        (tmp_path / "t.txt").write_text("a text\n")
        zero_shot_items(clip, read_items(tmp_path / "t.txt"), ["cat"], ["{}"])


def test_labels_come_from_a_list_or_a_file_once_each(tmp_path):
    (tmp_path / "labels.txt").write_text("car\n\n bird \n")
    assert parse_labels(" cat, dog ,", tmp_path / "labels.txt") == ["cat", "dog", "car", "bird"]
    assert parse_labels(["cat", "dog"]) == ["cat", "dog"]
    for labels, file, message in [
        ("", None, "no labels"),
        ("cat,dog,cat", None, "'cat' is named twice"),
        (None, tmp_path / "missing.txt", "cannot read --labels-file"),
    ]:
        with pytest.raises(DanluError, match=message):
            parse_labels(labels, file)
