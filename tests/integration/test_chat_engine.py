"""The continuous-batching engine on a tiny random Llama: greedy output equals `model.generate`, alone
and in a batch of prompts of different lengths joining at different steps; chunked prefill; streaming
equals the whole text; per-request seeds; cancelling frees the slot."""

import threading
import time

import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from danlu.errors import DanluError
from danlu.serve.chat.engine import Engine, Sequence
from danlu.serve.chat.executor import Chunk, Packed, PackedLinear, TorchExecutor
from danlu.serve.chat.kvcache import bytes_per_token
from danlu.serve.chat.model import load_chat_model
from danlu.serve.chat.sampling import SamplingParams
from danlu.serve.chat.templates import Template
from tests.chat_models import tiny_llama
from tests.e2e.test_chat_server import wait_until

# the largest gap between a reference's best logit and the token an engine chose instead that counts as a
# tie of the two: llama.cpp's tiny test model parted from its reference at gaps of 0 and 2.7e-5 in 450
# arrival schedules (sums in another order), where another token's gap is 2 to 8 (a wrong position or
# another sequence's cache moves the logits by that much)
TIE = 1e-3

PROMPTS = [
    "hello there",
    "the quick brown fox jumps over the lazy dog and keeps on running far away",
    "one two",
    "danlu serves local chat models on the machine you have, streaming text token by token",
]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return load_chat_model(str(tiny_llama(tmp_path_factory.mktemp("llm") / "tiny")))


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """The first layer with a sliding window of 6 positions, the second without."""
    folder = tmp_path_factory.mktemp("llm") / "windowed"
    return load_chat_model(
        str(tiny_llama(folder, arch="qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=1))
    )


def reference(chat, prompt_ids, max_tokens, **options):
    with torch.inference_mode():
        out = chat.model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=chat.tokenizer.pad_token_id,
            **options,
        )
    return out[0, len(prompt_ids) :].tolist()


def run_all(engine, prompts, params, stagger: int = 0, steps: list | None = None) -> list[Sequence]:
    """Submit every prompt, each once the engine has taken `stagger` more steps (counted in `steps`, which
    its on_step appends to), so later ones join a running batch; wait for all."""
    done = [threading.Event() for _ in prompts]
    sequences = []
    for i, ids in enumerate(prompts):
        if i and stagger:
            target = len(steps) + stagger
            deadline = time.monotonic() + 30
            while len(steps) < target and time.monotonic() < deadline:
                time.sleep(0.0005)
        sequence = Sequence(ids, params, lambda e, i=i: e.finish_reason and done[i].set())
        sequence.texts = []
        sequence.emit = lambda e, i=i, s=sequence: (s.texts.append(e.text), e.finish_reason and done[i].set())
        sequences.append(engine.submit(sequence))
    assert all(d.wait(60) for d in done)
    return sequences


def greedy_answers(engine, work: list[tuple[list[int], int]]) -> list[Sequence]:
    """Every (prompt ids, max_tokens) submitted at once, greedy, to the engine running in its thread."""
    done = [threading.Event() for _ in work]
    engine.start()
    try:
        sequences = [
            engine.submit(
                Sequence(
                    p,
                    SamplingParams(max_tokens=n, temperature=0),
                    lambda e, i=i: e.finish_reason and done[i].set(),
                )
            )
            for i, (p, n) in enumerate(work)
        ]
        assert all(d.wait(120) for d in done)
    finally:
        engine.stop()
    return sequences


def check_alone_and_together(
    chat, ids: list[list[int]], expected: list[list[int]], stagger: int, repetition_penalty: float = 1.0
) -> None:
    """Greedy, 24 tokens: each prompt alone, then all four in one batch (joining `stagger` steps apart,
    prefilled 8 tokens a step), give the expected tokens, and the streamed text is their decoding."""
    chat.eos_ids = set()  # run every sequence to max_tokens, as generate(eos_token_id=None) does
    params = SamplingParams(max_tokens=24, temperature=0.0, repetition_penalty=repetition_penalty)
    widest = []
    engine = Engine(
        chat, max_batch=4, prefill_chunk=8, on_step=lambda running, waiting: widest.append(running)
    )
    engine.start()
    try:
        alone = [run_all(engine, [p], params)[0] for p in ids]
        together = run_all(engine, ids, params, stagger, widest)
    finally:
        engine.stop()
    assert max(widest) == 4  # the four sequences really decoded together
    assert [s.output for s in alone] == expected
    assert [s.output for s in together] == expected  # padding and batching change no token
    text = [chat.tokenizer.decode(e, skip_special_tokens=True) for e in expected]
    assert ["".join(s.texts) for s in together] == text
    assert all(s.finish_reason == "length" for s in together)


@pytest.mark.parametrize("stagger", [0, 3])
def test_greedy_equals_generate_alone_and_in_a_batch(chat, stagger):
    ids = [chat.tokenizer(p)["input_ids"] for p in PROMPTS]
    check_alone_and_together(chat, ids, [reference(chat, p, 24) for p in ids], stagger)


def test_a_repetition_penalty_alone_and_in_a_batch_equals_generates(chat):
    """Each row's penalty reads the history its sequence keeps as it grows (prompt and output, Hugging
    Face's definition): generate(repetition_penalty=1.5)'s tokens, alone and joining a running batch."""
    ids = [chat.tokenizer(p)["input_ids"] for p in PROMPTS]
    expected = [reference(chat, p, 24, repetition_penalty=1.5) for p in ids]
    assert expected != [reference(chat, p, 24) for p in ids]  # the penalty changes the answers
    check_alone_and_together(chat, ids, expected, stagger=3, repetition_penalty=1.5)


def check_seeds_and_stops(engine, prompt: list[int]) -> None:
    """A seed reproduces its sample and another seed does not; a stop string cuts the greedy text
    before it, with finish_reason stop."""
    sampled = SamplingParams(max_tokens=30, temperature=1.0, seed=11)
    first = "".join(e.text for e in engine.generate(prompt, sampled))
    second = "".join(e.text for e in engine.generate(prompt, sampled))
    other = "".join(
        e.text for e in engine.generate(prompt, SamplingParams(max_tokens=30, temperature=1.0, seed=12))
    )
    assert first == second and first != other
    whole = "".join(e.text for e in engine.generate(prompt, SamplingParams(max_tokens=30, temperature=0)))
    stop = whole[8:11]
    events = list(engine.generate(prompt, SamplingParams(max_tokens=30, temperature=0, stop=[stop])))
    assert "".join(e.text for e in events) == whole[: whole.index(stop)]
    assert events[-1].finish_reason == "stop"


def check_cancel(engine, prompt: list[int], while_running=lambda: None) -> None:
    """A long generation cancelled once it has a few tokens ends as cancelled and leaves the engine
    empty; while_running() runs just before the cancel."""
    finished = threading.Event()
    long = Sequence(
        prompt,
        SamplingParams(max_tokens=200, temperature=0),
        lambda e: e.finish_reason and finished.set(),
    )
    engine.submit(long)
    deadline = time.monotonic() + 10
    while len(long.output) < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    while_running()
    long.cancel()
    assert finished.wait(10) and long.finish_reason == "cancelled" and len(long.output) < 200
    time.sleep(0.1)
    assert engine.load == (0, 0)


def test_stop_strings_seeds_and_cancel(chat):
    chat.eos_ids = set()
    engine = Engine(chat, max_batch=2)
    engine.start()
    try:
        prompt = chat.tokenizer("hello there")["input_ids"]
        check_seeds_and_stops(engine, prompt)
        check_cancel(engine, prompt)
    finally:
        engine.stop()


def test_eos_ends_with_stop_and_the_template_renders(chat, tmp_path):
    engine = Engine(chat, max_batch=1)
    chat.eos_ids = {chat.tokenizer.eos_token_id}
    template = Template(chat.tokenizer)
    engine.start()
    try:
        ids = template.encode(template.render([{"role": "user", "content": "hi"}]))
        events = list(engine.generate(ids, SamplingParams(max_tokens=200, temperature=0)))
        assert events[-1].finish_reason in ("stop", "length")
    finally:
        engine.stop()


def test_a_failure_in_one_sequence_ends_that_sequence_only(chat, monkeypatch):
    """Penalties that fail for one request (at its first token, in prefill, or later, in a shared decode
    step) end that request with an error; the others in the batch finish as generate() would."""
    from danlu.serve.chat import output as output_module

    chat.eos_ids = set()
    real, calls = output_module.penalize, {"late": 0}

    def flaky(logits, params, histories):
        failed = real(logits, params, histories)
        for i, p in enumerate(params):
            if p.seed == 13:  # fails at once
                failed[i] = RuntimeError("boom at the first token")
            if p.seed == 14:
                calls["late"] += 1
                if calls["late"] > 5:  # fails inside a decode step with the others
                    failed[i] = RuntimeError("boom in a decode step")
        return failed

    monkeypatch.setattr(output_module, "penalize", flaky)
    ids = [chat.tokenizer(p)["input_ids"] for p in PROMPTS]
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    first, later = (
        SamplingParams(max_tokens=16, temperature=1.0, seed=s, repetition_penalty=1.1) for s in (13, 14)
    )
    engine = Engine(chat, max_batch=4)
    engine.start()
    try:
        done = [threading.Event() for _ in range(4)]
        sequences = [
            engine.submit(Sequence(p, params, lambda e, i=i: e.finish_reason and done[i].set()))
            for i, (p, params) in enumerate(zip(ids, [greedy, first, greedy, later], strict=True))
        ]
        assert all(d.wait(60) for d in done)
    finally:
        engine.stop()
    assert [s.finish_reason for s in sequences] == ["length", "error", "length", "error"]
    assert len(sequences[3].output) == 5  # it ran, then failed alone
    for i in (0, 2):
        assert sequences[i].output == reference(chat, ids[i], 16)


def test_the_token_budget_admits_only_what_fits_and_the_rest_waits(chat):
    """max_batch_tokens bounds rows x the longest prompt + max_tokens: with room for two, four requests
    run two at a time (the others wait, never failing), each still generate()'s answer."""
    chat.eos_ids = set()
    ids = [chat.tokenizer(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    longest = max(len(p) for p in ids) + 16
    running, usage = [], []

    def on_step(r: int, w: int) -> None:
        running.append(r)
        usage.append(engine.kv_usage)

    engine = Engine(chat, max_batch=4, max_batch_tokens=2 * longest, on_step=on_step)
    engine.start()
    try:
        sequences = run_all(engine, ids, params)
        with pytest.raises(DanluError, match="max_batch_tokens"):  # could never fit: refused at once
            engine.submit(Sequence(ids[1], SamplingParams(max_tokens=3 * longest), print))
    finally:
        engine.stop()
    assert max(running) == 2
    # the cache tokens two running sequences hold, over the budget; nothing once all are done
    assert 0.5 < max(usage) <= 1 and engine.kv_usage == 0
    assert [s.output for s in sequences] == [reference(chat, p, 16) for p in ids]


def test_the_cache_never_holds_more_than_the_budget_after_a_long_answer(chat):
    """A long answer beside short ones, then a burst of short ones once it is done: the cache grown for
    the long one is cut back for the wider batch (4 rows x its cap would be twice the budget), so
    it never holds more than max_batch_tokens positions, and every answer is still generate()'s."""
    chat.eos_ids = set()
    ids = [chat.tokenizer(p)["input_ids"] for p in PROMPTS]
    long_answer = chat.context  # its prompt and answer fill the model's context
    budget = 2 * long_answer + 20  # the long one and one short one beside it
    shapes = []  # (rows, cap, positions) after every step

    def on_step(r: int, w: int) -> None:
        cache = engine.executor.cache
        shapes.append((cache.rows, cache.cap, cache.positions))

    engine = Engine(chat, max_batch=4, max_batch_tokens=budget, on_step=on_step)
    work = [(ids[1], long_answer - len(ids[1]))] + [(ids[i % 4], 20) for i in range(24)]
    sequences = greedy_answers(engine, work)
    assert max(positions for _, _, positions in shapes) <= budget
    assert max(cap for _, cap, _ in shapes) >= long_answer  # grown for the long one
    assert max(rows for rows, _, _ in shapes) == 4  # and four rows after it: cut back in between
    references = {(tuple(p), n): reference(chat, p, n) for p, n in work}
    assert [s.output for s in sequences] == [references[tuple(p), n] for p, n in work]


@pytest.mark.parametrize("pad", [False, True])
def test_sequences_leave_and_join_around_running_rows(chat, pad):
    """Six requests of different lengths through four slots: early ones leave from between running ones
    (the last row moves into their place), later ones take the freed rows (old keys still there past
    what they write) and prefill 8 tokens a step while the others decode, their rows holes of the decode
    step; every answer is still generate()'s. pad: decode batches padded to their bucket, as for CUDA
    graphs (the rows past the last running one are holes)."""
    chat.eos_ids = set()
    ids = [chat.tokenizer(p)["input_ids"] for p in PROMPTS + PROMPTS[:2]]
    lengths = [4, 30, 8, 26, 12, 20]
    running = []
    engine = Engine(chat, max_batch=4, prefill_chunk=8, on_step=lambda r, w: running.append(r))
    engine.executor.pad = pad
    batches = []
    decode = engine.executor._decode_pass
    engine.executor._decode_pass = lambda inputs, w: (batches.append(inputs.shape[1]), decode(inputs, w))[1]
    sequences = greedy_answers(engine, list(zip(ids, lengths, strict=True)))
    assert max(running) == 4
    assert [s.output for s in sequences] == [reference(chat, p, n) for p, n in zip(ids, lengths, strict=True)]
    assert set(batches) <= {1, 2, 3, 4} and 4 in batches and (3 in batches) != pad  # 3 rows pad to 4


@pytest.mark.parametrize(
    ("arch", "window"),
    [
        ("mistral", {"sliding_window": 6}),  # every layer slides
        ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),  # one of two
    ],
)
def test_sliding_window_models_equal_generate(tmp_path, arch, window):
    """Sliding-window attention (all layers, or some) sees only its window of the cache, as generate's own
    masks do: 24 tokens from prompts longer than the window, alone and together."""
    chat = load_chat_model(str(tiny_llama(tmp_path / arch, arch=arch, **window)))
    ids = [chat.tokenizer(p)["input_ids"] for p in PROMPTS]
    expected = [reference(chat, p, 24) for p in ids]
    check_alone_and_together(chat, ids, expected, stagger=2)
    unbounded = load_chat_model(str(tiny_llama(tmp_path / "plain", arch=arch)))  # same weights, no window
    assert [reference(unbounded, p, 24) for p in ids] != expected  # the window really changes answers


def test_the_engine_computes_through_packed_layers_and_generate_does_not(chat, monkeypatch):
    calls = []
    packed_call = PackedLinear.__call__
    monkeypatch.setattr(
        PackedLinear,
        "__call__",
        lambda self, h: (calls.append((self.linear, h.shape)), packed_call(self, h))[1],
    )
    ids = [chat.tokenizer(p)["input_ids"] for p in PROMPTS]
    expected = [reference(chat, p, 24) for p in ids]
    assert calls == []  # generate on the same model object: its own Linear layers
    check_alone_and_together(chat, ids, expected, stagger=0)
    linears = [m for m in chat.model.modules() if isinstance(m, torch.nn.Linear)]
    assert {layer for layer, _ in calls} == set(linears)  # every one, the vocabulary projection too
    head = [shape for layer, shape in calls if layer is chat.model.lm_head]
    assert any(shape[0] == 4 and shape[1] == 1 for shape in head)  # a decode step of four rows
    assert any(shape[1] == 1 and shape[0] < 4 for shape in head)  # prompts: the last position only
    assert all("forward" not in vars(m) for m in linears)  # the model is left as it was


def test_packed_layers_are_swapped_back_when_a_pass_fails_and_skipped_where_they_cannot_apply(chat):
    packed = Packed.of(chat.model)
    linears = [m for m in chat.model.modules() if isinstance(m, torch.nn.Linear)]
    assert packed is not None and packed.every and len(packed.layers) == len(linears)
    assert packed.nbytes == sum(m.weight.nbytes for m in linears)
    hidden = torch.randn(2, 1, chat.model.config.hidden_size)
    with torch.inference_mode():
        plain = chat.model.lm_head(hidden)
        with pytest.raises(ValueError), packed.swapped():
            assert torch.allclose(chat.model.lm_head(hidden), plain, rtol=1e-4, atol=1e-4)
            assert all(isinstance(vars(m)["forward"], PackedLinear) for m in linears)
            raise ValueError("a failed pass")
        assert torch.equal(chat.model.lm_head(hidden), plain)
        assert all("forward" not in vars(m) for m in linears)

    # not room for every copy: the vocabulary projection alone, always
    for room in (sum(m.weight.nbytes for m in linears) - 1, 0):
        head_only = Packed.of(chat.model, room=room)
        assert not head_only.every and [p.linear for p in head_only.layers] == [chat.model.lm_head]

    class Model(torch.nn.Module):
        def __init__(self, head, *others):
            super().__init__()
            self.head, self.others = head, torch.nn.ModuleList(others)

        def get_output_embeddings(self):
            return self.head

    class QuantizedLinear(torch.nn.Linear):
        pass

    wrapped = torch.nn.Linear(8, 16)
    wrapped.forward = lambda x: x  # as accelerate's offloading hooks wrap a module
    inner = torch.nn.Linear(8, 8)
    for other in (torch.nn.Linear(8, 16, dtype=torch.bfloat16), QuantizedLinear(8, 16), wrapped):
        assert Packed.of(Model(other)) is None
        mixed = Packed.of(Model(other, inner))  # the layers that can be packed are
        assert [p.linear for p in mixed.layers] == [inner] and mixed.every


def test_the_executor_packs_what_memory_leaves_room_for(chat, tmp_path, monkeypatch):
    """Every layer where their copies fit in half of what the process can still take once the KV budget
    is counted, else the vocabulary projection alone. A container's cgroup limit counts (v2 files first,
    then v1), not only the memory the host reports; the data budget is sized by the same room."""
    from danlu.config import DataConfig
    from danlu.data.split import memory_budget
    from danlu.env import probes as module

    linears = sum(m.weight.nbytes for m in chat.model.modules() if isinstance(m, torch.nn.Linear))
    head = chat.model.lm_head.weight.nbytes
    per_token = bytes_per_token(chat.model.config, torch.float32)
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    monkeypatch.setattr(module, "CGROUP_MEMORY", ((str(limit), str(usage)), ("/nonexistent", "/nonexistent")))
    usage.write_text("1000000\n")
    for room, every in [(2 * linears, True), (2 * linears - 2, False), (0, False)]:
        limit.write_text(f"{1_000_000 + room + 100 * per_token}\n")
        assert module.memory_room() == room + 100 * per_token
        assert memory_budget(DataConfig(train="data.csv")) == (room + 100 * per_token) // 4
        executor = TorchExecutor(chat.model, "cpu", max_batch=4, max_batch_tokens=100)
        assert executor.packed.every == every
        assert executor.packed_bytes == (linears if every else head)
    limit.write_text("1000\n")  # over the limit already: no room, still the vocabulary projection
    assert module.memory_room() == 0
    limit.write_text("max\n")  # no limit: the memory available, as psutil reports it
    assert 0 < module.memory_room() <= psutil.virtual_memory().total
    monkeypatch.setattr(module, "CGROUP_MEMORY", (("/nonexistent", "/nonexistent"),))
    assert 0 < module.memory_room() <= psutil.virtual_memory().total


def test_the_cache_grows_by_batch_buckets_as_prompts_arrive_one_by_one(chat):
    executor = TorchExecutor(chat.model, "cpu", max_batch=6, max_batch_tokens=4096)
    ids = chat.tokenizer(PROMPTS[0])["input_ids"]
    rows, storages = [], []
    for slot in range(6):  # one prompt a step, each in the next slot (logits=False: none decodes yet)
        assert executor.forward([Chunk(slot, ids, 0, False)]) == [None]
        rows.append(executor.cache.rows)
        storages.append(executor.cache.storage)
    assert rows == [1, 2, 4, 4, 6, 6]  # buckets, and --max-batch the last
    assert storages == [1, 2, 3, 3, 4, 4]  # reallocated at a new bucket only
    executor.close()


def test_attention_the_cache_cannot_serve_is_refused_at_once(chat, monkeypatch):
    monkeypatch.setattr(
        chat.model.config, "layer_types", ["linear_attention", "full_attention"], raising=False
    )
    with pytest.raises(DanluError, match="linear_attention"):
        Engine(chat, max_batch=2)


def test_prompts_prefill_together_and_a_bad_one_fails_alone(chat):
    """Prompts admitted in one step are prefilled in shared passes, left-padded (answers still generate()'s);
    a prompt whose pass fails (a token the vocabulary lacks) is retried alone, so it alone fails."""
    chat.eos_ids = set()
    ids = [chat.tokenizer(p)["input_ids"] for p in PROMPTS]
    bad = [5, 6, len(chat.tokenizer) + 50]
    groups = []
    engine = Engine(chat, max_batch=5)
    prefill = engine.executor._prefill_pass
    engine.executor._prefill_pass = lambda group: (groups.append(len(group)), prefill(group))[1]
    params = SamplingParams(max_tokens=12, temperature=0)
    done = [threading.Event() for _ in range(5)]
    sequences = [
        engine.submit(Sequence(p, params, lambda e, i=i: e.finish_reason and done[i].set()))
        for i, p in enumerate([*ids[:2], bad, *ids[2:]])
    ]
    engine.run(until=lambda: all(d.is_set() for d in done))
    assert max(groups) > 1  # some prompts shared a pass
    assert [s.finish_reason for s in sequences] == ["length", "length", "error", "length", "length"]
    good = [s for s in sequences if s.finish_reason == "length"]
    assert [s.output for s in good] == [reference(chat, p, 12) for p in ids]


def check_shared_system_turn(chat, system: str, expected_for, stagger: int, tokens: int, common_over: int):
    """Four conversations with one long system turn, arriving together and later: the later ones start
    from the cells an earlier one holds (a step's wait when they arrive together), so the shared turn is
    computed once, and every answer is expected_for(prompt, tokens)'s; cancelling the sequence whose cells
    were shared leaves the others' answers whole."""
    chat.eos_ids = set()
    template = Template(chat.tokenizer)
    ids = [
        template.encode_messages([{"role": "system", "content": system}, {"role": "user", "content": q}])
        for q in ("hello there", "one two three", "the quick brown fox", "how are you today?")
    ]
    common = next(i for i, t in enumerate(zip(*ids, strict=False)) if len(set(t)) > 1)
    assert common > common_over  # the shared part: the system turn
    expected = [expected_for(p, tokens) for p in ids]
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    steps = []
    engine = Engine(chat, max_batch=4, on_step=lambda r, w: steps.append(r))
    engine.start()
    try:
        together = run_all(engine, ids, params)
        assert engine.shared_tokens >= 3 * common  # the three later ones took the system turn's cells
        staggered = run_all(engine, ids, params, stagger, steps)
        first = Sequence(ids[0], SamplingParams(max_tokens=200, temperature=0.0), lambda e: None)
        engine.submit(first)
        assert wait_until(lambda: len(first.output) >= 3)
        shared_before = engine.shared_tokens
        done = threading.Event()
        second = engine.submit(Sequence(ids[1], params, lambda e: e.finish_reason and done.set()))
        assert wait_until(lambda: second.computed > common)
        first.cancel()  # the cells' first owner leaves; the sharer keeps them
        assert done.wait(30)
    finally:
        engine.stop()
    assert [s.output for s in together] == expected
    assert [s.output for s in staggered] == expected
    assert engine.shared_tokens - shared_before >= common and second.output == expected[1]


def test_prompts_with_one_system_turn_share_its_cells_and_answer_as_generate(chat):
    """Under torch the shared positions are copied into the new sequence's own row."""
    system = "danlu serves local chat models on the machine you have, streaming text token by token"
    check_shared_system_turn(chat, system, lambda p, n: reference(chat, p, n), 3, tokens=16, common_over=16)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["step", "step", "join", "join", "share", "leave"]),
            st.integers(1, 12),  # a prompt's length, and which sequence leaves or is shared from
            st.integers(1, 8),  # the prompt's chunk size
        ),
        min_size=10,
        max_size=50,
    ),
    st.booleans(),
    st.integers(0, 2**31),
)
@pytest.mark.parametrize("model", ["chat", "windowed"])
def test_any_joins_shares_and_leaves_give_each_sequence_its_own_logits(request, model, actions, pad, seed):
    """Sequences join (their prompts prefilled in chunks, or starting from a copy of another's first
    positions), decode and leave in any order, in a cache that grows 8 positions at a time within a
    budget it must cut back to, with decode batches padded to their bucket or not: every logits row the
    executor gives is the one a fresh forward pass of that sequence's tokens gives (also for a model
    with a sliding window in one of its two layers)."""
    chat = request.getfixturevalue(model)
    vocab, longest = chat.model.config.vocab_size, 30
    rng = torch.Generator().manual_seed(seed)
    executor = TorchExecutor(chat.model, "cpu", max_batch=4, max_batch_tokens=100)  # 4 rows: under 32 each
    executor.pad, executor.cache.grow = pad, 8
    tokens: dict[int, list[int]] = {}  # slot -> its prompt, then one more token a decode step
    held: dict[int, int] = {}  # slot -> the positions its cache holds
    chunk_of: dict[int, int] = {}
    for action, number, chunk in actions:
        slots = sorted(tokens)
        free = [s for s in range(4) if s not in tokens]
        if action in ("join", "share") and free:
            slot, prompt = free[0], torch.randint(vocab, (number,), generator=rng).tolist()
            tokens[slot], held[slot], chunk_of[slot] = prompt, 0, chunk
            sources = [s for s in slots if held[s]]
            if action == "share" and sources:
                source = sources[number % len(sources)]
                shared = 1 + number % held[source]
                executor.share(source, slot, shared)
                tokens[slot], held[slot] = tokens[source][:shared] + prompt, shared
        elif action == "leave" and slots:
            slot = slots[number % len(slots)]
            executor.free(slot)
            del tokens[slot], held[slot]
        chunks = []
        for slot in sorted(tokens):
            start = held[slot]
            if start < len(tokens[slot]):  # the prompt's next chunk; the logits with its last
                part = tokens[slot][start : start + chunk_of[slot]]
                chunks.append(Chunk(slot, part, start, logits=start + len(part) == len(tokens[slot])))
            else:  # decoding: one more token
                part = torch.randint(vocab, (1,), generator=rng).tolist()
                tokens[slot].append(part[0])
                chunks.append(Chunk(slot, part, start, logits=True))
            held[slot] += len(part)
        results = executor.forward(chunks) if chunks else []
        with torch.inference_mode():
            for c, got in zip(chunks, results, strict=True):
                if not c.logits:
                    assert got is None
                    continue
                want = chat.model(torch.tensor([tokens[c.slot][: held[c.slot]]])).logits[0, -1]
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for slot in [s for s in tokens if len(tokens[s]) >= longest]:  # as long as they may be: done
            executor.free(slot)
            del tokens[slot], held[slot]
    executor.close()


def requests(rest=(1, 10), tokens=(1, 16), cancel: int = 20) -> st.SearchStrategy:
    """Requests for check_arrivals: whether the prompt starts with the shared system prompt, how many
    tokens follow it (within rest), max_tokens (within tokens), the engine loop it is submitted after
    and how many loops after that it is cancelled (up to cancel; None: never)."""
    return st.tuples(
        st.booleans(),
        st.integers(*rest),
        st.integers(*tokens),
        st.integers(0, 12),
        st.one_of(st.none(), st.integers(0, cancel)),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(requests(), min_size=1, max_size=6),
    st.integers(1, 4),
    st.sampled_from([4, 16, 512]),
    st.sampled_from([None, 64]),
    st.integers(0, 2**31),
)
def test_any_arrivals_and_cancellations_answer_as_generate(chat, work, max_batch, chunk, budget, seed):
    """Requests arrive and are cancelled at any steps, with prompts that share a system prompt or not,
    in an engine of any max_batch, prefill chunk and cache budget (64 tokens: some wait to be admitted):
    every request not cancelled ends with generate()'s greedy tokens, a cancelled one with the first
    of them, and the engine holds no slot and no cache row at the end."""
    engine = Engine(chat, max_batch=max_batch, prefill_chunk=chunk, max_batch_tokens=budget)
    check_arrivals(engine, work, seed, lambda prompt, n: reference(chat, prompt, n))
    assert engine.executor.row_of == {}
    engine.close()


def check_arrivals(engine: Engine, work: list[tuple], seed: int, expected_for, tie=None) -> None:
    """Run requests() in the engine, each submitted and cancelled at its engine loops (at once where the
    engine is idle), greedy, end of turn ignored. Their prompts: random tokens (no special ones:
    generate() would take the pad token in a prompt for padding), after a shared system prompt or not.
    Each request not cancelled ends with expected_for(prompt, max_tokens), a cancelled one with the
    first of them; no slot is held at the end.

    tie(tokens, token) -> the gap between the reference's best logit after TOKENS and TOKEN's, for an
    engine whose float sums may differ from its reference by rounding (llama.cpp's attention sums over a
    sequence's cells, which preemption and cancellation scatter): the answers may then part where the
    reference's two best tokens are within TIE of each other, and only there."""
    engine.chat.eos_ids = set()
    rng = torch.Generator().manual_seed(seed)
    vocab = len(engine.chat.tokenizer)
    system = torch.randint(3, vocab, (18,), generator=torch.Generator().manual_seed(0)).tolist()
    prompts = [
        (system if shared else []) + torch.randint(3, vocab, (rest,), generator=rng).tolist()
        for shared, rest, *_ in work
    ]
    sequences = [
        Sequence(p, SamplingParams(max_tokens=r[2], temperature=0), lambda event: None)
        for p, r in zip(prompts, work, strict=True)
    ]
    loops, submitted = 0, {}  # request -> the loop it was submitted in

    def until() -> bool:  # each engine loop: submit and cancel what is due (at once when it is idle)
        nonlocal loops
        idle = engine.load == (0, 0)
        for i, (sequence, (_, _, _, arrive, cancel)) in enumerate(zip(sequences, work, strict=True)):
            if i not in submitted and (loops >= arrive or idle):
                engine.submit(sequence)
                submitted[i], idle = loops, False
            if cancel is not None and i in submitted and loops >= submitted[i] + cancel:
                sequence.cancel()
        loops += 1
        return all(s.finish_reason for s in sequences)

    engine.run(until=until)
    for sequence, prompt, (_, _, max_tokens, _, cancel) in zip(sequences, prompts, work, strict=True):
        want = expected_for(prompt, max_tokens)
        output = sequence.output
        parted = next((k for k, (a, b) in enumerate(zip(output, want, strict=False)) if a != b), None)
        if parted is not None and tie is not None:
            gap = tie(prompt + want[:parted], output[parted])
            assert gap <= TIE, f"token {parted}: {output[parted]} where the reference's is {gap:.2e} better"
            output, want = output[:parted], want[:parted]  # a near tie: the answers go their own ways
        if sequence.finish_reason == "cancelled":
            assert cancel is not None and want[: len(output)] == output
        else:
            assert (sequence.finish_reason, output) == ("length", want)
    assert engine.load == (0, 0) and sorted(engine.free_slots) == list(range(engine.max_batch))
