"""The torch chat executor on a GPU: decode steps replayed as CUDA graphs give `generate`'s greedy tokens
in float32, alone and in a staggered batch whose rows leave and join (holes, buckets, the cache growing
and the graphs captured again); sampling stays per-request seeded; a capture that fails turns graphs off
with one log line and every answer still arrives. Tiny random models built here: nothing is downloaded.

Skipped where torch sees no CUDA GPU (CI): `make test-gpu` runs them. The CPU half of the same code (the
slot cache, padding to buckets, sampling on tensors) is tested in tests/unit/test_kvcache.py and
tests/integration/test_chat_engine.py."""

import logging
import threading

import pytest
import torch

from danlu.serve.chat.engine import Engine, Sequence
from danlu.serve.chat.model import load_chat_model
from danlu.serve.chat.sampling import SamplingParams
from tests.chat_models import tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = [
    "hello there",
    "the quick brown fox jumps over the lazy dog and keeps on running far away",
    "one two",
    "danlu serves local chat models on the machine you have, streaming text token by token",
    "streaming text arrives",
]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    folder = tiny_llama(tmp_path_factory.mktemp("llm") / "tiny")
    chat = load_chat_model(str(folder), device="cuda", dtype="float32")
    chat.eos_ids = set()
    return chat


def reference(chat, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = chat.model.generate(
            torch.tensor([ids], device="cuda"), max_new_tokens=n, do_sample=False, eos_token_id=None,
            pad_token_id=chat.tokenizer.pad_token_id,
        )  # fmt: skip
    return out[0, len(ids) :].tolist()


def answers(engine: Engine, prompts: list[list[int]], lengths: list[int], seed: int | None = None) -> list:
    """Each prompt's tokens, all submitted at once and generated on this thread; every one must end
    with its full length."""
    done = [threading.Event() for _ in prompts]
    temperature = 0 if seed is None else 1.0
    params = [SamplingParams(max_tokens=n, temperature=temperature, seed=seed) for n in lengths]
    sequences = [
        engine.submit(Sequence(p, q, lambda e, i=i: e.finish_reason and done[i].set()))
        for i, (p, q) in enumerate(zip(prompts, params, strict=True))
    ]
    engine.run(until=lambda: all(d.is_set() for d in done))
    assert [s.finish_reason for s in sequences] == ["length"] * len(prompts)
    return [s.output for s in sequences]


def test_graph_decode_equals_generate_and_rows_leave_and_join(chat):
    ids = [chat.tokenizer(p)["input_ids"] for p in PROMPTS]
    lengths = [6, 150, 20, 140, 40]
    engine = Engine(chat, max_batch=4, prefill_chunk=16)
    engine.executor.cache.grow = 64  # the cache grows twice: the graphs are captured again each time
    assert engine.executor.decode_mode == "cuda graphs"
    captured = []
    real = engine.executor._graph
    cache = engine.executor.cache
    engine.executor._graph = lambda batch: (captured.append((batch, cache.storage)), real(batch))[1]
    got = answers(engine, ids, lengths)
    assert got == [reference(chat, p, n) for p, n in zip(ids, lengths, strict=True)]
    assert engine.executor.graphs_on and engine.executor.decode_mode == "cuda graphs"
    assert {b for b, _ in captured} <= {1, 2, 4} and len({s for _, s in captured}) > 1
    seeded = answers(engine, ids[:2], [12, 12], seed=5)
    assert seeded == answers(engine, ids[:2], [12, 12], seed=5) != answers(engine, ids[:2], [12, 12], seed=6)
    engine.close()


def test_a_failed_capture_decodes_eagerly_with_one_log_line(chat, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("capture refused")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", broken)
    ids = [chat.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    engine = Engine(chat, max_batch=4)
    with caplog.at_level(logging.WARNING, logger="danlu"):
        got = answers(engine, ids, [10, 10, 10])
    assert got == [reference(chat, p, 10) for p in ids]
    assert engine.executor.decode_mode == "eager"
    assert [r.message for r in caplog.records].count(
        "CUDA graphs off: capturing a decode step failed: capture refused"
    ) == 1
    engine.close()


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_quantized_models_decode_with_or_without_graphs(tmp_path, quantize):
    """bitsandbytes' kernels: captured where they allow it, eager otherwise; either way every answer
    arrives whole (their results may depend on the batch, so answers are not compared)."""
    pytest.importorskip("bitsandbytes")
    chat = load_chat_model(str(tiny_llama(tmp_path / "tiny")), device="cuda", quantize=quantize)
    chat.eos_ids = set()
    ids = [chat.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    engine = Engine(chat, max_batch=4)
    got = answers(engine, ids, [12, 12, 12])
    print(f"{quantize}: decode steps {engine.executor.decode_mode}")
    assert all(len(a) == 12 for a in got)
    engine.close()


def test_a_steps_rows_sample_on_the_gpu_as_on_the_cpu():
    """sampling.penalize and sampling.sample on CUDA logits: every row's token is the one the same rows
    give on the CPU with the same uniform numbers (mixed settings in one step, penalties, top-p sets that
    need the CPU's later rounds), for the rows whose uniform number is not within 1e-4 of a boundary between
    two tokens (where the devices' last bits could tip it)."""
    from danlu.serve.chat.sampling import History, penalize, sample

    vocab, rows = 3000, 48
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 2
    settings = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=5, repetition_penalty=1.3),
        SamplingParams(temperature=0.9, top_p=0.8, frequency_penalty=0.5, presence_penalty=0.2),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=2.0, top_p=0.97),  # flat: more than the first candidates
        SamplingParams(temperature=1.0, top_k=300, top_p=0.99),
    ]
    params = [settings[i % len(settings)] for i in range(rows)]
    histories = [History(list(range(i, i + 20)), [7, 7, 100 + i]) for i in range(rows)]
    uniforms = [(i * 0.618) % 1 for i in range(rows)]

    def tokens(device: str, shift: float = 0.0) -> list[int]:
        step = logits.to(device, copy=True)
        assert penalize(step, params, histories) == {}
        return sample(step, params, [min(max(u + shift, 0.0), 0.999999) for u in uniforms])

    on_cpu = tokens("cpu")
    steady = [
        i for i, (low, high) in enumerate(zip(tokens("cpu", -1e-4), tokens("cpu", 1e-4), strict=True))
        if low == on_cpu[i] == high
    ]  # fmt: skip
    assert len(steady) > rows * 0.8
    on_gpu = tokens("cuda")
    assert [on_gpu[i] for i in steady] == [on_cpu[i] for i in steady]


def test_a_cuda_step_reads_back_only_its_tokens_whatever_its_top_p_sets():
    """On CUDA every top-p row's set comes from one sort of its vocabulary: a step whose sets hold
    thousands of tokens (which take the CPU two later rounds) still reads back only its tokens, once,
    and they are the CPU's (rows of equal logits: ties in the vocabulary's order on both)."""
    from danlu.serve.chat.sampling import sample
    from tests.host_reads import HostReads

    logits = torch.zeros(4, 3000)
    logits[:2] = torch.randn(2, 3000, generator=torch.Generator().manual_seed(1)) * 4
    params = [SamplingParams(temperature=1.0, top_p=0.99)] * 4
    uniforms = [0.3, 0.6, 0.5, 0.25]
    on_gpu = logits.cuda()
    with HostReads() as step:
        tokens = sample(on_gpu, params, uniforms)
    assert step.reads == ["tolist"]
    assert tokens == sample(logits, params, uniforms)
    assert tokens[2:] == [1485, 742]  # the first 2,970 tokens, the set of a flat row
