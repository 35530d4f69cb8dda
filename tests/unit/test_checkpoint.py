"""Checkpoints: a full round trip, and loading that never unpickles arbitrary objects."""

import pytest
import torch
from torch import nn

from danlu.errors import DanluError
from danlu.training import checkpoint as ckpt


class Payload:
    """An object whose unpickling runs code: weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_round_trip_restores_model_optimizer_rng_and_state(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    path = tmp_path / "last.pt"
    wrapped = nn.Sequential()
    wrapped.module = model  # a DDP-like wrapper: the saved keys must not carry its prefix
    cpu = torch.device("cpu")
    rng = [ckpt.rng_state(cpu)]
    ckpt.save_checkpoint(path, wrapped, optimizer, None, {"epoch": 3, "step": 12}, {"train": {}}, rng)
    expected_next = torch.rand(5)

    state = ckpt.load_checkpoint(path)
    assert set(state[ckpt.MODEL_KEY]) == {"weight", "bias"}
    assert torch.equal(state[ckpt.MODEL_KEY]["weight"], model.weight)
    assert state[ckpt.TRAINER_STATE_KEY] == {"epoch": 3, "step": 12}
    fresh = torch.optim.AdamW(nn.Linear(3, 2).parameters(), lr=0.1)
    fresh.load_state_dict(state[ckpt.OPTIMIZER_KEY])
    assert torch.equal(
        fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    ckpt.set_rng_state(state[ckpt.RNG_KEY], cpu)
    assert torch.equal(torch.rand(5), expected_next)  # the RNG continues where the checkpoint left it
    assert state[ckpt.VERSION_KEY] and state[ckpt.SCHEMA_VERSION_KEY] == 1


def test_a_pickled_object_is_refused_not_run(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"model": Payload()}, f)
    with pytest.raises(DanluError, match="cannot load checkpoint"):
        ckpt.load_checkpoint(path)
    assert "unpickled!" not in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_a_missing_or_damaged_checkpoint_is_one_clear_error(tmp_path, content):
    path = tmp_path / "last.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DanluError, match="no checkpoint" if content is None else "is damaged"):
        ckpt.load_checkpoint(path)


def test_a_cpu_run_never_starts_cuda_where_a_gpu_is_visible(tmp_path, mixed_csv, monkeypatch):
    """On a GPU machine a CPU run (train.device=cpu: gloo ranks, or the CPU chosen on purpose) must leave
    the GPUs alone: a CUDA context in every rank costs GPU memory and was torn down at exit beside
    gloo's threads. Here torch says a GPU is visible and fails any start of CUDA; the run must finish
    and resume without one."""
    import danlu

    def no_cuda(*args, **kwargs):
        raise AssertionError("a CPU run started CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda)
    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    overrides = [f"data.train={mixed_csv}", "data.target=label", "train.device=cpu", "train.epochs=2"]
    run = danlu.train(None, overrides, out=tmp_path / "run", progress=False)
    state = ckpt.load_checkpoint(run.path / "checkpoints" / "last.pt")
    assert set(state[ckpt.RNG_KEY]) == {"torch"}
    ckpt.set_rng_state(
        {**state[ckpt.RNG_KEY], "cuda": [torch.zeros(8, dtype=torch.uint8)]}, torch.device("cpu")
    )
