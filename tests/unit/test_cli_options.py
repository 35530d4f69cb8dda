"""Options that take a number take a finite one: argparse's float takes nan and inf, which would pass
every range check (a NaN compares false) and reach a timeout, a batching window or a body limit; and
the server settings the Python API takes refuse them too."""

import re

import pytest

from danlu.cli import build_parser
from danlu.errors import DanluError
from danlu.serve.settings import ServeSettings

FLOAT_OPTIONS = [
    ["serve", "run", "--timeout"],
    ["serve", "run", "--max-wait-ms"],
    ["serve", "run", "--max-body-mb"],
    ["serve", "run", "--kv-cache-gb"],
    ["chat", "model", "--temperature"],
    ["chat", "model", "--kv-cache-gb"],
    ["export", "run", "--max-metric-drop"],
    ["tune", "c.yaml", "--space", "s.yaml", "--timeout"],
    ["doctor", "--timeout"],
]


@pytest.mark.parametrize("option", FLOAT_OPTIONS, ids=lambda o: f"{o[0]} {o[-1]}")
def test_a_number_option_takes_a_finite_number_and_refuses_nan_and_infinity(option, capsys):
    assert (
        getattr(build_parser().parse_args([*option, "1.5"]), option[-1].lstrip("-").replace("-", "_")) == 1.5
    )
    for text in ("nan", "inf", "-Infinity", "1e999", "many"):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([*option[:-1], f"{option[-1]}={text}"])
        assert exit_.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"argument {option[-1]}: " in error
        assert "is not a finite number" in error or "invalid number value" in error, error


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"timeout_s": float("nan")}, "--timeout must be a finite number of seconds above 0"),
        ({"timeout_s": float("inf")}, "--timeout must be a finite number of seconds above 0"),
        ({"timeout_s": 0}, "--timeout must be a finite number of seconds above 0"),
        ({"max_wait_ms": float("nan")}, "--max-wait-ms must be a finite number, 0 or more"),
        ({"max_wait_ms": -1}, "--max-wait-ms must be a finite number, 0 or more"),
        ({"max_batch": float("nan")}, "max-batch must be at least 1 (and finite)"),
        ({"max_body_bytes": float("inf")}, "--max-body-mb (max_body_bytes) must be at least 1 (and finite)"),
    ],
)
def test_the_python_apis_server_settings_refuse_what_the_options_refuse(settings, message):
    """The same limits from Python (ServeSettings, as danlu.serve takes them): a NaN fails every
    comparison, so each check is written to fail it too."""
    with pytest.raises(DanluError, match=re.escape(message)):
        ServeSettings(run_dir="runs/x", **settings).check()
    ServeSettings(run_dir="runs/x").check()  # the defaults pass
