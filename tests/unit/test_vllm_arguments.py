"""How danlu's options become vLLM's engine arguments (no vLLM needed): the KV cache on the CPU is the
size asked for, else 4 GiB or half of what is free, never vLLM's own default (all the memory it may use:
some 20 GiB for a 135M model on this machine, which left no room for a second server), and the memory
vLLM may use is what is free now."""

from pathlib import Path

from danlu.serve.chat.vllm import engine_arguments

GiB = 2**30


def arguments(device: str = "cpu", kv_cache_gb: float | None = None, free_gib: float = 20) -> dict:
    return engine_arguments(
        Path("/m"), "bfloat16", device, None, kv_cache_gb, 1, False, (int(free_gib * GiB), 24 * GiB)
    )


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
