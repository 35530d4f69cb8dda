"""Loading a run never runs code named in its config.yaml unless asked: a run whose model comes from code
(model.target) is refused by serve, predict, evaluate, export, package and the Python API with one line
naming the target and the flag, before anything is imported; with --trust-model-code it works.
Training your own class needs no flag."""

import pytest

import danlu
from danlu.errors import DanluError
from tests.conftest import mixed_frame, run_cli, train_quietly
from tests.e2e.test_serve_process import Server

PAYLOAD = """
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("the run's code ran")
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run trained with the tests' own class (no flag needed to train), and a copy whose config.yaml
    points at a module in its own directory that, when imported, leaves a file behind."""
    root = tmp_path_factory.mktemp("code")
    own = train_quietly(
        root / "own",
        mixed_frame(200),
        "label",
        "train.epochs=1",
        "model.target=tests.custom_models:WithCategoricals",
    )
    hostile = root / "hostile"
    hostile.mkdir()
    for entry in own.path.iterdir():
        if entry.is_file():
            (hostile / entry.name).write_bytes(entry.read_bytes())
    (hostile / "hubconf.py").write_text(PAYLOAD)
    config = (hostile / "config.yaml").read_text()
    (hostile / "config.yaml").write_text(
        config.replace("tests.custom_models:WithCategoricals", "hubconf:load")
    )
    return own.path, hostile


@pytest.mark.parametrize(
    "args",
    [
        ("serve", "RUN", "--port", "1"),
        ("predict", "RUN", "DATA", "-o", "OUT"),
        ("evaluate", "RUN"),
        ("export", "RUN"),
        ("package", "RUN", "--out", "OUT"),
    ],
)
def test_a_run_that_names_code_is_refused_without_the_flag(runs, args, tmp_path):
    _, hostile = runs
    data = tmp_path / "new.csv"
    mixed_frame(5).to_csv(data, index=False)
    argv = [str(hostile) if a == "RUN" else str(data) if a == "DATA" else a for a in args]
    argv = [str(tmp_path / "out.csv") if a == "OUT" and args[0] == "predict" else a for a in argv]
    argv = [str(tmp_path / "pkg") if a == "OUT" else a for a in argv]
    result = run_cli(*argv, cwd=hostile)  # its directory first on the import path, as a user's would be
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.target 'hubconf:load'" in lines[0] and "--trust-model-code" in lines[0]
    assert not (hostile / "IMPORTED").exists()


def test_the_python_api_asks_for_trust_too(runs, monkeypatch):
    own, hostile = runs
    monkeypatch.chdir(hostile)
    with pytest.raises(DanluError, match="trust_model_code=True"):
        danlu.load(hostile)
    with pytest.raises(DanluError, match="trust_model_code=True"):
        danlu.evaluate(hostile)
    assert not (hostile / "IMPORTED").exists()
    assert danlu.load(own, trust_model_code=True).predict(mixed_frame(3)).shape == (3,)


def test_with_the_flag_a_run_with_its_own_class_serves(runs):
    import httpx

    own, _ = runs
    server = Server(own, "--trust-model-code")
    try:
        record = {"x0": 0.1, "x1": -0.2, "color": "green"}
        response = httpx.post(f"{server.url}/v1/predict", json={"records": [record]}, timeout=10)
        assert response.status_code == 200
    finally:
        server.stop()
