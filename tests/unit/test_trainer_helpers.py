import pytest

from danlu.config import TrainConfig
from danlu.training.trainer import auto_batch_size, improved, lr_at


def test_schedules():
    none, cosine, onecycle = (TrainConfig(schedule=s, lr=1.0) for s in ("none", "cosine", "onecycle"))
    assert [lr_at(s, 100, none) for s in (0, 50, 100)] == [1.0, 1.0, 1.0]
    assert lr_at(0, 100, cosine) == 1.0 and lr_at(50, 100, cosine) == pytest.approx(0.5)
    assert lr_at(100, 100, cosine) == pytest.approx(0.0) and lr_at(150, 100, cosine) == pytest.approx(0.0)
    assert lr_at(0, 100, onecycle) == pytest.approx(0.04) and lr_at(30, 100, onecycle) == pytest.approx(1.0)
    assert lr_at(100, 100, onecycle) == pytest.approx(1e-4)


def test_auto_batch_size():
    assert auto_batch_size(100) == 32
    assert auto_batch_size(8_000) == 128
    assert auto_batch_size(10_000_000) == 1024


def test_improved_direction():
    assert improved(0.5, None, "val_loss")
    assert improved(0.4, 0.5, "val_loss") and not improved(0.6, 0.5, "val_loss")
    assert improved(0.9, 0.8, "val_accuracy") and not improved(0.7, 0.8, "val_r2")
