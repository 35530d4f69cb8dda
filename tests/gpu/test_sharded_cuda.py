"""Sharded training on CUDA (nccl): FSDP and DeepSpeed ZeRO-3 over two GPUs reach one GPU's weights in
fp32 and train in bf16, on a tiny random causal LM. Skipped without two CUDA GPUs (nccl gives each rank
its own): tests/e2e/test_sharded.py runs the same strategies on the CPU over gloo in CI."""

import pytest
import torch
from safetensors.torch import load_file

from tests.chat_models import tiny_llama
from tests.conftest import run_cli, write_config
from tests.integration.test_causal_lm import write_conversations

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_two_gpus_shard_a_causal_lm_to_one_gpus_weights_and_train_in_bf16(tmp_path, strategy):
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    config = write_config(
        tmp_path / "lm.yaml",
        f"data: {{train: {write_conversations(tmp_path / 'chats.jsonl')}}}\n"
        f"model: {{pretrained: {tiny_llama(tmp_path / 'llama')}, adapter: none}}\n"
        "train: {epochs: 2, batch_size: 8, optimizer: sgd, lr: 0.05, device: cuda, zero_stage: 3}\n",
    )
    runs = {}
    for name, args in (
        ("one", ["train.precision=fp32", "train.strategy=ddp"]),
        ("two", ["train.precision=fp32", f"train.strategy={strategy}", "--nproc", "2"]),
        ("bf16", ["train.precision=bf16", f"train.strategy={strategy}", "--nproc", "2"]),
    ):
        done = run_cli("-q", "train", str(config), *args, "--out", str(tmp_path / name), timeout=900)
        assert done.returncode == 0, done.stderr
        runs[name] = load_file(tmp_path / name / "model.safetensors")
    assert all(torch.allclose(runs["one"][k], runs["two"][k], atol=1e-4) for k in runs["one"])
    assert all(torch.isfinite(t).all() for t in runs["bf16"].values())
