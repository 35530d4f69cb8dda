"""The app in-process through FastAPI's TestClient (httpx), lifespan included."""

import json

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import danlu
from danlu.errors import DanluError
from danlu.serve.app import ServeSettings, create_app
from tests.conftest import mixed_frame, train_quietly
from tests.strategies import JSON_VALUES

RECORD = {"x0": 0.5, "x1": None, "color": "red"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_quietly(
        tmp_path_factory.mktemp("serve") / "cls", mixed_frame(400), "label", "train.epochs=20"
    )


@pytest.fixture(scope="module")
def client(run):
    app = create_app(ServeSettings(str(run.path), max_rows=50, max_body_bytes=20_000))
    with TestClient(app, base_url="http://localhost") as client:
        yield client


def test_predict_records_and_instances_in_request_order(client, run):
    frame = mixed_frame(20, seed=3).drop(columns="label")
    records = json.loads(frame.to_json(orient="records"))
    by_records = client.post("/v1/predict", json={"records": records})
    assert by_records.status_code == 200
    body = by_records.json()
    expected = danlu.load(run.path)
    assert body["predictions"] == list(expected.predict(frame))
    assert np.allclose(body["probabilities"], expected.predict_proba(frame), atol=1e-6)
    assert body["classes"] == ["high", "low", "mid"]
    instances = frame[["x0", "x1", "color"]].astype(object).where(frame.notna(), None).values.tolist()
    assert (
        client.post("/v1/predict", json={"instances": instances}).json()["predictions"] == body["predictions"]
    )


def test_health_readiness_metadata_and_metrics(client, run):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    meta = client.get("/v1/metadata").json()
    assert meta["task"] == "classification" and meta["classes"] == ["high", "low", "mid"]
    assert [f["name"] for f in meta["features"]] == ["x0", "x1", "color"]
    assert meta["test_metrics"]["accuracy"] == pytest.approx(run.report["test"]["accuracy"])
    client.post("/v1/predict", json={"records": [RECORD]})
    client.post("/v1/predict", json={"records": []})
    scrape = client.get("/metrics").text
    assert 'danlu_requests_total{endpoint="/v1/predict",status="200"}' in scrape
    assert 'danlu_requests_total{endpoint="/v1/predict",status="422"}' in scrape
    assert "danlu_batch_rows_bucket" in scrape and "danlu_request_seconds_bucket" in scrape


def test_openapi_shows_the_real_feature_names(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert set(schemas["Record"]["properties"]) == {"x0", "x1", "color"}
    assert "blue, green, red" in schemas["Record"]["properties"]["color"]["description"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"records": [{"x0": "abc", "x1": 1.0, "color": "red"}]}, "x0"),  # wrong type
        ({"records": [{"x0": 1.0, "color": "red"}]}, "x1"),  # missing feature
        ({"records": [{**RECORD, "size": 3}]}, "size"),  # unknown feature
        ({"records": []}, "records"),  # empty
        ({"records": [RECORD] * 51}, "records"),  # over --max-rows
        ({"instances": [[1.0, 2.0]]}, "body"),  # too few values
        ({"instances": [["a", 2.0, "red"]]}, "x0"),  # text where a number goes
        ({"records": [RECORD], "instances": [[1, 2, "red"]]}, "body"),  # both forms
        ({"rows": [RECORD]}, "rows"),  # neither
    ],
)
def test_bad_input_is_a_422_naming_the_field(client, body, field):
    response = client.post("/v1/predict", json=body)
    assert response.status_code == 422
    assert field in json.dumps(response.json()["detail"])


@pytest.mark.parametrize(
    "raw",
    [
        '{"records": [{"x0": NaN, "x1": 1, "color": "red"}]}',
        '{"records": [{"x0": Infinity, "x1": 1, "color": "red"}]}',
        "{bad json",
        "",
    ],
)
def test_nan_and_malformed_json_are_422(client, raw):
    response = client.post("/v1/predict", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422


@pytest.mark.parametrize(
    ("value", "from_a_frame"),
    [
        (3.2358748776880243e38, "not a finite number for row 2"),  # within float32, scaled beyond it
        (-1e300, r"column 'x1' has -1e\+300 at row 2, beyond float32's range"),  # refused as it is read
    ],
)
def test_values_that_overflow_float32_are_a_422_naming_the_row(client, run, value, from_a_frame):
    # found by the fuzzer below: the scaled value overflowed to inf and the NaN output could not be JSON
    response = client.post("/v1/predict", json={"records": [RECORD, {**RECORD, "x1": value}]})
    assert response.status_code == 422 and "rows [1]" in response.json()["detail"]
    assert client.post("/v1/predict", json={"records": [RECORD]}).status_code == 200
    with pytest.raises(DanluError, match=from_a_frame):
        danlu.load(run.path).predict(pd.DataFrame([RECORD, {**RECORD, "x1": value}]))


def test_a_table_run_takes_json_not_uploads(client):
    response = client.post("/v1/predict", files={"file": ("x.csv", b"x0,x1\n1,2\n", "text/csv")})
    assert response.status_code == 415 and "send the body as application/json" in response.json()["detail"]


def test_a_body_over_the_limit_is_413(client):
    big = json.dumps({"records": [RECORD] * 2000})
    assert (
        client.post("/v1/predict", content=big, headers={"content-type": "application/json"}).status_code
        == 413
    )

    def chunks():  # no Content-Length: the limit still holds
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000].encode()

    response = client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_api_key(run):
    app = create_app(ServeSettings(str(run.path), api_key="s3cret"))
    with TestClient(app, base_url="http://localhost") as client:
        assert client.post("/v1/predict", json={"records": [RECORD]}).status_code == 401
        assert (
            client.post("/v1/predict", json={"records": [RECORD]}, headers={"X-API-Key": "nope"}).status_code
            == 401
        )
        ok = client.post(
            "/v1/predict", json={"records": [RECORD]}, headers={"Authorization": "Bearer s3cret"}
        )
        assert ok.status_code == 200
        assert client.get("/healthz").status_code == 200  # probes need no key


def test_the_page_carries_the_form_schema(client):
    page = client.get("/").text
    assert '"name": "color", "kind": "select", "values": ["blue", "green", "red"]' in page
    assert "__DANLU_SCHEMA__" not in page


def test_bad_settings_fail_at_construction(run, tmp_path):
    with pytest.raises(DanluError, match="max-batch"):
        create_app(ServeSettings(str(run.path), max_batch=0))
    with pytest.raises(DanluError, match="is not a finished run"):
        create_app(ServeSettings(str(tmp_path)))


feature_values = (
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers()
    | st.text(max_size=8)
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(
        JSON_VALUES,
        st.fixed_dictionaries(
            {
                "records": st.lists(
                    st.dictionaries(st.sampled_from(["x0", "x1", "color", "extra"]), feature_values)
                )
            }
        ),
        st.fixed_dictionaries({"instances": st.lists(st.lists(feature_values, max_size=4), max_size=3)}),
    )
)
def test_fuzzed_bodies_never_get_a_5xx(client, body):
    headers = {"content-type": "application/json"}
    response = client.post("/v1/predict", content=json.dumps(body), headers=headers)
    assert response.status_code in (200, 413, 422), response.text


def test_a_full_queue_is_503_before_the_body_is_parsed(client):
    """Capacity comes first: a body that would be a 422 (or costly to parse) gets the 503 at once."""
    batcher = client.app.state.shell.handler.batcher
    batcher.queued_rows += 8192  # as if that many rows were waiting
    try:
        response = client.post(
            "/v1/predict", content=b"{not json", headers={"content-type": "application/json"}
        )
    finally:
        batcher.queued_rows -= 8192
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert client.post("/v1/predict", json={"records": [RECORD]}).status_code == 200


def test_predicting_a_file_of_earlier_predictions_replaces_them_and_says_so(run, tmp_path, caplog):
    """An input that has `prediction` or `proba_<class>` columns (the output of an earlier predict): the
    output's are this run's, and one warning names the replaced columns, once per file, not per chunk."""
    plain = mixed_frame(300, seed=3).drop(columns="label")
    plain.to_csv(tmp_path / "plain.csv", index=False)
    danlu.predict_file(run.path, tmp_path / "plain.csv", tmp_path / "expected.csv", chunk_rows=100)
    earlier = plain.assign(prediction="mine", proba_high=-1.0)
    earlier.to_csv(tmp_path / "earlier.csv", index=False)
    with caplog.at_level("WARNING", logger="danlu"):
        rows = danlu.predict_file(run.path, tmp_path / "earlier.csv", tmp_path / "out.csv", chunk_rows=100)
    assert rows == 300
    out, expected = pd.read_csv(tmp_path / "out.csv"), pd.read_csv(tmp_path / "expected.csv")
    assert list(out.columns) == [*plain.columns, "prediction", "proba_high", "proba_low", "proba_mid"]
    pd.testing.assert_frame_equal(out, expected[out.columns])
    said = [r.getMessage() for r in caplog.records if "replaced" in r.getMessage()]
    assert said == [
        f"'{tmp_path / 'earlier.csv'}' already has 'prediction', 'proba_high': replaced in the output by "
        "this run's predictions (rename them to keep them)"
    ]
    caplog.clear()  # the same file again, as a script of several predicts would: said again
    with caplog.at_level("WARNING", logger="danlu"):
        danlu.predict_file(run.path, tmp_path / "earlier.csv", tmp_path / "again.csv", chunk_rows=100)
    assert [r.getMessage() for r in caplog.records if "replaced" in r.getMessage()] == said


def test_parquet_predictions_hold_passed_through_columns_of_any_values(run, tmp_path):
    """A column the input passes through with numbers and text mixed (JSON Lines allow it) is written as
    text, as a CSV holds it; one whose type changes from one chunk to the next is one line with the fix,
    and no file (nor temporary) is left."""
    rows = mixed_frame(8, seed=4).drop(columns="label").assign(note=["a", 1, "b", 2.5, None, "c", 3, "d"])
    rows.to_json(tmp_path / "mixed.jsonl", orient="records", lines=True)
    assert danlu.predict_file(run.path, tmp_path / "mixed.jsonl", tmp_path / "mixed.parquet") == 8
    written = pd.read_parquet(tmp_path / "mixed.parquet")
    assert written["note"].tolist()[:4] == ["a", "1", "b", "2.5"] and written["note"].isna().sum() == 1
    late = mixed_frame(3000, seed=5).drop(columns="label").assign(note=[None] * 2500 + ["text"] * 500)
    late.to_csv(tmp_path / "late.csv", index=False)  # no value in the first chunk: read as numbers there
    with pytest.raises(DanluError, match=r"column 'note' is double in the first rows and .*string later"):
        danlu.predict_file(run.path, tmp_path / "late.csv", tmp_path / "late.parquet", chunk_rows=1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.csv", "mixed.jsonl", "mixed.parquet"]
    assert (
        danlu.predict_file(run.path, tmp_path / "late.csv", tmp_path / "late.parquet", chunk_rows=5000)
        == 3000
    )
    assert pd.read_parquet(tmp_path / "late.parquet")["note"].iloc[-1] == "text"
