"""What `danlu embed` reads and writes. Inputs: a folder of images (sorted by path), one image, a .txt of
texts (one per line), or a CSV/Parquet/JSONL column of texts or of image paths; each item keeps an id (its
path, or its line or row number). Outputs: .npy (the float32 matrix, with OUT.ids.json beside it) or
.parquet (an id column and an embedding column), written atomically, rows in input order."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from danlu.errors import DanluError, read_user_text
from danlu.run import atomic_write, atomic_write_json

TABLES = (".csv", ".parquet", ".jsonl")
OUTPUTS = (".npy", ".parquet")


@dataclass
class Items:
    """What to embed: images (paths) or texts, and an id for each."""

    kind: str  # "images" | "texts"
    values: list[str]
    ids: list[str]


def is_image(path: str | Path) -> bool:
    from danlu.families.image.sources import IMAGE_SUFFIXES  # the image family's (it imports torch)

    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_items(source: str | Path, column: str | None = None) -> Items:
    """The items in SOURCE. Raises DanluError for a missing source, an empty one, or a table without
    the column."""
    from danlu.families.image.sources import IMAGE_SUFFIXES, list_images

    path = Path(source).expanduser()
    if path.is_dir():
        names = list_images(path)  # the image family's listing: its suffixes, its order
        if not names:
            raise DanluError(f"'{path}' holds no images", f"put {', '.join(IMAGE_SUFFIXES[:4])} files in it")
        return Items("images", [str(path / name) for name in names], names)
    if not path.is_file():
        raise DanluError(f"'{source}' does not exist", "pass a folder of images, an image, a .txt or a table")
    suffix = path.suffix.lower()
    if is_image(path):
        return Items("images", [str(path)], [path.name])
    if suffix == ".txt":
        texts = [line.rstrip("\r\n") for line in read_user_text(path).splitlines()]
        texts = [t for t in texts if t.strip()]
        return _checked(Items("texts", texts, [str(i) for i in range(len(texts))]), path)
    if suffix in TABLES:
        return _checked(_column(path, column), path)
    raise DanluError(
        f"cannot embed '{path.name}'",
        f"pass a folder of images, an image, a .txt (one text per line) or a {'/'.join(TABLES)} table",
    )


def _column(path: Path, column: str | None) -> Items:
    from danlu.data.sources import open_table

    frame = open_table(str(path)).read_all()
    if column is None and len(frame.columns) == 1:  # nothing to choose between
        column = str(frame.columns[0])
    if column is None or column not in frame.columns:
        named = f"no column '{column}'" if column else "a table needs --column"
        raise DanluError(
            f"{path.name}: {named}", f"pass --column, one of: {', '.join(map(str, frame.columns))}"
        )
    values = ["" if v is None or v != v else str(v) for v in frame[column].tolist()]
    ids = [str(i) for i in range(len(values))]
    if values and all(is_image(v) for v in values):  # a column of image paths, relative to the table
        from danlu.families.image.sources import table_path

        return Items("images", [str(table_path(path, v).expanduser()) for v in values], values)
    return Items("texts", values, ids)


def _checked(items: Items, path: Path) -> Items:
    if not items.values:
        raise DanluError(f"'{path}' holds nothing to embed", "give it one text per line (or per row)")
    return items


def check_output(out: str | Path) -> None:
    if Path(out).suffix.lower() not in OUTPUTS:
        raise DanluError(f"cannot write vectors to '{out}'", f"name a {' or '.join(OUTPUTS)} file")


def write_vectors(vectors: np.ndarray, ids: list[str], out: str | Path) -> None:
    """OUT.npy (+ OUT.ids.json) or OUT.parquet (id, embedding), atomically."""
    check_output(out)
    out = Path(out)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if out.suffix.lower() == ".npy":
        atomic_write(out, lambda f: np.save(f, vectors))
        atomic_write_json(out.with_suffix(".ids.json"), ids)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    table = pa.table({"id": pa.array(ids, pa.string()), "embedding": embedding})
    atomic_write(out, lambda f: pq.write_table(table, f))


def read_vectors(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """What write_vectors wrote: the matrix and the ids."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return np.load(path), json.loads(path.with_suffix(".ids.json").read_text())
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), table.column("id").to_pylist()


@dataclass
class Embedded:
    """What embed_items did: the vectors in input order and how many texts were truncated."""

    vectors: np.ndarray
    truncated: int


def embed_items(
    encoder: Any,
    items: Items,
    normalize: bool | None = None,
    truncate: str = "end",
    batch_size: int = 32,
    progress: bool = True,
) -> Embedded:
    """Every item's vector, batched, with a progress bar. Raises DanluError for images given to a text
    encoder, or a text over the limit with truncate="error"."""
    from tqdm.auto import tqdm

    from danlu.embeddings.encoders import ImageTextEncoder

    if items.kind == "images" and not isinstance(encoder, ImageTextEncoder):
        raise DanluError(f"{encoder.name} embeds texts, not images", "pass a CLIP or SigLIP model for images")
    options: dict[str, Any] = {} if normalize is None else {"normalize": normalize}
    truncated, parts = 0, []
    if items.kind == "texts":  # one tokenizing pass counts the texts over the limit, before any work
        counts = encoder.text.token_counts(items.values)
        encoder.text.check(items.values, truncate, counts)
        truncated = sum(n > encoder.text.limit for n in counts)
        truncate = "end" if truncate == "error" else truncate  # checked: none is over
    step = batch_size * 8  # items per progress update: whole batches
    bar = tqdm(
        total=len(items.values),
        desc="embed",
        unit=items.kind[:-1],
        disable=not progress or len(items.values) <= step,
    )
    with bar:
        for start in range(0, len(items.values), step):
            chunk = items.values[start : start + step]
            if items.kind == "images":
                parts.append(encoder.embed_images(chunk, batch_size=batch_size, **options))
            else:
                parts.append(encoder.embed_texts(chunk, truncate=truncate, batch_size=batch_size, **options))
            bar.update(len(chunk))
    return Embedded(np.concatenate(parts), truncated)


def parse_labels(labels: str | Sequence[str] | None, labels_file: str | Path | None = None) -> list[str]:
    """The labels of --labels "cat,dog" (or a list) and --labels-file (one per line), blank ones dropped.
    Raises DanluError for none at all, a duplicate, or an unreadable file."""
    named = labels.split(",") if isinstance(labels, str) else list(labels or [])
    if labels_file is not None:
        try:
            named += read_user_text(Path(labels_file).expanduser()).splitlines()
        except OSError as exc:
            raise DanluError(
                f"cannot read --labels-file '{labels_file}': {exc}", "pass a text file, one label per line"
            ) from None
    named = [label.strip() for label in named if label.strip()]
    if not named:
        raise DanluError("no labels to classify the images by", 'name them, e.g. --labels "cat,dog,car"')
    seen: set[str] = set()
    for label in named:
        if label in seen:
            raise DanluError(f"the label '{label}' is named twice", "name each label once")
        seen.add(label)
    return named


def check_templates(templates: Sequence[str]) -> None:
    """Each prompt template holds {} for the label."""
    if any("{}" not in template for template in templates):
        raise DanluError("a template has no {} for the label", 'e.g. --template "a photo of a {}."')


def zero_shot_items(
    encoder: Any, items: Items, labels: list[str], templates: Sequence[str], batch_size: int = 32
) -> Any:
    """A DataFrame of one row per image in input order: path, the top label, and proba_<label> for each
    label. Raises DanluError for texts or an encoder without an image tower."""
    import pandas as pd

    from danlu.embeddings.encoders import ImageTextEncoder

    if not isinstance(encoder, ImageTextEncoder):
        raise DanluError(f"{encoder.name} has no image tower", "pass a CLIP or SigLIP model directory")
    if items.kind != "images":
        raise DanluError("zero-shot labels are for images, not texts", "pass a folder of images or an image")
    vectors = embed_items(encoder, items, batch_size=batch_size).vectors
    probabilities = encoder.label_probabilities(vectors, labels, templates)
    frame = pd.DataFrame({"path": items.ids, "label": [labels[i] for i in probabilities.argmax(axis=1)]})
    for i, label in enumerate(labels):
        frame[f"proba_{label}"] = probabilities[:, i]
    return frame


def write_frame(frame: Any, out: str | Path) -> None:
    """A DataFrame into OUT, atomically: CSV for a .csv name, else Parquet (the caller checked the name)."""
    if Path(out).suffix.lower() == ".csv":
        atomic_write(Path(out), lambda f: frame.to_csv(f, index=False))
    else:
        atomic_write(Path(out), lambda f: frame.to_parquet(f, index=False))


def plot_zero_shot(frame: Any, items: Items, path: str | Path) -> None:
    """The first images with their top label and its probability, as a PNG grid."""
    from danlu.embeddings.encoders import open_rgb
    from danlu.families.image.plots import GRID, image_grid

    shown = frame.head(GRID)
    images = [np.asarray(open_rgb(value)) for value in items.values[: len(shown)]]
    top = shown.filter(like="proba_").max(axis=1)
    captions = [f"{label} ({p:.2f})" for label, p in zip(shown["label"], top, strict=True)]
    image_grid(images, captions, Path(path), "zero-shot labels")
