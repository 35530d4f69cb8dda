import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from danlu.config import load_config
from danlu.errors import DanluError
from danlu.families.tabular.preprocess import Preprocessor, PreprocessorFitter
from danlu.families.tabular.schema import infer_schema
from tests.conftest import mixed_frame, regression_frame


def fit(frame: pd.DataFrame, target: str, *overrides: str) -> Preprocessor:
    config = load_config(None, ["data.train=x.csv", f"data.target={target}", *overrides]).data
    fitter = PreprocessorFitter(infer_schema(frame, config))
    fitter.update(frame)
    return fitter.finish()


def test_schema_inference_and_missing_indicator():
    frame = mixed_frame()
    pre = fit(frame, "label")
    assert [c.name for c in pre.numeric] == ["x0", "x1"]
    assert [c.name for c in pre.categorical] == ["color"]
    assert [c.indicator for c in pre.numeric] == [False, True]  # x1 has gaps in training
    assert pre.classes == ["high", "low", "mid"]
    x_num, x_cat = pre.transform(frame)
    assert x_num.shape == (len(frame), 3) and x_cat.shape == (len(frame), 1)
    assert np.allclose(x_num[:, 0].mean(), 0, atol=1e-6) and np.allclose(x_num[:, 0].std(), 1, atol=1e-4)
    assert np.array_equal(x_num[:, 2], frame["x1"].isna().to_numpy())
    assert not np.isnan(x_num).any()


def test_json_round_trip_transforms_identically():
    frame = mixed_frame()
    pre = fit(frame, "label")
    again = Preprocessor.from_json(pre.to_json())
    for a, b in zip(pre.transform(frame), again.transform(frame), strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(pre.encode_target(frame["label"]), again.encode_target(frame["label"]))


def test_unknown_category_goes_to_bucket_zero():
    pre = fit(mixed_frame(), "label")
    _, x_cat = pre.transform(pd.DataFrame({"x0": [0.0, 0.0], "x1": [0.0, None], "color": ["purple", None]}))
    assert x_cat.tolist() == [[0], [0]]


def test_labels_map_to_indices_and_back():
    frame = mixed_frame()
    pre = fit(frame, "label")
    codes = pre.encode_target(frame["label"])
    assert list(pre.labels(codes)) == list(frame["label"])


def test_regression_target_standardized_and_decoded():
    frame = regression_frame()
    pre = fit(frame, "price")
    y = pre.encode_target(frame["price"])
    assert abs(y.mean()) < 1e-5 and abs(y.std() - 1) < 1e-4
    assert np.allclose(pre.decode(y[:, None]), frame["price"], rtol=1e-5)


def test_stray_text_names_column_row_and_value():
    frame = regression_frame(50).astype({"b": object})
    frame.loc[17, "b"] = "oops"
    with pytest.raises(DanluError, match=r"column 'b' holds numbers but row 18 has 'oops'"):
        fit(frame, "price")


def test_declared_categorical_accepts_text():
    frame = regression_frame(50).astype({"b": object})
    frame.loc[17, "b"] = "oops"
    pre = fit(frame, "price", "data.categorical=[b]")
    assert [c.name for c in pre.categorical] == ["b"]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_bad_target_names_the_row(bad):
    frame = regression_frame(30)
    frame.loc[4, "price"] = bad
    with pytest.raises(DanluError, match=r"target column 'price' has .* at row 5"):
        fit(frame, "price")


def test_single_class_is_an_error():
    frame = mixed_frame(40).assign(label="only")
    with pytest.raises(DanluError, match="single class"):
        fit(frame, "label")


def test_chunked_fit_equals_whole_fit():
    frame = mixed_frame(1000)
    whole = fit(frame, "label")
    config = load_config(None, ["data.train=x.csv", "data.target=label"]).data
    fitter = PreprocessorFitter(infer_schema(frame, config))
    for start in range(0, 1000, 128):
        fitter.update(frame.iloc[start : start + 128])
    chunked = fitter.finish()
    assert chunked.classes == whole.classes
    assert [c.values for c in chunked.categorical] == [c.values for c in whole.categorical]
    for a, b in zip(chunked.numeric, whole.numeric, strict=True):
        assert (
            a.mean == pytest.approx(b.mean) and a.std == pytest.approx(b.std) and a.indicator == b.indicator
        )


@pytest.mark.parametrize("chunk", [None, 7, 128])
def test_scaling_statistics_hold_at_large_offsets(chunk):
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 0.01, 1000)
    frame = pd.DataFrame({"big": 1e8 + noise, "y": 1e9 + 3 * noise + rng.normal(0, 0.001, 1000)})
    config = load_config(None, ["data.train=x.csv", "data.target=y", "data.task=regression"]).data
    fitter = PreprocessorFitter(infer_schema(frame, config))
    for start in range(0, 1000, chunk or 1000):
        fitter.update(frame.iloc[start : start + (chunk or 1000)])
    pre = fitter.finish()
    # E[x^2] - mean^2 gives 1.41 here (141 times too large); the merged moments match numpy's two-pass std
    assert pre.numeric[0].std == pytest.approx(np.std(frame["big"]), rel=1e-6)
    assert pre.numeric[0].mean == pytest.approx(np.mean(frame["big"]), rel=1e-15)
    assert pre.target_std == pytest.approx(np.std(frame["y"]), rel=1e-6)


@pytest.mark.parametrize("value", [2.5, 1e9 + 0.5])
def test_a_constant_regression_target_is_an_error(value):
    frame = pd.DataFrame({"a": np.arange(30.0), "y": np.full(30, value)})
    with pytest.raises(DanluError, match=r"target 'y' has a single value"):
        fit(frame, "y", "data.task=regression")


finite = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.one_of(finite, st.none()), st.sampled_from(["a", "b", "c", None]), st.integers(0, 2)),
        min_size=4,
        max_size=40,
    )
)
def test_round_trip_property(rows):
    frame = pd.DataFrame(rows, columns=["num", "cat", "y"])
    frame["cat"] = frame["cat"].astype(object)
    if frame["y"].nunique() < 2 or frame["num"].isna().all():
        return
    pre = fit(frame, "y", "data.categorical=[cat]", "data.task=classification")
    again = Preprocessor.from_json(pre.to_json())
    x1, c1 = pre.transform(frame)
    x2, c2 = again.transform(frame)
    assert np.array_equal(x1, x2) and np.array_equal(c1, c2)
    assert np.isfinite(x1).all()
    assert list(again.labels(again.encode_target(frame["y"]))) == list(frame["y"])


@pytest.mark.parametrize("column", ["b", "price"])  # a feature, the regression target
@pytest.mark.parametrize("value", [1e39, -1e307, 4e38])
def test_a_value_beyond_float32s_range_is_named_with_the_fix(column, value):
    """The model (and an exported model's raw inputs and outputs) is float32, and the fitted moments
    square the values: a finite value beyond float32's range is one line naming it, not a NaN scaler
    and a traceback when preprocess.json is written."""
    frame = regression_frame(30)
    frame.loc[6, column] = value
    which = "target column" if column == "price" else "column"
    expected = f"{which} '{column}' has {value:g} at row 7, beyond float32's range"
    with pytest.raises(DanluError, match=re.escape(expected)):
        fit(frame, "price", "data.task=regression")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(width=32, allow_nan=False, allow_infinity=False),
            st.floats(width=32, allow_infinity=False),
        ),
        min_size=4,
        max_size=30,
    )
)
def test_any_float32_values_fit_finite_scalers_and_inputs(rows):
    """Any float32 values, from the smallest to the largest either side, NaN among the features: the
    fitted means and spreads are finite (strict JSON), and so is every standardized input and target."""
    frame = pd.DataFrame(rows, columns=["y", "x"])
    if frame["x"].isna().all() or np.ptp(frame["y"]) <= 1e-12 * max(1.0, abs(frame["y"].mean())):
        return  # nothing to scale, or a constant target (its own error)
    pre = fit(frame, "y", "data.task=regression")
    again = Preprocessor.from_json(pre.to_json())  # strict JSON: raises on NaN or infinity
    numbers, _ = again.transform(frame)
    assert np.isfinite(numbers).all()
    assert np.isfinite(again.encode_target(frame["y"])).all()


def test_a_categorical_column_of_ids_or_timestamps_is_named_in_a_warning(caplog):
    """An ID or a timestamp read as a category: nearly every value once, nothing future rows share. Named
    in one warning; a column of a few values repeated is not."""
    frame = mixed_frame(120)
    frame["id"] = [f"user-{i}" for i in range(120)]
    frame["when"] = pd.date_range("2024-01-01", periods=120, freq="h").astype(str)
    with caplog.at_level("WARNING", logger="danlu"):
        pre = fit(frame, "label", "data.categorical=[color, id, when]")
    warned = [r.getMessage() for r in caplog.records]
    assert [c.name for c in pre.categorical] == ["color", "id", "when"]
    assert len(warned) == 2 and all("distinct values in 120 training rows" in w for w in warned)
    assert warned[0].startswith("column 'id' is categorical with 120") and "column 'when'" in warned[1]


def test_a_categorical_column_keeps_its_most_common_values_up_to_max_categories(caplog):
    """data.max_categories=3: the three most common training values (a tie broken in sorted order) keep
    their own index; the rest share index 0 with unseen and missing values, in training and after."""
    counts = {"d": 5, "b": 4, "a": 3, "c": 3, "e": 1}
    frame = pd.DataFrame({"shop": [v for v, n in counts.items() for _ in range(n)]})
    frame["x0"], frame["label"] = np.arange(len(frame), dtype=float), ["y", "n"] * 8
    with caplog.at_level("INFO", logger="danlu"):
        pre = fit(frame, "label", "data.max_categories=3")
    assert pre.categorical[0].values == ["a", "b", "d"]  # d, b and a (before c) by count, kept sorted
    said = [r.getMessage() for r in caplog.records if "max_categories" in r.getMessage()]
    assert said == [
        "column 'shop' keeps its 3 most common values of 5; the other 2 (4 training rows, 25.0%) count as "
        "unknown (data.max_categories)"
    ]
    _, codes = pre.transform(pd.DataFrame({"shop": ["a", "b", "c", "d", "e", "never", None], "x0": 0.0}))
    assert codes[:, 0].tolist() == [1, 2, 0, 3, 0, 0, 0]
    assert Preprocessor.from_json(pre.to_json()).categorical == pre.categorical
    # null keeps every value, and so does the default under 10,000 values
    assert fit(frame, "label", "data.max_categories=null").categorical[0].values == list("abcde")
    assert fit(frame, "label").categorical[0].values == list("abcde")


def test_the_most_common_values_are_counted_over_every_chunk():
    """Out of memory, the fitter sees the training rows chunk by chunk: a value common over the whole
    file but rare in each chunk is kept, as when the whole frame is fitted at once."""
    shops = ["spread"] * 6 + ["first"] * 4 + ["second"] * 4
    order = [0, 1, 2, 6, 7, 8, 9, 3, 4, 5, 10, 11, 12, 13]  # 'spread' 3 + 3, 'first' 4, 'second' 4
    frame = pd.DataFrame({"shop": [shops[i] for i in order], "x0": 1.0, "label": ["y", "n"] * 7})
    config = load_config(None, ["data.train=x.csv", "data.target=label", "data.max_categories=1"]).data
    whole = PreprocessorFitter(infer_schema(frame, config))
    whole.update(frame)
    chunked = PreprocessorFitter(infer_schema(frame, config))
    chunked.update(frame.iloc[:7])
    chunked.update(frame.iloc[7:])
    assert whole.finish().categorical[0].values == chunked.finish().categorical[0].values == ["spread"]


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["data.features=[]"], "data.features is empty (fix: name the feature columns, or leave it out"),
        (["data.categorical=[label]"], "categorical column 'label' not in the features (fix: available "),
        (
            ["data.features=[x0]", "data.categorical=[color]"],
            "categorical column 'color' not in the features",
        ),
    ],
)
def test_features_and_categorical_columns_that_cannot_be_are_named(overrides, line):
    with pytest.raises(DanluError) as error:
        fit(mixed_frame(), "label", *overrides)
    assert str(error.value).startswith(line)


def test_unnamed_columns_of_row_numbers_or_no_values_are_not_default_features(caplog):
    """pandas names a column whose header cell is empty 'Unnamed: N': a DataFrame's index saved with the
    CSV (0, 1, 2, ...) or a trailing comma on every line (no values). Neither is a default feature (each
    named in the log); an unnamed column of real values, a named empty one, or one data.features names
    still are."""
    frame = mixed_frame(60)
    frame.insert(0, "Unnamed: 0", np.arange(60))
    frame["Unnamed: 5"] = np.nan
    frame["Unnamed: 6"] = np.arange(60)[::-1]  # not the row numbers
    frame["notes"] = np.nan
    with caplog.at_level("INFO", logger="danlu"):
        pre = fit(frame, "label")
    assert pre.features == ["x0", "x1", "Unnamed: 6", "notes", "color"]
    said = [r.getMessage() for r in caplog.records if "left out of the features" in r.getMessage()]
    assert said == [
        "column 'Unnamed: 0' left out of the features (no name, and the row numbers: an index saved with "
        "the file)",
        "column 'Unnamed: 5' left out of the features (no name, and no values: a trailing comma's)",
    ]
    named = fit(frame, "label", "data.features=['Unnamed: 0', x0]")
    assert named.features == ["Unnamed: 0", "x0"]
