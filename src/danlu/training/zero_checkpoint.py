"""DeepSpeed ZeRO checkpoints in danlu's own format, readable by any number of processes.

Each rank writes one safetensors file with the fragments of the parameters its optimizer owns: the
fp32 master weights and every optimizer state of their shape (Adam's moments, SGD's momentum), each
with where it starts in its flattened parameter. Rank 0 adds the buffers, the optimizer's scalar
state (Adam's step) and the engine's counters. To load, each rank reads the ranges its own partition
covers from whichever files hold them: a run resumes on another number of processes as on the same,
nothing is unpickled, and no rank reads more than its own partition (and the buffers).

ZeRO-1 and -2 partition each parameter group's flattened parameters; DeepSpeed links every
parameter to its fragment of that flat partition (`_hp_mapping`). ZeRO-3 partitions each parameter
itself: rank r holds elements [r*k, (r+1)*k) of it, k its partition size. Frozen parameters are not
written: no optimizer step changes them, and the run's set-up builds them again as they were.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from danlu.errors import DanluError
from danlu.run import ZERO_FILE

FILE = "zero-{rank:05d}-of-{world:05d}.safetensors"  # ZERO_FILE's form
_SEP = "::"  # between a parameter's name and an optimizer state's key
_BUFFER = "buffer" + _SEP
_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


@dataclass(frozen=True)
class _Fragment:
    """A parameter's part in this rank's partition."""

    name: str  # the parameter's
    flat: torch.Tensor  # the optimizer's flat fp32 partition that holds it
    offset: int  # where in `flat`
    start: int  # where in the flattened parameter
    numel: int


def save(engine: Any, folder: Path, rank: int, world: int) -> None:
    """Called on every rank: writes this rank's file into `folder` (which exists)."""
    zero = engine.optimizer
    state = zero.optimizer.state
    tensors: dict[str, torch.Tensor] = {}
    starts: dict[str, int] = {}
    for f in _fragments(engine, rank):
        starts[f.name] = f.start
        tensors[f.name] = f.flat.narrow(0, f.offset, f.numel).detach().cpu().clone()
        for key, value in state.get(f.flat, {}).items():
            if torch.is_tensor(value) and value.shape == f.flat.shape:
                tensors[f.name + _SEP + key] = value.narrow(0, f.offset, f.numel).detach().cpu().clone()
    metadata = {"starts": json.dumps(starts)}
    if rank == 0:
        for name, buffer in engine.module.named_buffers():
            tensors[_BUFFER + name] = buffer.detach().cpu().clone()
        metadata["scalars"] = json.dumps(_scalars(zero.optimizer), allow_nan=False)
        metadata["counters"] = json.dumps({k: int(getattr(engine, k, 0)) for k in _COUNTERS})
    save_file(tensors, str(folder / FILE.format(rank=rank, world=world)), metadata=metadata)


@torch.no_grad()
def load(engine: Any, folder: Path, rank: int, with_optimizer: bool) -> None:
    """Called on every rank, in any number of processes: fills this rank's partition of the master
    weights (and with_optimizer, of the optimizer's state, its step and the engine's counters) from the
    files in `folder`, then the model's own weights from the master weights."""
    files = _rank_files(folder)
    zero = engine.optimizer
    fragments = _fragments(engine, rank)
    with ExitStack() as stack:
        reader = _Reader([stack.enter_context(safe_open(str(f), framework="pt")) for f in files], folder)
        for f in fragments:
            f.flat.narrow(0, f.offset, f.numel).copy_(reader.read(f.name, f.start, f.numel))
        if with_optimizer:
            _load_optimizer(zero.optimizer, _flats(zero), fragments, reader)
            link = getattr(zero, "_lazy_init_hp_params_optimizer_state", None)
            if link is not None:  # ZeRO-1/2: each parameter's view of the state, as after a step
                link()
            for key, value in reader.first("counters").items():
                setattr(engine, key, value)
        for name, buffer in engine.module.named_buffers():
            buffer.copy_(reader.whole(_BUFFER + name))
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3: each parameter's partition
        for group in range(len(zero.fp16_groups)):
            zero._reassign_or_swap_out_partitioned_parameters(group)
    else:  # ZeRO-1/2: every rank's whole copy, gathered from the partitions
        zero.update_lp_params()


def _rank_files(folder: Path) -> list[Path]:
    """Every rank's file of one checkpoint, all N of them, or one line saying what is wrong."""
    files = {}
    for path in folder.iterdir() if folder.is_dir() else ():
        match = ZERO_FILE.fullmatch(path.name)
        if match:
            files[int(match[1]), int(match[2])] = path
    counts = {world for _, world in files}
    if len(counts) != 1 or sorted(files) != [(rank, *counts) for rank in range(*counts)]:
        found = ", ".join(sorted(p.name for p in files.values())) or "none"
        raise DanluError(
            f"'{folder}' does not hold one whole ZeRO checkpoint (its files: {found})",
            "the checkpoint is damaged or was written by an earlier danlu; train again",
        )
    return [files[key] for key in sorted(files)]


def _flats(zero: Any) -> list[torch.Tensor]:
    """The flat fp32 partitions the optimizer steps (and keys its state by): ZeRO-3's, ZeRO-1/2's, and
    those of DeepSpeed's bf16 optimizer (ZeRO-1 in bf16)."""
    for name in (
        "fp32_partitioned_groups_flat",
        "single_partition_of_fp32_groups",
        "fp32_groups_flat_partition",
    ):
        if hasattr(zero, name):
            return list(getattr(zero, name))
    raise DanluError(f"cannot checkpoint DeepSpeed's {type(zero).__name__}", "use train.strategy=fsdp")


def _fragments(engine: Any, rank: int) -> list[_Fragment]:
    zero = engine.optimizer
    flats = _flats(zero)
    fragments = []
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        if hasattr(param, "ds_id"):  # ZeRO-3
            group, offset, size = zero.grad_position[zero.get_param_id(param)]
            flat = zero.fp32_partitioned_groups_flat[group]
            start = rank * size
            numel = max(0, min(size, param.ds_numel - start))  # the last partitions hold padding
        else:
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:  # no part of it in this rank's partition
                continue
            hp = mapping.hp_fragment
            pointer = hp.untyped_storage().data_ptr()
            flat = next(f for f in flats if f.untyped_storage().data_ptr() == pointer)
            offset = hp.storage_offset() - flat.storage_offset()
            start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
        if numel:
            fragments.append(_Fragment(name, flat, offset, start, numel))
    return fragments


def _scalars(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The optimizer's per-partition scalars (Adam's step): the same on every partition."""
    scalars: dict[str, float] = {}
    for entries in optimizer.state.values():
        for key, value in entries.items():
            if isinstance(value, int | float) or (torch.is_tensor(value) and value.dim() == 0):
                scalars[key] = float(value)
    return scalars


def _load_optimizer(
    optimizer: torch.optim.Optimizer, flats: list[torch.Tensor], fragments: list[_Fragment], reader: _Reader
) -> None:
    """The optimizer's state for every flat partition, created as its first step would (then filled),
    or filled in place where it exists, so the views DeepSpeed keeps into it stay valid."""
    keys = reader.state_keys()
    scalars = reader.first("scalars")
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for flat in flats:
        state = optimizer.state[flat]
        for key in keys:
            state.setdefault(key, torch.zeros_like(flat))
        for key, value in scalars.items():
            scalar = torch.tensor(value, dtype=torch.float32, device=flat.device if on_device else "cpu")
            if key in state and torch.is_tensor(state[key]):
                state[key].copy_(scalar)
            else:
                state[key] = scalar
    for f in fragments:
        for key in keys:
            optimizer.state[f.flat][key].narrow(0, f.offset, f.numel).copy_(
                reader.read(f.name + _SEP + key, f.start, f.numel)
            )


class _Reader:
    """Where each fragment lies across the files of every rank that wrote them."""

    def __init__(self, handles: list[Any], folder: Path) -> None:
        self.folder = folder
        self.handles = [(handle, set(handle.keys())) for handle in handles]
        self.pieces: dict[str, list[tuple[int, Any]]] = {}
        for handle, keys in self.handles:
            starts = json.loads(handle.metadata()["starts"])
            for key in keys:
                if not key.startswith(_BUFFER):
                    self.pieces.setdefault(key, []).append((starts[key.split(_SEP)[0]], handle))

    def read(self, key: str, start: int, numel: int) -> torch.Tensor:
        out = torch.empty(numel, dtype=torch.float32)
        covered = 0
        for begin, handle in self.pieces.get(key, []):
            piece = handle.get_slice(key)
            end = begin + piece.get_shape()[0]
            low, high = max(begin, start), min(end, start + numel)
            if low < high:
                out[low - start : high - start] = piece[low - begin : high - begin]
                covered += high - low
        if covered != numel:
            raise DanluError(
                f"the ZeRO checkpoint '{self.folder}' lacks part of '{key}'",
                "the checkpoint is damaged or not this run's; train again",
            )
        return out

    def whole(self, key: str) -> torch.Tensor:
        for handle, keys in self.handles:
            if key in keys:
                return handle.get_tensor(key)
        raise DanluError(f"the ZeRO checkpoint '{self.folder}' lacks '{key}'", "train again")

    def state_keys(self) -> list[str]:
        return sorted({key.split(_SEP, 1)[1] for key in self.pieces if _SEP in key})

    def first(self, name: str) -> dict[str, Any]:
        """A JSON field that rank 0's file holds."""
        for handle, _ in self.handles:
            if name in (handle.metadata() or {}):
                return json.loads(handle.metadata()[name])
        return {}
