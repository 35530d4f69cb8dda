"""danlu.train's own checks before it starts several processes (nproc, backend="ray"), and the config
file it writes for torchrun's processes when given a config object. The processes themselves, started
for real: tests/e2e/test_distributed.py."""

import os
from pathlib import Path

import pytest

import danlu
from danlu.config import Config, as_config, load_config
from danlu.errors import DanluError
from danlu.training import launch as launching
from danlu.training.launch import Launch
from tests.conftest import mixed_frame


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.csv"
    mixed_frame(100).to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backend": "slurm"}, "unknown backend 'slurm'"),
        ({"backend": "ray", "nproc": 2}, "with --backend ray use --workers N"),
        ({"workers": 4}, "--workers, --ray-address and --ray-storage are Ray's"),
        ({"nproc": 2, "ray_address": "head:6379"}, "--workers, --ray-address and --ray-storage are Ray's"),
        ({"nnodes": 2}, "--nnodes and --max-restarts go with --nproc"),
        ({"max_restarts": 1}, "--nnodes and --max-restarts go with --nproc"),
        ({"nproc": 0}, "--nproc must be at least 1"),
        ({"backend": "ray", "workers": 0}, "--workers must be at least 1"),
        ({"nproc": 2, "nnodes": 2}, "--nnodes 2 needs --master-addr"),
        ({"nproc": 2, "train.batch_size": 63}, "does not divide"),
        ({"nproc": 2, "on_epoch": print}, "nproc's or Ray's processes cannot call it"),
    ],
)
def test_what_every_process_would_fail_on_is_one_error_before_any_starts(data, tmp_path, options, message):
    options = dict(options)
    batch = options.pop("train.batch_size", 64)
    config = {"data": {"train": data, "target": "label"}, "train": {"epochs": 1, "batch_size": batch}}
    with pytest.raises(DanluError, match=message):
        danlu.train(config, out=tmp_path / "run", progress=False, **options)
    assert not (tmp_path / "run").exists()


def test_a_rank_cannot_start_processes_of_its_own(data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DanluError, match="already one of a run's processes"):
        danlu.train({"data": {"train": data, "target": "label"}}, out=tmp_path / "run", nproc=2)


def test_resume_in_processes_takes_the_run_alone(data, tmp_path):
    with pytest.raises(DanluError, match="resume takes no config"):
        danlu.train({"data": {"train": data}}, resume=tmp_path, nproc=2)


def test_a_config_object_reaches_the_processes_as_a_file_with_only_its_set_keys(data, tmp_path):
    """Unset keys stay out of the file, so each process fills in its family's defaults as one process
    does; the output is written in (a file's name would otherwise name the run), and the file goes."""
    config = as_config(
        Config.model_validate({"data": {"train": data, "target": "label"}}), ["train.epochs=3"]
    )
    with launching._config_file(config, None, None) as path:
        written = Path(path).read_text()
        assert load_config(path) == config
    assert not os.path.exists(path)
    assert "output: runs/run" in written and "lr:" not in written and "epochs: 3" in written
    with launching._config_file(config, "given.yaml", None) as path:
        assert path == "given.yaml"  # a file given stays the file (its overrides go beside it)
    with launching._config_file(config, None, "runs/stopped") as path:
        assert path is None  # a resumed run trains its own config.yaml


def test_the_cli_flags_are_the_launch_fields():
    from danlu.cli import build_parser
    from danlu.cli.train import _launch

    args = build_parser().parse_args(["train", "c.yaml", "--nproc", "2", "--master-port", "1234"])
    assert _launch(args) == Launch(nproc=2, master_port=1234)
    args = build_parser().parse_args(["train", "c.yaml", "--backend", "ray", "--workers", "3"])
    assert _launch(args) == Launch(backend="ray", workers=3)
