"""Sharded training of the other families and ZeRO's own checkpoint files, with real torchrun processes:
a text encoder, a causal LM and an image CNN reach one process's weights, and ZeRO's fragments reload in
another number of processes. A file apart from test_sharded.py so that the suite's
two workers can run the two halves at once."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import danlu
from tests.chat_models import tiny_llama
from tests.conftest import ROOT, write_config
from tests.e2e.test_distributed import free_port
from tests.e2e.test_sharded import SGD, largest_difference, train, weights
from tests.images import image_folder
from tests.integration.test_causal_lm import write_conversations
from tests.texts import reviews, tiny_encoder


@pytest.mark.slow
def test_zero_fragments_restore_weights_and_adam_moments_in_another_number_of_processes(tmp_path):
    """ZeRO-2 in fp32, ZeRO-1 in bf16 (DeepSpeed's bf16 optimizer) and ZeRO-3 in fp32, written by 2
    processes and read by 3: the fp32 weights and both Adam moments come back exactly, and three more
    steps (Adam's step count restored too) land where the 2 processes' went on to. ZeRO-3's fp32
    masters are the parameters' own memory (sharding._share_fp32_masters), on both sides."""
    for mode, nproc in (("save", 2), ("load", 3)):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        command += [
            "--master-port",
            str(free_port()),
            str(ROOT / "tests" / "zero_ranks.py"),
            mode,
            str(tmp_path),
        ]
        ran = subprocess.run(
            command, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True
        )
        assert ran.returncode == 0, ran.stderr[-3000:]
    saved, loaded = (json.loads((tmp_path / f"{m}.json").read_text()) for m in ("save", "load"))
    assert saved["zero3_fp32"]["shared"] and loaded["zero3_fp32"]["shared"]
    for case, tolerance in (("zero2_fp32", 1e-6), ("zero1_bf16", 1e-3), ("zero3_fp32", 1e-6)):
        for part in ("weights", "exp_avg", "exp_avg_sq"):
            assert loaded[case][part] == saved[case][part], (case, part)
        after = {k: torch.tensor(v) for k, v in loaded[case]["after"].items()}
        expected = {k: torch.tensor(v) for k, v in saved[case]["after"].items()}
        moved = {k: torch.tensor(v) for k, v in saved[case]["weights"].items()}
        assert largest_difference(after, expected) < tolerance, case
        assert largest_difference(moved, expected) > 10 * tolerance, case  # the steps moved the weights


@pytest.mark.slow
def test_a_text_encoder_and_a_causal_lm_shard_by_layer_to_one_process_weights(tmp_path):
    tiny_encoder(tmp_path / "bert", dropout=0.0)
    reviews(96).to_csv(tmp_path / "r.csv", index=False)
    text = write_config(
        tmp_path / "text.yaml",
        f"data: {{train: {tmp_path / 'r.csv'}, text: review, target: label, max_length: 64}}\n"
        f"model: {{pretrained: {tmp_path / 'bert'}}}\ntrain: {{epochs: 2, batch_size: 16, {SGD}}}\n",
    )
    tiny_llama(tmp_path / "llama")
    write_conversations(tmp_path / "chats.jsonl")
    lm = write_config(
        tmp_path / "lm.yaml",
        f"data: {{train: {tmp_path / 'chats.jsonl'}}}\n"
        f"model: {{pretrained: {tmp_path / 'llama'}, adapter: none}}\n"
        f"train: {{epochs: 2, batch_size: 8, {SGD}}}\n",
    )
    for config in (text, lm):
        name = config.stem
        one = danlu.train(config, out=tmp_path / f"{name}1", progress=False).path
        for strategy in ("fsdp", "deepspeed"):  # ZeRO-3: the parameters sharded too
            run = tmp_path / f"{name}_{strategy}"
            train(config, run, "--nproc", "2", f"train.strategy={strategy}", "train.zero_stage=3")
            assert largest_difference(weights(one), weights(run)) < 1e-5, strategy
            # the consolidated model is written whole for serving, as a one-process run's is
            hf = load_file(run / "hf" / "model.safetensors")
            assert hf.keys() == load_file(one / "hf" / "model.safetensors").keys()


@pytest.mark.slow
def test_an_image_cnn_trains_to_one_process_weights_with_ddp_fsdp_and_deepspeed(tmp_path):
    """With augmentation on: each image's draws depend on the image, not on the rank that loads it. Its
    channels-last convolution weights are made contiguous for sharding. Dropout off: it draws per rank
    by design. In fp32: bf16 rounds each rank's share of a batch differently from the whole batch."""
    config = write_config(
        tmp_path / "img.yaml",
        f"data: {{train: {image_folder(tmp_path / 'imgs', n=90)}, augment: light}}\n"
        "model: {channels: [8, 16], hidden: [32], dropout: 0}\n"
        f"train: {{epochs: 2, batch_size: 16, {SGD}}}\n",
    )
    one = weights(danlu.train(config, out=tmp_path / "one", progress=False).path)
    for strategy in ("ddp", "fsdp", "deepspeed"):  # deepspeed: ZeRO-2, the default stage
        train(config, tmp_path / strategy, "--nproc", "2", f"train.strategy={strategy}")
        assert largest_difference(one, weights(tmp_path / strategy)) < 1e-5, strategy
