"""A torchrun target for tests/e2e/test_sharded.py: `save FOLDER` trains small DeepSpeed engines three
steps and writes their ZeRO fragments (with the full weights and Adam moments they should restore, and
the weights three more steps reach); `load FOLDER`, in another number of processes, reads them back and
writes what it restored and where three more steps led. One engine per case: ZeRO-2 in fp32 and ZeRO-1
in bf16 (DeepSpeed's own bf16 optimizer)."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

os.environ.setdefault("DS_ACCELERATOR", "cpu")
CASES = {"zero2_fp32": (2, False), "zero1_bf16": (1, True), "zero3_fp32": (3, False)}
BATCH = 12  # divides among 2 and 3 processes


def engine(stage: int, bf16: bool):
    from danlu.training.sharding import start_deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    config = {
        "train_batch_size": BATCH,
        "train_micro_batch_size_per_gpu": BATCH // dist.get_world_size(),
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
    }
    ds, _ = start_deepspeed(model, optimizer, config)  # as danlu's ranks start it: nothing compiled
    return ds


def shared(ds) -> bool:
    """Whether ZeRO-3's fp32 masters are the parameters' own partitions (one copy of the weights)."""
    zero = ds.optimizer
    pairs = zip(zero.fp16_partitioned_groups_flat, zero.fp32_partitioned_groups_flat, strict=True)
    return all(
        low.untyped_storage().data_ptr() == master.untyped_storage().data_ptr() for low, master in pairs
    )


def steps(ds, first: int, n: int) -> None:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 7, generator=generator), torch.randint(0, 3, (96,), generator=generator)
    dtype = next(ds.parameters()).dtype
    for i in range(first, first + n):
        rows = slice(i * BATCH, (i + 1) * BATCH)
        xs, ys = x[rows].chunk(dist.get_world_size())[dist.get_rank()], y[rows].chunk(dist.get_world_size())
        loss = torch.nn.functional.cross_entropy(ds(xs.to(dtype)), ys[dist.get_rank()])
        ds.backward(loss)
        ds.step()


def full(ds, key: str | None = None) -> dict[str, list[float]]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for name, p in ds.module.named_parameters():
        value = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        out[name] = value.flatten().tolist()
    return out


def main() -> None:
    from danlu.training import zero_checkpoint

    mode, folder = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for case, (stage, bf16) in CASES.items():
        ds = engine(stage, bf16)
        if mode == "save":
            steps(ds, 0, 3)
            (folder / case).mkdir(parents=True, exist_ok=True)
            zero_checkpoint.save(ds, folder / case, rank, world)
        else:
            zero_checkpoint.load(ds, folder / case, rank, with_optimizer=True)
        results[case] = {
            "weights": full(ds),
            "exp_avg": full(ds, "exp_avg"),
            "exp_avg_sq": full(ds, "exp_avg_sq"),
            "shared": shared(ds) if stage == 3 else None,
        }
        steps(ds, 3, 3)
        results[case]["after"] = full(ds)
    if rank == 0:
        (folder / f"{mode}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    # The engines' gloo threads can abort the interpreter's exit ("terminate called without an active
    # exception"); what this script checks is written, so it leaves without that teardown. (danlu's
    # trainer ends its group cleanly: tests/e2e/test_distributed.py runs it again and again.)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
