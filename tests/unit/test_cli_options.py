"""Options that take a number take a finite one: argparse's float takes nan and inf, which would pass
every range check (a NaN compares false) and reach a timeout, a batching window or a body limit."""

import pytest

from danlu.cli import build_parser

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
