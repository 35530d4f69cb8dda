"""What train.strategy=fsdp shards and refuses, without starting processes (tests/e2e/test_sharded.py
trains with them)."""

import pytest

from danlu.errors import DanluError
from danlu.families.contract import repeated_blocks
from danlu.training.distributed import World
from danlu.training.sharding import check
from tests.chat_models import tiny_llama
from tests.texts import tiny_encoder


def test_the_blocks_sharded_one_by_one_are_a_transformers_layers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    llama = AutoModelForCausalLM.from_pretrained(tiny_llama(tmp_path / "llama"))
    assert repeated_blocks(llama) == list(llama.model.layers) and len(llama.model.layers) == 2
    bert = AutoModelForSequenceClassification.from_pretrained(tiny_encoder(tmp_path / "bert"))
    assert repeated_blocks(bert) == list(bert.bert.encoder.layer)
    from torch import nn

    assert repeated_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == []  # a small model: sharded whole


def test_what_a_sharded_strategy_refuses_before_training():
    two = World(rank=0, size=2)
    with pytest.raises(DanluError, match="streamed in chunks"):
        check("fsdp", two, uneven=True, precision="fp32")
    with pytest.raises(DanluError, match="fp16 is not supported with train"):
        check("fsdp", two, uneven=False, precision="fp16")
    check("fsdp", World(), uneven=True, precision="fp16")  # one process: nothing is sharded
    check("ddp", two, uneven=True, precision="fp16")  # DDP joins uneven ranks and scales fp16
    check("fsdp", two, uneven=False, precision="bf16")


def test_deepspeed_refuses_one_process_and_names_the_install(monkeypatch):
    with pytest.raises(DanluError, match="trains in several processes; this is one"):
        check("deepspeed", World(), uneven=False, precision="fp32")
    check("deepspeed", World(rank=1, size=2), uneven=False, precision="bf16")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "deepspeed" else real(name))
    with pytest.raises(DanluError) as missing:
        check("deepspeed", World(rank=0, size=2), uneven=False, precision="fp32")
    assert missing.value.hint == "pip install 'danlu[deepspeed]'"


def test_zero_fragments_are_read_across_the_files_of_the_ranks_that_wrote_them(tmp_path):
    """A parameter of 5 elements written by 2 ranks ([0, 3) and [3, 5)) and read as 3 ranks' ranges
    would be; a range no file covers is one line, never zeros."""
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from danlu.training.zero_checkpoint import _Reader

    w = torch.arange(5, dtype=torch.float32)
    save_file(
        {"w": w[:3].clone(), "w::exp_avg": -w[:3]}, str(tmp_path / "a"), {"starts": json.dumps({"w": 0})}
    )
    save_file(
        {"w": w[3:].clone(), "w::exp_avg": -w[3:]}, str(tmp_path / "b"), {"starts": json.dumps({"w": 3})}
    )
    handles = [safe_open(str(tmp_path / name), framework="pt") for name in ("a", "b")]
    reader = _Reader(handles, tmp_path)
    assert reader.read("w", 2, 2).tolist() == [2.0, 3.0]  # across both files
    assert reader.read("w::exp_avg", 0, 5).tolist() == [-0.0, -1.0, -2.0, -3.0, -4.0]
    assert reader.state_keys() == ["exp_avg"]
    with pytest.raises(DanluError, match="lacks part of 'w'"):
        reader.read("w", 4, 2)  # [4, 6): element 5 is in no file
    with pytest.raises(DanluError, match="lacks part of 'v'"):
        reader.read("v", 0, 1)


def test_a_zero_checkpoint_missing_a_ranks_file_is_one_line(tmp_path):
    from danlu.training.zero_checkpoint import _rank_files

    for rank in range(3):
        (tmp_path / f"zero-{rank:05d}-of-00003.safetensors").write_bytes(b"")
    assert [p.name[:10] for p in _rank_files(tmp_path)] == ["zero-00000", "zero-00001", "zero-00002"]
    (tmp_path / "zero-00001-of-00003.safetensors").unlink()  # a rank's file lost
    with pytest.raises(DanluError, match="does not hold one whole ZeRO checkpoint"):
        _rank_files(tmp_path)
    (tmp_path / "zero-00001-of-00002.safetensors").write_bytes(b"")  # another run's count
    with pytest.raises(DanluError, match="does not hold one whole ZeRO checkpoint"):
        _rank_files(tmp_path)
    with pytest.raises(DanluError, match="its files: none"):
        _rank_files(tmp_path / "absent")


IMPORT_DEEPSPEED = """
import sys
from danlu.training.strategies import import_deepspeed
first = sys.argv[1] == "mlflow-first"
if first:
    import mlflow
deepspeed = import_deepspeed()
print("autotuner sees mlflow:", sys.modules["deepspeed.autotuning.autotuner"].has_mlflow)
print("mlflow still loaded:", "mlflow" in sys.modules and sys.modules["mlflow"] is not None)
import mlflow  # a run tracked to MLflow after the model was wrapped
print("mlflow imports after:", hasattr(mlflow, "start_run"))
print("same deepspeed:", import_deepspeed() is deepspeed)
"""


@pytest.mark.parametrize("order", ["deepspeed-first", "mlflow-first"])
def test_deepspeed_is_imported_without_mlflow_and_leaves_mlflow_importable(order):
    """DeepSpeed's autotuner imports MLflow when it is installed (seconds of each rank's start): danlu's
    import holds it back, unless MLflow is already loaded, and MLflow imports normally afterwards. Its
    accelerator warning at import stays off stdout (the lines compared are all there is)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # DeepSpeed guesses, quietly
    command = [sys.executable, "-c", IMPORT_DEEPSPEED, order]
    ran = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    first = order == "mlflow-first"
    assert ran.stdout.splitlines() == [
        f"autotuner sees mlflow: {first}",
        f"mlflow still loaded: {first}",
        "mlflow imports after: True",
        "same deepspeed: True",
    ]


SAVE_MODEL = """
import sys
from pathlib import Path
from transformers import AutoModelForCausalLM
from danlu.hf import save_model
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
save_model(model, Path(sys.argv[2]))
print("deepspeed:", "deepspeed" in sys.modules, "| mlflow:", sys.modules.get("mlflow") is not None)
"""


def test_a_model_is_saved_without_deepspeeds_mlflow_import_or_its_warning(tmp_path):
    """transformers' save_pretrained imports DeepSpeed when it is installed (every causal LM run's end):
    danlu's save imports it first, without MLflow, and stdout stays the caller's."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    command = [sys.executable, "-c", SAVE_MODEL, str(tiny_llama(tmp_path / "llama")), str(tmp_path / "saved")]
    ran = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["deepspeed: True | mlflow: False"]
    assert (tmp_path / "saved" / "model.safetensors").is_file()
