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


def test_step_schedule_matches_torchs_steplr_per_epoch():
    import torch

    step = TrainConfig(schedule="step", lr=1.0, step_gamma=0.7, epochs=4)  # 4 epochs of 25 steps
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    for epoch in range(4):
        for s in range(epoch * 25, epoch * 25 + 25):
            assert lr_at(s, 100, step) == pytest.approx(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()


def test_auto_batch_size():
    assert auto_batch_size(100) == 32
    assert auto_batch_size(8_000) == 128
    assert auto_batch_size(10_000_000) == 1024


def test_improved_direction():
    assert improved(0.5, None, "val_loss")
    assert improved(0.4, 0.5, "val_loss") and not improved(0.6, 0.5, "val_loss")
    assert improved(0.9, 0.8, "val_accuracy") and not improved(0.7, 0.8, "val_r2")
