import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from danlu.config import Config, apply_overrides, dump_config, load_config, read_yaml, validate
from danlu.errors import DanluError, printable

SYN = "data.train=synthetic:classification"


def test_defaults_and_synthetic_target():
    config = load_config(None, [SYN])
    assert config.data.target == "label"
    assert config.train.optimizer == "adamw"
    assert load_config(None, ["data.train=synthetic:regression"]).data.target == "target"


def test_overrides_are_typed_yaml_values():
    config = load_config(
        None,
        [
            SYN,
            "train.epochs=5",
            "model.hidden=[64,32]",
            "train.grad_clip=null",
            "data.stratify=false",
            "train.lr=3e-4",
        ],
    )
    assert config.train.epochs == 5
    assert config.model.hidden == [64, 32]
    assert config.train.grad_clip is None
    assert config.data.stratify is False
    assert config.train.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epoks=3", "unknown key 'train.epoks' (did you mean 'train.epochs'?)"),
        ("trian.epochs=3", "unknown key 'trian' (did you mean 'train'?)"),
        ("data.synthetic.n_sample=5", "did you mean 'data.synthetic.n_samples'?"),
        ("train.epochs=abc", "train.epochs: Input should be a valid integer"),
        ("train.epochs=0", "train.epochs: Input should be greater than or equal to 1"),
        ("train.monitor=val_acc", "did you mean 'val_accuracy'?"),
        ("model.activation=swish", "model.activation: Input should be"),
        ("data.val_fraction=0.6", "must be below 1"),
        ("model.target=notamodule", "is not of the form package.module:ClassName"),
    ],
)
def test_bad_keys_and_types_name_the_path(override, expected):
    overrides = [SYN, override] + (["data.test_fraction=0.5"] if "val_fraction" in override else [])
    with pytest.raises(DanluError) as info:
        load_config(None, overrides)
    assert expected in str(info.value)


def test_target_required_for_files():
    with pytest.raises(DanluError, match=r"data\.target is required"):
        load_config(None, ["data.train=x.csv"])


def test_malformed_override():
    with pytest.raises(DanluError, match="is not KEY=VALUE"):
        apply_overrides({}, ["train.epochs"])


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, [SYN, "train.epochs=7", "model.hidden=[8]"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config))
    assert validate(read_yaml(path)) == config
    assert path.read_text().startswith("# danlu resolved config (schema 1)")


@pytest.mark.parametrize(("text", "expected"), [("data: [oops\n", "cannot parse"), ("- a\n- b\n", "mapping")])
def test_bad_yaml(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DanluError, match=expected):
        read_yaml(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(DanluError, match="not found"):
        read_yaml(tmp_path / "nope.yaml")


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation)
            elif model is not Config:
                assert field.description, f"{model.__name__}.{name} has no description"

    walk(Config)


def test_config_file_names_the_default_run_directory(tmp_path):
    path = tmp_path / "penguins.yaml"
    path.write_text("data: {train: synthetic:classification}\n")
    assert load_config(path).output == "runs/penguins"
    assert load_config(path, ["output=elsewhere"]).output == "elsewhere"
    assert load_config(None, [SYN]).output == "runs/run"


def _key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key path of the config schema (data.train, train.epochs, ...)."""
    paths = []
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            paths += _key_paths(kind, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


KEYS = _key_paths(Config)
VALUES = st.one_of(
    st.sampled_from(
        ["5", "0", "-1", "3e-4", "1e999", ".nan", "-.inf", "null", "true", "[64,32]", "[]", "[[1]]", "{a: 1}",
         "synthetic:classification", "x.csv", "adamw", "auto", "'", "[", "!!python/object:os.system x", ""]
    ),
    st.text(max_size=12),
)  # fmt: skip
OVERRIDE = st.one_of(
    st.tuples(st.sampled_from(KEYS), VALUES).map("=".join),
    st.tuples(
        st.sampled_from(["data", "train", "model", "train.lr.x", "a..b", "", "data.synthetic"]), VALUES
    ).map("=".join),
    st.text(max_size=16),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(OVERRIDE, max_size=6))
def test_any_overrides_give_a_config_or_one_clear_error(overrides):
    """Any KEY=VALUE overrides (every key of the schema, sections, bad paths; numbers, infinities, NaN,
    lists, mappings, broken YAML, YAML tags, any text): a Config, or a DanluError, whose line the CLI
    prints as one line, never another exception; and a Config holds no NaN or infinity (it is written
    to the run as strict JSON)."""
    try:
        config = load_config(None, [SYN, *overrides])
    except DanluError as error:
        assert error.message and "\n" not in printable(str(error))
        return
    json.dumps(config.model_dump(mode="json"), allow_nan=False)


def test_no_key_takes_a_nan_or_an_infinity():
    """Every key of the schema, set to NaN or an infinity (YAML's .nan, .inf, or a number that overflows):
    a DanluError naming it, never a Config holding it (the resolved config is written to the run as
    strict JSON, and an infinite lr or timeout would only fail later)."""
    for key in KEYS:
        for value in (".nan", ".inf", "-.inf", "1e999"):
            try:
                config = load_config(None, [SYN, f"{key}={value}"])
            except DanluError:
                continue
            json.dumps(config.model_dump(mode="json"), allow_nan=False)  # a key that took it as text
