"""Multi-process training with torch.distributed, as launched by torchrun (or Ray Train): which process
this is, the process group (nccl on CUDA, gloo on CPU), and the few collectives the trainer needs.

A single process is a world of one: every helper here is then a no-op, so the trainer has one code path."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from danlu.errors import DanluError, one_line
from danlu.inference import resolve_device

log = logging.getLogger("danlu")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def multi(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The process's place as torchrun and Ray Train describe it in RANK / WORLD_SIZE / LOCAL_RANK."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def restarted() -> bool:
    """torchrun restarted this worker group after a failure (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def start(world: World, device_name: str, timeout_s: float) -> torch.device:
    """Join the process group and pick this rank's device (its local GPU on CUDA)."""
    if not world.multi:
        return resolve_device(device_name)
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise DanluError(
            "train.device=cuda (nccl) but this process sees no CUDA GPU",
            "use train.device=cpu (gloo), or run on GPU machines",
        )
    if use_cuda and world.local_rank >= torch.cuda.device_count():
        raise DanluError(
            f"local rank {world.local_rank} has no GPU ({torch.cuda.device_count()} visible)",
            "start at most one process per GPU (--nproc-per-node)",
        )
    device = torch.device(f"cuda:{world.local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    global _OWN_GROUP
    # DDP imports torch._dynamo when it wraps the model. Imported after the group exists, it keeps
    # references to the default group that are never let go (torch 2.13), so destroy_process_group() leaves
    # the group and its gloo threads running into interpreter exit, where a rank could abort ("terminate
    # called without an active exception") and torchrun report the finished run FAILED. Imported first,
    # it holds none, and stop() ends the group's threads.
    importlib.import_module("torch._dynamo")

    if not dist.is_initialized():  # Ray Train starts the group itself
        with _held_stderr():
            try:
                dist.init_process_group(
                    "nccl" if use_cuda else "gloo",
                    timeout=timedelta(seconds=timeout_s),
                    device_id=device if use_cuda else None,
                    **_attempt_store(world, timeout_s),
                )
            except dist.DistError as error:
                raise _rendezvous_error(error, world, timeout_s) from error
        _OWN_GROUP = True
    return device


@contextlib.contextmanager
def _held_stderr() -> Iterator[None]:
    """Hold what is written to file descriptor 2 (c10d's C++ logs). Pass it on afterwards, or, when the
    block ends in a DanluError (already one clear line), only to the debug log."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        clear = False
        try:
            yield
        except DanluError:
            clear = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode(errors="replace")
            if clear:
                log.debug("process group output:\n%s", text)
            elif text:
                sys.stderr.write(text)


def _rendezvous_error(error: Exception, world: World, timeout_s: float) -> DanluError:
    """What went wrong joining the group, in one line: the port is taken, or the peers never answered."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    if "EADDRINUSE" in str(error) or "address already in use" in str(error).lower():
        return DanluError(
            f"rank {world.rank} cannot listen on {where}: the port is already in use",
            "pick a free MASTER_PORT (torchrun --master-port / --rdzv-endpoint) or stop what holds it",
        )
    if isinstance(error, (dist.DistStoreError, dist.DistNetworkError)):
        return DanluError(
            f"rank {world.rank} could not reach the rendezvous at {where} within {timeout_s:g} s",
            "check that rank 0 runs and this host can reach MASTER_ADDR:MASTER_PORT; "
            "train.dist_timeout sets the wait",
        )
    return DanluError(
        f"rank {world.rank} could not join the process group: {one_line(error)}", "run with --debug"
    )


def _attempt_store(world: World, timeout_s: float) -> dict[str, Any]:
    """Under torchrun, a store namespaced by restart attempt: after --max-restarts brings the workers back,
    the agent's store still holds the dead group's addresses, and a new rank could connect to them."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}  # env:// as usual (manual launches, Ray Train)
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world.size,
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {
        "store": dist.PrefixStore(f"danlu/attempt_{attempt}", store),
        "rank": world.rank,
        "world_size": world.size,
    }


_OWN_GROUP = False


def stop() -> None:
    """Leave a process group this module started (Ray Train tears down its own)."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP = False


def check_same_config(world: World, config_text: str) -> None:
    """Every rank must train the same config: compare digests, fail on all ranks if any differs."""
    if not world.multi:
        return
    digests: list[Any] = [None] * world.size
    dist.all_gather_object(digests, hashlib.sha256(config_text.encode()).hexdigest())
    if len(set(digests)) > 1:
        raise DanluError(
            "the processes were started with different configs",
            "start every rank with the same config file and overrides",
        )


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sums over ranks (epoch loss and row counts)."""
    if not world.multi:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's value on every rank (decisions only the main process makes)."""
    if not world.multi:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, world: World) -> list[Any] | None:
    """Every rank's value, as a list on rank 0 (None elsewhere); [obj] in a single process."""
    if not world.multi:
        return [obj]
    box = [None] * world.size if world.main else None
    dist.gather_object(obj, box, dst=0)
    return box


def barrier(world: World) -> None:
    if world.multi:
        dist.barrier()
