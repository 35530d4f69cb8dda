"""The tabular family: CSV, Parquet, NPZ, NPY and synthetic tables, in memory or in chunks; an MLP or the
user's own module; exports with the preprocessing inside."""

from __future__ import annotations

from danlu.families.contract import Family
from danlu.families.tabular import codec, serve
from danlu.families.tabular.data import load, plan_frames
from danlu.families.tabular.export import TabularExport
from danlu.families.tabular.models import DEFAULTS, MODELS, build_model
from danlu.families.tabular.preprocess import Preprocessor
from danlu.run import HELDOUT_ROWS


def claims_every_source(data, model) -> bool:
    """Tables are the fallback: every source no other family claims."""
    return True


# The hooks of a family whose items are table rows (a DataFrame): files read, predictions written and
# held-out rows stored as tables are (the text family's items are table rows too)
TABLE_ROWS = {
    "read": codec.read,
    "output_frame": codec.output_frame,
    "stored_rows": HELDOUT_ROWS,
    "store_rows": codec.store_rows,
    "read_stored": codec.read_stored,
    "nbytes": codec.nbytes,
    "select": codec.select,
    "reopen": codec.reopen,
    "file_fingerprint": codec.file_fingerprint,
}


FAMILY = Family(
    name="tabular",
    state_type=Preprocessor,
    detect=claims_every_source,
    fallback=True,
    model_types=tuple(MODELS),
    model_defaults=DEFAULTS,
    load=load,
    build_model=build_model,
    as_items=codec.as_items,
    inputs=codec.inputs,
    targets=codec.targets,
    count=codec.count,
    **TABLE_ROWS,
    plan_frames=plan_frames,
    exporter=TabularExport,
    request_model=serve.request_model,
    request_items=serve.request_items,
    warmup_items=serve.warmup_items,
    metadata=serve.metadata,
    page_form=serve.page_form,
    description=serve.description,
)
