"""Sampling a step's rows together (danlu.serve.chat.sampling.sample): each row's token is the one a
plain reference gives (temperature, top-k, top-p over the whole sorted vocabulary, then the token where
the cumulative probability, in that order or the vocabulary's, passes the row's uniform number), also
where a top-p set needs more than the first candidates; the reference's tokens follow the exact
distribution; seeds are per request and do not depend on the other rows; a row whose logits are not
numbers fails alone; the penalties follow the OpenAI and Hugging Face definitions."""

import random
import sys
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from danlu.serve.chat import sampling
from danlu.serve.chat.output import OutputProcessor, Sequence
from danlu.serve.chat.sampling import (
    CANDIDATES,
    History,
    SamplingParams,
    penalize,
    penalized,
    random_source,
    sample,
)
from tests.host_reads import HostReads


def reference(logits: torch.Tensor, params: SamplingParams, uniform: float) -> int:
    """One row, the plain way, float64 throughout: the cumulative probability in the vocabulary's order
    for a row with neither top-k nor top-p, else over the whole vocabulary sorted, most likely first."""
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    if not 0 < params.top_k < len(logits) and params.top_p >= 1.0:  # top_k at or past the vocabulary: off
        return int(torch.searchsorted(probs.cumsum(0), uniform * probs.sum(), right=True))
    values, order = probs.sort(descending=True)
    if 0 < params.top_k < len(values):
        values[params.top_k :] = 0
    before = values.cumsum(0) - values
    values[1:][before[1:] >= params.top_p * values.sum()] = 0  # the first token always stays
    cumulative = values.cumsum(0)
    return int(order[int(torch.searchsorted(cumulative, uniform * cumulative[-1], right=True))])


def exact(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a row's tokens should follow."""
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    values, order = probs.sort(descending=True)
    if params.top_k > 0:
        values[params.top_k :] = 0
    values[1:][(values.cumsum(0) - values)[1:] >= params.top_p * values.sum()] = 0
    return torch.zeros_like(probs).scatter_(0, order, values / values.sum())


SETTINGS = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.9, top_p=0.8),
    SamplingParams(temperature=1.3, top_k=40, top_p=0.5),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=2.0, top_p=0.97),  # flat: needs more than the first candidates
    SamplingParams(temperature=1.0, top_k=300, top_p=0.99),
    SamplingParams(temperature=1.0, top_k=100, top_p=0.1),  # top_p of a top-k set wider than CANDIDATES
]


def test_each_row_is_the_token_the_whole_sorted_vocabulary_gives():
    vocab, rows = 3000, 64
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 2
    params = [SETTINGS[i % len(SETTINGS)] for i in range(rows)]
    source = random.Random(1)
    uniforms = [source.random() for _ in range(rows)]
    got = sample(logits, params, uniforms)
    assert got == [reference(logits[i], params[i], uniforms[i]) for i in range(rows)]
    # the flat rows' top-p sets hold more tokens than the first round's candidates
    flat = exact(logits[6], SETTINGS[6])
    assert int((flat > 0).sum()) > 8 * CANDIDATES


ANY_ROW = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 1e-5, 2e-5, 0.05, 0.3, 0.7, 1.0, 1.5]),  # about GREEDY_BELOW too
    # about the widths a set is looked for in, and at or past the vocabulary (off)
    top_k=st.one_of(st.just(0), st.integers(1, 1100), st.sampled_from([63, 64, 65, 127, 128, 129, 511, 513])),
    top_p=st.one_of(st.just(1.0), st.floats(0.0, 1.0), st.sampled_from([0.0, 0.5, 0.9, 0.99, 0.999])),
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([2, 3, 10, 64, 65, 100, 513, 1000]),
    st.lists(ANY_ROW, min_size=1, max_size=6),
    st.integers(0, 2**31),
    st.sampled_from([1.0, 4.0, 12.0]),
    st.booleans(),
    st.booleans(),
)
def test_any_rows_tokens_are_the_whole_sorted_vocabularys(vocab, params, seed, scale, last, whole):
    """Any mix of settings and vocabulary sizes, uniform numbers anywhere or at the top of [0, 1), sets
    looked for among the first candidates (a CPU's way) or in the whole sorted vocabulary at once (an
    accelerator's): each row's token is the reference's. The logits are spread enough (scale) that no
    two tokens' float32 probabilities are near a tie, where the float32 sampler and the float64
    reference may order them differently."""
    logits = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(seed)) * scale
    source = random.Random(seed)
    uniforms = [0.999999 if last else source.random() for _ in params]
    want = [reference(logits[i], params[i], uniforms[i]) for i in range(len(params))]
    assert sample(logits, params, uniforms, candidates=vocab if whole else None) == want


@pytest.mark.parametrize("params", [p for p in SETTINGS if not p.greedy], ids=str)
def test_tokens_follow_the_exact_distribution(params):
    """20,000 draws of one row of 40 tokens (as 20,000 rows of one step): each token's frequency within
    0.015 of its probability, and none outside the top-k and top-p sets."""
    logits = torch.randn(40, generator=torch.Generator().manual_seed(3)) * 1.5
    draws = 20_000
    source = random.Random(2)
    tokens = sample(logits.expand(draws, -1), [params] * draws, [source.random() for _ in range(draws)])
    frequency = torch.bincount(torch.tensor(tokens), minlength=40).double() / draws
    expected = exact(logits, params)
    assert float((frequency - expected).abs().max()) < 0.015
    assert not bool(frequency[expected == 0].any())


def test_a_seed_gives_the_same_tokens_whatever_shares_the_step():
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(4))
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    alone = [sample(logits[:1], [seeded], [u]) for u in _uniforms(seeded, 20)]
    torch.manual_seed(0)  # the global RNG plays no part
    random.seed(0)
    others = [SamplingParams(temperature=0), SamplingParams(top_k=3), SamplingParams(temperature=0.5)] * 2
    mixed = [
        sample(logits, [seeded, *others[:5]], [u, 0.5, 0.5, 0.5, 0.5, 0.5]) for u in _uniforms(seeded, 20)
    ]
    assert [a[0] for a in alone] == [m[0] for m in mixed]
    assert len({a[0] for a in alone}) > 1  # it samples
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=8)
    assert [sample(logits[:1], [other_seed], [u])[0] for u in _uniforms(other_seed, 20)] != [
        a[0] for a in alone
    ]
    fresh = SamplingParams(temperature=1.0)  # no seed: fresh entropy each time
    assert random_source(fresh).random() != random_source(fresh).random()


def _uniforms(params: SamplingParams, n: int) -> list[float]:
    source = random_source(params)
    return [source.random() for _ in range(n)]


def test_a_top_k_at_or_beyond_the_vocabulary_is_off_however_large():
    """No row's parameters can fail the step its rows share: a top_k too large for any number type draws
    from the whole vocabulary, as top_k 0 does, beside a greedy row."""
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(6))
    huge = [SamplingParams(temperature=1.0, top_k=10**400), SamplingParams(temperature=1.0, top_k=100)]
    off = SamplingParams(temperature=1.0)
    got = sample(logits, [*huge, SamplingParams(temperature=0)], [0.3, 0.6, 0.0])
    assert got == [reference(logits[0], off, 0.3), reference(logits[1], off, 0.6), int(logits[2].argmax())]


def test_a_row_that_is_not_numbers_fails_alone():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(5))
    logits[1, 7] = float("nan")
    logits[2, 3] = float("inf")
    params = [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.0)] * 2
    uniforms = [0.3, 0.3, 0.3, 0.3]
    tokens = sample(logits, params, uniforms)
    assert tokens[1] == tokens[2] == -1
    assert tokens[0] == reference(logits[0], params[0], 0.3) and tokens[3] == reference(
        logits[3], params[3], 0.3
    )
    assert sample(logits[1:2], [SamplingParams(temperature=1.0, top_p=0.9)], [0.3]) == [-1]
    greedy = [SamplingParams(temperature=0)] * 4
    logits[0, 5] = float("-inf")  # a token ruled out: a number
    assert sample(logits, greedy, uniforms) == [int(logits[0].argmax()), -1, -1, int(logits[3].argmax())]


def test_penalties_follow_the_openai_and_hugging_face_definitions():
    """Every penalized row of a step at once, each with its own penalties; a row with none is untouched,
    and a row holding a token the vocabulary lacks gives its exception and is left as it was."""
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]] * 5)
    params = [
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(),
        SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0),
        SamplingParams(repetition_penalty=2.0),
    ]
    held = [([3], [1, 1, 2]), ([3], [2]), ([3], [1]), ([0], [1, 1]), ([7], [])]
    failed = penalize(logits, params, [History(*h) for h in held])
    assert logits[0].tolist() == [1.0, 2.0 - 2 * 0.5 - 0.25, -1.0 - 0.5 - 0.25, 0.5]  # output tokens only
    assert logits[1].tolist() == [1.0, 2.0, -2.0, 0.25]  # prompt and output tokens, by sign
    assert logits[2].tolist() == [1.0, 2.0, -1.0, 0.5]
    assert logits[3].tolist() == [0.5, 1.0 - 2 * 1.0, -1.0, 0.5]  # repetition, then frequency
    assert list(failed) == [4] and "outside the model's 4 logits" in str(failed[4])
    assert logits[4].tolist() == [1.0, 2.0, -1.0, 0.5]


def test_a_steps_tokens_are_sampled_together_and_a_failing_row_fails_alone():
    """OutputProcessor.sample: greedy rows their argmax, sampled rows with their own seeded source,
    penalties on their own row; a row whose penalty raises, or whose logits are not numbers, gives its
    exception and no other row's."""
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(2))
    seeded = SamplingParams(temperature=1.0, seed=7)
    repeat = SamplingParams(temperature=0, repetition_penalty=50.0)
    best = int(logits[2].argmax())
    logits[4, 0] = float("nan")
    sequences = [
        Sequence([1, 2], SamplingParams(temperature=0), print),
        Sequence([1, 2], seeded, print),
        Sequence([best], repeat, print),  # the penalty moves it off its prompt's token
        Sequence([999], repeat, print),  # a token the vocabulary lacks: its penalty raises
        Sequence([1], seeded, print),  # logits that are not numbers
    ]
    processor = OutputProcessor(None, set(), 100, [])
    tokens = processor.sample(list(zip(sequences, logits, strict=True)))
    assert tokens[0] == int(logits[0].argmax())
    assert tokens[1] == reference(logits[1], seeded, random_source(seeded).random())
    assert tokens[2] != best and tokens[2] == int(logits[2].topk(2).indices[1])
    assert isinstance(tokens[3], ValueError) and "outside the model's 50 logits" in str(tokens[3])
    assert isinstance(tokens[4], ValueError) and "not finite" in str(tokens[4])


PENALTIES = st.builds(
    SamplingParams,
    repetition_penalty=st.sampled_from([1.0, 0.5, 1.1, 2.0]),
    frequency_penalty=st.sampled_from([0.0, -0.5, 0.3, 2.0]),
    presence_penalty=st.sampled_from([0.0, -1.0, 0.25, 1.5]),
)
HELD = st.tuples(st.lists(st.integers(0, 19), max_size=12), st.lists(st.integers(0, 19), max_size=12))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(PENALTIES, HELD), min_size=1, max_size=5), st.integers(0, 2**31))
def test_any_rows_penalties_are_their_definitions_one_token_at_a_time(rows, seed):
    """Any rows' penalties and held tokens (repeated, in prompt and output both) in one call: each logit
    is what the definitions give applied to it alone: divided by the repetition penalty where positive,
    multiplied where not, for each distinct held token; then the frequency penalty x its output count
    and the presence penalty once, subtracted."""
    logits = torch.randn(len(rows), 20, generator=torch.Generator().manual_seed(seed)) * 3
    want = logits.clone()
    for i, (params, (prompt, output)) in enumerate(rows):
        for token in set(prompt + output):
            value = want[i, token]
            want[i, token] = (
                value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
            )
        for token, count in Counter(output).items():
            want[i, token] -= params.frequency_penalty * count + params.presence_penalty
    histories = [History(prompt, output) if penalized(params) else None for params, (prompt, output) in rows]
    assert penalize(logits, [params for params, _ in rows], histories) == {}
    torch.testing.assert_close(logits, want, rtol=1e-6, atol=1e-6)


@given(
    st.lists(st.integers(0, 30), max_size=20),
    st.lists(st.integers(0, 30), max_size=40),
)
def test_a_history_kept_token_by_token_holds_what_the_penalties_define(prompt, output):
    """History.add, one output token at a time, holds the distinct tokens of prompt and output (in
    order) and each output token's count, with the lowest and highest token the vocabulary check reads."""
    history = History(prompt)
    for token in output:
        history.add(token)
    assert list(history.distinct) == list(dict.fromkeys(prompt + output))
    assert history.counts == Counter(output)
    held = prompt + output
    assert (history.low, history.high) == ((min(held), max(held)) if held else (sys.maxsize, -1))
    assert vars(History(prompt, output)) == vars(history)


def test_a_step_reads_its_tokens_back_once_and_once_more_per_later_top_p_round():
    """Penalties and sampling of a step's rows read nothing back to the host but the tokens: once for a
    step whose sets settle within the first candidates, and once more for each later round a top-p
    set takes (a flat row with top_p 0.99 over 1,000 tokens: 64, then 512, then all of them)."""
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(3)) * 4
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, repetition_penalty=1.3, frequency_penalty=0.5),
        SamplingParams(temperature=0.8, top_k=5, presence_penalty=0.2),
        SamplingParams(temperature=0.5, top_k=40),
    ]
    histories = [None, History([1, 2], [3, 3]), History([4], [5]), None]
    with HostReads() as step:
        penalize(logits[:4], params, histories)
        sample(logits[:4], params, [0.5] * 4)
    assert step.reads == ["tolist"]
    logits[5] = 0.0  # every token equally likely: a top_p of 0.99 needs 990 of them
    flat = [*params, SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.0, top_p=0.99)]
    with HostReads() as step:
        sample(logits, flat, [0.5] * 6)
    assert step.reads == ["tolist"] * 3
    with HostReads() as step:  # an accelerator's way: the whole vocabulary at once
        tokens = sample(logits, flat, [0.5] * 6, candidates=1000)
    assert step.reads == ["tolist"]
    assert tokens[:5] == [reference(logits[i], flat[i], 0.5) for i in range(5)]
    assert tokens[5] == 495  # ties in the vocabulary's order: the middle one of the set's first 990 tokens


def test_an_accelerator_looks_at_the_whole_vocabulary_at_once():
    """A CPU looks for the sets among CANDIDATES first (a later round costs it only its work); any other
    device in the whole vocabulary, so that no step waits on the device before its tokens."""
    assert sampling.device_candidates(torch.device("cpu"), 49152) == CANDIDATES
    assert sampling.device_candidates(torch.device("cuda", 0), 49152) == 49152
    assert sampling.device_candidates(torch.device("mps"), 1000) == 1000


def test_a_row_looks_at_as_many_tokens_as_its_own_top_k_needs(monkeypatch):
    """Rows are drawn among as many of their most likely tokens as their own top_k needs (CANDIDATES at
    least, to a power of two), rows of one width together: one row's large top_k does not widen the
    others'. The tokens are the reference's, whatever the width."""
    logits = torch.randn(5, 3000, generator=torch.Generator().manual_seed(8)) * 3
    params = [
        SamplingParams(temperature=0.8, top_p=0.5),
        SamplingParams(temperature=1.0, top_k=1000),
        SamplingParams(temperature=0.8, top_k=40, top_p=0.5),
        SamplingParams(temperature=1.0, top_k=600, top_p=0.5),
        SamplingParams(temperature=0.0),
    ]
    draws = []
    draw_cut = sampling._draw_cut

    def recording(rows, settings, width):
        draws.append((len(rows), width))
        return draw_cut(rows, settings, width)

    monkeypatch.setattr(sampling, "_draw_cut", recording)
    uniforms = [0.2, 0.4, 0.6, 0.8, 0.0]
    assert sample(logits, params, uniforms) == [
        reference(logits[i], params[i], uniforms[i]) for i in range(5)
    ]
    assert draws == [(2, CANDIDATES), (2, 1024)]  # rows 0 and 2, then 1 and 3: no later round


@given(st.integers(0, 10**6), st.sampled_from([CANDIDATES, 1, 1000, 49152]))
def test_a_rows_first_width_is_a_power_of_two_holding_its_top_k(top_k, candidates):
    width = sampling.first_width(top_k, candidates)
    assert width & (width - 1) == 0
    assert max(candidates, top_k) <= width < 2 * max(candidates, top_k)
    assert sampling.first_width(top_k) == sampling.first_width(top_k, CANDIDATES)
