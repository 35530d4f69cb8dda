"""Every registered family offers the hooks the trainer, Predictor, export, held-out records and server
call, and `data.family: auto` picks the family that claims the source."""

import inspect

import pytest

from danlu import families
from danlu.config import DataConfig

REQUIRED = [
    "NAME",
    "STORED_ROWS",
    "MODEL_DEFAULTS",
    "detect",
    "load",
    "state_from_json",
    "build_model",
    "read",
    "as_items",
    "inputs",
    "targets",
    "count",
    "output_frame",
    "store_rows",
    "read_stored",
    "select",
    "reopen",
    "exporter",
    "request_model",
    "request_items",
    "warmup_items",
    "page_schema",
    "description",
]
EXPORT_SPEC = ["module", "example_inputs", "input_names", "output_name", "metadata", "finish_onnx"]
EXPORT_SPEC += ["onnx_feeds", "script", "script_args"]


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_a_family_offers_every_hook(name):
    family = families.get(name)
    missing = [hook for hook in REQUIRED if not hasattr(family, hook)]
    assert not missing, f"{name} lacks {missing}"
    assert name == family.NAME
    assert not [m for m in EXPORT_SPEC if not callable(getattr(family.exporter, m, None))]
    load = inspect.signature(family.load).parameters
    assert list(load)[:5] == ["config", "device", "state", "cache", "model"]  # the trainer's call


def test_auto_picks_the_family_that_claims_the_source(tmp_path):
    folder = tmp_path / "digits" / "0"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"")
    assert families.name_for(DataConfig(train="data.csv", target="y")) == "tabular"
    assert families.name_for(DataConfig(train="data.csv", target="y", text="review")) == "text"
    assert families.name_for(DataConfig(train=str(tmp_path / "digits"))) == "image"
    assert families.name_for(DataConfig(train="data.csv", target="y", family="image")) == "image"
