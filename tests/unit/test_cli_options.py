"""Options that take a number take a finite one: argparse's float takes nan and inf, which would pass
every range check (a NaN compares false) and reach a timeout, a batching window or a body limit; and
the server settings the Python API takes refuse them too."""

import re
import socket

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
        ({"port": 99999}, "--port 99999 is not a port"),  # the system would bind 99999 - 65536
        ({"port": 0}, "--port 0 is not a port"),  # any free port: no address to tell anyone
    ],
)
def test_the_python_apis_server_settings_refuse_what_the_options_refuse(settings, message):
    """The same limits from Python (ServeSettings, as danlu.serve takes them): a NaN fails every
    comparison, so each check is written to fail it too."""
    with pytest.raises(DanluError, match=re.escape(message)):
        ServeSettings(run_dir="runs/x", **settings).check()
    ServeSettings(run_dir="runs/x").check()  # the defaults pass


def test_a_port_in_use_or_a_host_that_is_not_here_is_one_line(tmp_path):
    from danlu.serve.settings import check_address

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DanluError, match=f"port {port} on 127.0.0.1 is in use"):
            check_address("127.0.0.1", port)
        with pytest.raises(DanluError, match=f"port {port} on 0.0.0.0 is in use"):
            check_address("0.0.0.0", port)  # every interface, this one among them
    check_address("127.0.0.1", port)  # free again
    with pytest.raises(DanluError, match=r"cannot listen on nosuch\.invalid:8000: "):
        check_address("nosuch.invalid", 8000)
