"""How danlu's options become vLLM's engine arguments (no vLLM needed): the KV cache on the CPU is the
size asked for, else 4 GiB or half of what is free, never vLLM's own default (all the memory it may use:
some 20 GiB for a 135M model on this machine, which left no room for a second server), and the memory
vLLM may use is what is free now. A fine-tuned run's LoRA adapter is served over its base model where
vLLM's LoRA can load it, else the merged weights, with the reason."""

import json
from pathlib import Path

import pytest

from danlu.serve.chat.model import run_lora
from danlu.serve.chat.vllm import engine_arguments

GiB = 2**30


def arguments(device: str = "cpu", kv_cache_gb: float | None = None, free_gib: float = 20, lora=None) -> dict:
    memory = (int(free_gib * GiB), 24 * GiB)
    return engine_arguments(Path("/m"), "bfloat16", device, None, kv_cache_gb, 1, False, memory, lora)


def test_the_cpu_kv_cache_is_the_size_asked_for_else_4_gib_or_half_of_what_is_free():
    assert arguments(kv_cache_gb=1.5)["kv_cache_memory_bytes"] == int(1.5 * GiB)
    assert arguments()["kv_cache_memory_bytes"] == 4 * GiB
    assert arguments(free_gib=3)["kv_cache_memory_bytes"] == int(1.5 * GiB)
    assert arguments(free_gib=12)["gpu_memory_utilization"] == 0.45  # 90% of the free share


def test_on_cuda_the_kv_cache_is_vllms_own_unless_asked():
    assert "kv_cache_memory_bytes" not in arguments("cuda")
    assert "gpu_memory_utilization" not in arguments("cuda")
    assert arguments("cuda", kv_cache_gb=8)["kv_cache_memory_bytes"] == 8 * GiB
    assert arguments()["skip_tokenizer_init"] and not arguments()["disable_log_stats"]


def lora_files(tmp_path: Path, base: str, vocab: int = 100, **adapter) -> Path:
    """RUN/hf and RUN/adapter files as a fine-tuned run holds them (configs only)."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 100})
    )
    for folder, config in (
        ("run/hf", {"architectures": ["LlamaForCausalLM"], "vocab_size": vocab}),
        ("run/adapter", {"base_model_name_or_path": base, "r": 12, **adapter}),
    ):
        (tmp_path / folder).mkdir(parents=True)
        name = "config.json" if folder.endswith("hf") else "adapter_config.json"
        (tmp_path / folder / name).write_text(json.dumps(config))
    return tmp_path / "run" / "hf"


def test_a_runs_lora_adapter_is_served_over_its_base_when_vllm_can(tmp_path):
    hf = lora_files(tmp_path, str(tmp_path / "base"))
    lora, why = run_lora(hf)
    assert lora is not None and not why and lora.base == tmp_path / "base" and lora.rank == 12
    served = arguments(lora=lora)
    assert served["enable_lora"] and served["max_lora_rank"] == 16 and served["max_loras"] == 1


@pytest.mark.parametrize(
    ("base", "vocab", "adapter", "reason"),
    [
        ("gone/base", 100, {}, "no local Hugging Face directory"),
        ("BASE", 100, {"modules_to_save": ["embed_tokens"]}, "whole modules"),
        ("BASE", 101, {}, "changed the vocabulary"),
        ("BASE", 100, {"r": 1024}, "outside vLLM's"),
    ],
)
def test_else_the_merged_weights_are_served_and_the_log_says_why(tmp_path, base, vocab, adapter, reason):
    hf = lora_files(tmp_path, base.replace("BASE", str(tmp_path / "base")), vocab, **adapter)
    lora, why = run_lora(hf)
    assert lora is None and reason in why
    assert run_lora(tmp_path / "base") == (None, "")  # no run's: nothing to say
