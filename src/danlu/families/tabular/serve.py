"""Serving tabular runs: request models generated from the run's feature schema (so /docs shows the real
features and every request is validated before it reaches the model), the warm-up row and the web form."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from danlu.families.tabular.preprocess import Preprocessor


def record_model(pre: Preprocessor) -> type[BaseModel]:
    """One row: every feature required (null means missing), unknown keys rejected, no NaN or infinity."""
    fields: dict[str, Any] = {}
    for col in pre.numeric:
        fields[col.name] = (float | None, Field(..., description=f"numeric; training mean {col.mean:.4g}"))
    for col in pre.categorical:
        shown = ", ".join(col.values[:20]) + (", ..." if len(col.values) > 20 else "")
        fields[col.name] = (
            str | int | float | bool | None,
            Field(..., description=f"categorical; known values: {shown} (others count as unknown)"),
        )
    config = ConfigDict(extra="forbid", allow_inf_nan=False, title="Record")
    return create_model("Record", __config__=config, **fields)


def request_model(pre: Preprocessor, max_rows: int) -> type[BaseModel]:
    """{"records": [{feature: value}, ...]} or {"instances": [[value, ...], ...]} in feature order."""
    record = record_model(pre)
    features = pre.features

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        records: list[record] | None = Field(  # type: ignore[valid-type]
            None, min_length=1, max_length=max_rows, description="rows as objects keyed by feature name"
        )
        instances: list[list[float | str | bool | None]] | None = Field(
            None,
            min_length=1,
            max_length=max_rows,
            description=f"rows as arrays in feature order: {', '.join(features)}",
        )

        @model_validator(mode="after")
        def one_form(self) -> PredictRequest:
            if (self.records is None) == (self.instances is None):
                raise ValueError("send exactly one of 'records' or 'instances'")
            for i, row in enumerate(self.instances or []):
                if len(row) != len(features):
                    raise ValueError(f"instances[{i}] has {len(row)} values; the features are {features}")
            return self

        def rows(self) -> list[dict[str, Any]]:
            if self.records is not None:
                return [r.model_dump() for r in self.records]
            return [dict(zip(features, row, strict=True)) for row in self.instances]

    return PredictRequest


def check_instances(pre: Preprocessor, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Numeric features given as arrays must be numbers (or null); the error names the row and feature."""
    for i, row in enumerate(rows):
        for col in pre.numeric:
            value = row[col.name]
            if value is not None and (isinstance(value, (str, bool))):
                return [{"loc": ["body", "instances", i, col.name], "msg": "numeric feature needs a number"}]
    return []


def request_items(pre: Preprocessor, body) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The request's rows as records, and the errors of rows given as arrays (empty when valid)."""
    rows = body.rows()
    return rows, (check_instances(pre, rows) if body.instances is not None else [])


def metadata(pre: Preprocessor) -> dict[str, Any]:
    """The features as /v1/metadata describes them."""
    features = [{"name": c.name, "type": "numeric", "mean": c.mean} for c in pre.numeric]
    features += [{"name": c.name, "type": "categorical", "values": c.values} for c in pre.categorical]
    return {"features": features}


def page_form(pre: Preprocessor) -> dict[str, Any]:
    """One field per feature (a number starting at the training mean, a choice of the known values),
    sent as one record."""
    fields = [{"name": c.name, "kind": "number", "value": c.mean} for c in pre.numeric]
    fields += [{"name": c.name, "kind": "select", "values": c.values} for c in pre.categorical]
    return {
        "hint": "Fill in the features and press Predict. Leave a number empty for a missing value.",
        "fields": fields,
        "request": {"shape": "records", "key": "records"},
    }


def warmup_items(pre: Preprocessor) -> list[dict[str, Any]]:
    """One typical row: numeric means and each categorical's first value."""
    return [{c.name: c.mean for c in pre.numeric} | {c.name: (c.values or [""])[0] for c in pre.categorical}]


def description(pre: Preprocessor) -> str:
    return f"features {', '.join(pre.features)}"
