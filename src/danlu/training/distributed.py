"""Multi-process training with torch.distributed, as launched by torchrun (or Ray Train): which process
this is, the process group (nccl on CUDA, gloo on CPU), and the few collectives the trainer needs.

A single process is a world of one: every helper here is then a no-op, so the trainer has one code path."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import logging
import os
import pickle
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
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
    global _OWN_GROUP, _DEVICE
    _DEVICE = device
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
# Every tensor danlu hands to a collective, kept referenced from Python until the group is gone. A gloo
# worker thread drops its reference to a finished collective's tensors later, on its own time; when it
# drops the last one of a tensor made in Python, it must take the GIL to free the tensor's Python object.
# If the main thread is then tearing the group down (it holds the GIL while it waits for those threads)
# the two wait for each other forever; if the interpreter is exiting, the thread aborts the process. So
# no collective of danlu's leaves that work to a gloo thread (torch's *_object helpers would: danlu does
# not use them).
_HELD: list[torch.Tensor] = []
_DEVICE = torch.device("cpu")  # where collective tensors live: this rank's GPU under nccl


def _held(tensor: torch.Tensor) -> torch.Tensor:
    _HELD.append(tensor)
    return tensor


def stop() -> None:
    """Leave a process group this module started (Ray Train tears down its own). Whatever holds the group
    (DDP's reducer) should be released first: collected here, the group and its threads end now."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()  # the trainer's objects that held the group, so that it ends here
    _OWN_GROUP = False
    _HELD.clear()


def check_same_config(world: World, config_text: str) -> None:
    """Every rank must train the same config: compare digests, fail on all ranks if any differs."""
    if not world.multi:
        return
    digest = torch.frombuffer(bytearray(hashlib.sha256(config_text.encode()).digest()), dtype=torch.uint8)
    digests = [_held(torch.empty_like(digest, device=_DEVICE)) for _ in range(world.size)]
    dist.all_gather(digests, _held(digest.to(_DEVICE)))
    if any(not torch.equal(d, digests[0]) for d in digests):
        raise DanluError(
            "the processes were started with different configs",
            "start every rank with the same config file and overrides",
        )


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sums over ranks (epoch loss and row counts)."""
    if not world.multi:
        return values
    tensor = _held(torch.tensor(values, dtype=torch.float64, device=device))
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's value on every rank (decisions only the main process makes)."""
    if not world.multi:
        return obj
    data = pickle.dumps(obj) if world.main else b""
    size = _held(torch.tensor([len(data)], dtype=torch.int64, device=_DEVICE))
    dist.broadcast(size, src=0)
    payload = _held(_bytes_tensor(data, int(size)))
    dist.broadcast(payload, src=0)
    return obj if world.main else _unbytes(payload)


def gather(obj: Any, world: World) -> list[Any] | None:
    """Every rank's value, as a list on rank 0 (None elsewhere); [obj] in a single process."""
    if not world.multi:
        return [obj]
    data = pickle.dumps(obj)
    size = _held(torch.tensor([len(data)], dtype=torch.int64, device=_DEVICE))
    sizes = [_held(torch.empty_like(size)) for _ in range(world.size)]
    dist.all_gather(sizes, size)
    longest = max(int(s) for s in sizes)
    payloads = [_held(torch.empty(longest, dtype=torch.uint8, device=_DEVICE)) for _ in range(world.size)]
    dist.all_gather(payloads, _held(_bytes_tensor(data, longest)))
    if not world.main:
        return None
    return [_unbytes(p[: int(n)]) for p, n in zip(payloads, sizes, strict=True)]


def _bytes_tensor(data: bytes, size: int) -> torch.Tensor:
    """`data` padded with zeros to `size` bytes, as a uint8 tensor on the collectives' device."""
    padded = np.zeros(size, dtype=np.uint8)
    padded[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return torch.from_numpy(padded).to(_DEVICE)


def _unbytes(payload: torch.Tensor) -> Any:
    # the ranks of one run exchange their own state: the same trust as the run's own files
    return pickle.loads(payload.cpu().numpy().tobytes())


def barrier(world: World) -> None:
    if world.multi:
        dist.barrier()
