"""A toy family that lives outside danlu: fixed-length sequences of numbers (an NPZ file with
`sequences` [n, length] and `labels` [n]) classified or regressed by a small MLP. It exists to prove that
a new kind of data is one folder plus one registry line (`danlu.families.register("sequence",
"tests.toy_family")`): nothing in danlu names it, yet it trains, resumes, evaluates, predicts, exports
(verified), serves (with the web page) and packages (tests/e2e/test_toy_family.py)."""

from __future__ import annotations

from danlu.config import DataConfig
from danlu.families.contract import Family
from tests.toy_family import data, serve
from tests.toy_family.export import SequenceExport
from tests.toy_family.model import MODELS, build_model
from tests.toy_family.state import SequenceState

SUFFIX = ".seq.npz"


def detect(data: DataConfig, model) -> bool:
    return data.train.endswith(SUFFIX)


FAMILY = Family(
    name="sequence",
    state_type=SequenceState,
    detect=detect,
    model_types=tuple(MODELS),
    model_defaults={"type": "mlp", "hidden": [32]},
    train_defaults={"epochs": 8, "batch_size": 32, "lr": 3e-3, "patience": 0},
    load=data.load,
    build_model=build_model,
    read=data.read,
    as_items=data.as_items,
    inputs=data.inputs,
    targets=data.targets,
    count=data.count,
    output_frame=data.output_frame,
    stored_rows="heldout.seq.npz",
    store_rows=data.store_rows,
    read_stored=data.read_stored,
    nbytes=data.nbytes,
    select=data.select,
    reopen=data.reopen,
    exporter=SequenceExport,
    request_model=serve.request_model,
    request_items=serve.request_items,
    warmup_items=serve.warmup_items,
    metadata=serve.metadata,
    page_form=serve.page_form,
    description=serve.description,
)
