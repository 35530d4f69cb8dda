"""How failures inside Ray Train workers reach the user: as danlu's own one-line errors."""

import pytest

from danlu.errors import DanluError
from danlu.training.ray_train import _worker_error

exceptions = pytest.importorskip("ray.train.v2.api.exceptions")


def test_a_workers_danlu_error_comes_back_as_it_was_raised():
    mine = DanluError("target column 'y' not in the data", "available columns: a, b")
    error = exceptions.WorkerGroupError("snippet", {1: mine, 0: RuntimeError("peer gone")})
    assert _worker_error(error) is mine


def test_any_other_worker_failure_is_one_line_naming_its_last_line():
    crash = RuntimeError("Traceback (most recent call last):\n  File x\nValueError: shapes differ\n")
    error = _worker_error(exceptions.WorkerGroupError("snippet", {0: crash}))
    assert isinstance(error, DanluError)
    assert "Ray Train failed: ValueError: shapes differ" in str(error) and "\n" not in str(error)
