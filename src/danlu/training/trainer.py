"""The training loop. Set-up first (`_setup`), then a loop that reads top to bottom:
set lr -> step -> validate -> track best / checkpoint -> log."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from danlu import families
from danlu.config import MAXIMIZED_MONITORS, Config, TrainConfig, check_batch_split, dump_config
from danlu.data import heldout
from danlu.data.batches import Batch, run_model, share, shuffle_generator
from danlu.data.dataset import Dataset
from danlu.errors import DanluError
from danlu.families.contract import Family
from danlu.inference import autocast, iter_outputs, resolve_precision
from danlu.run import RunDir, atomic_write_text
from danlu.training import checkpoint as ckpt
from danlu.training import distributed, sharding
from danlu.training.distributed import World
from danlu.training.objectives import objective_for

log = logging.getLogger("danlu")


@dataclass
class TrainerState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken (drives the lr schedule)
    best_value: float | None = None
    best_epoch: int | None = None
    bad_evals: int = 0  # evaluations since the monitored metric last improved
    train_seconds: float = 0.0
    stopped_early: bool = False


@dataclass
class Setup:
    device: torch.device
    family: Family
    data: Dataset
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batch_size: int
    total_steps: int
    state: TrainerState
    world: World = field(default_factory=World)
    precision: str = "fp32"  # what runs: train.precision resolved for the device

    @property
    def bare_model(self) -> nn.Module:
        """The model without its DDP wrapper: what rank 0 validates, saves and restores."""
        return ckpt.unwrap(self.model)

    @property
    def sharded(self) -> bool:
        """Each process holds a shard of the model (train.strategy=fsdp over several processes): every
        process then takes part in validating, checkpointing and consolidating it."""
        return sharding.is_sharded(self.model)


def auto_batch_size(n_rows: int) -> int:
    """About 64 steps per epoch, as a power of two between 32 and 1024."""
    return int(min(1024, max(32, 2 ** round(math.log2(max(n_rows, 1) / 64)))))


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Learning rate for a step: constant, cosine decay, linear decay to 0, one-cycle (30% warm-up, cosine
    down), or step (times step_gamma after every epoch, as torch's StepLR(step_size=1)). With train.warmup
    the first share of the steps rises linearly from 0 and the schedule runs over the rest (as Hugging
    Face's get_linear_schedule_with_warmup)."""
    progress = min(step / max(total_steps, 1), 1.0)
    if config.warmup > 0:
        if progress < config.warmup:
            return config.lr * progress / config.warmup
        progress = (progress - config.warmup) / (1 - config.warmup)
    if config.schedule == "step":
        epoch = min(int(step * config.epochs // max(total_steps, 1)), config.epochs - 1)
        return config.lr * config.step_gamma**epoch
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if config.schedule == "linear":
        return config.lr * (1 - progress)
    if config.schedule == "onecycle":
        if progress < 0.3:
            return config.lr * (0.04 + 0.96 * progress / 0.3)
        return config.lr * (1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (progress - 0.3) / 0.7)))
    return config.lr


def build_optimizer(
    model: nn.Module, config: TrainConfig, decay_matrices_only: bool = False
) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable parameters. decay_matrices_only: weight decay on
    weight matrices alone, not on biases and normalization weights (the 1-D parameters), as transformer
    fine-tuning recipes do."""
    # The fused kernels update every parameter in one call: on small models the optimizer step is
    # otherwise a large share of the step time.
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    groups: list = params
    if decay_matrices_only:
        groups = [
            {"params": [p for p in params if p.ndim >= 2]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
    if config.optimizer == "adadelta":
        return torch.optim.Adadelta(groups, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    if config.optimizer == "sgd":
        # sharded parameters (FSDP's DTensors) have no fused SGD kernel; foreach updates them in one call
        # (checked without importing torch.distributed.tensor, 0.6 s at every start: no DTensor exists
        # unless FSDP imported it)
        dtensor = sys.modules.get("torch.distributed.tensor")
        sharded = dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in params)
        return torch.optim.SGD(
            groups,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            **({"foreach": True} if sharded else {"fused": fused}),
        )
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def _batch_size(tc: TrainConfig, n_rows: int, world: World) -> int:
    """The global batch: each optimizer step's rows over all processes and micro-batches."""
    if tc.batch_size == "auto":
        parts = world.size * tc.accumulate
        return math.ceil(auto_batch_size(n_rows) / parts) * parts
    check_batch_split(tc, world.size)
    return tc.batch_size


def _setup(config: Config, run: RunDir, state: Any, world: World, device: torch.device) -> Setup:
    tc = config.train
    torch.manual_seed(tc.seed)
    precision = resolve_precision(device, tc.precision)
    if precision != tc.precision and tc.precision != "auto":
        log.warning("train.precision=%s is not supported on %s; training in fp32", tc.precision, device)
    family = families.get(config.data.family)
    data = family.load(config.data, device, state, run.cache, config.model, tc)
    if world.main:
        if state is None:
            atomic_write_text(run.preprocess, data.state.to_json())
            heldout.write(run, family, data.held_out, data.source)
        else:  # resuming: the same rows, or the weights would silently continue on other data
            heldout.check_source(run, family, data.source.name, data.source)
    data.held_out = None  # recorded; the rows need not stay in memory while training
    state = data.state
    allowed = objective_for(state).monitors
    if tc.monitor not in allowed:
        raise DanluError(
            f"train.monitor={tc.monitor} does not apply to {state.task}", f"use one of {', '.join(allowed)}"
        )
    torch.manual_seed(tc.seed)  # initialisation must not depend on how much randomness loading used
    model = family.build_model(config.model, state)
    family.prepare_training(model, tc)
    sharding.check(tc.strategy, world, data.train.uneven, precision)
    batch_size = _batch_size(tc, data.train.n_rows, world)
    model, optimizer = sharding.wrap(  # on the device: a sharded model's shards only
        model,
        tc,
        family.shard_blocks(model),
        world,
        device,
        precision,
        batch_size,
        lambda module: build_optimizer(module, tc, family.decay_matrices_only),
    )
    total_steps = tc.epochs * max(1, math.ceil(data.train.n_rows / batch_size))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return Setup(
        device,
        family,
        data,
        model,
        optimizer,
        scaler,
        batch_size,
        total_steps,
        TrainerState(),
        world,
        precision,
    )


def backward(s: Setup, loss: torch.Tensor) -> None:
    if sharding.is_deepspeed(s.model):  # its step reduces, clips and steps at the last micro-batch
        s.model.backward(loss, scale_wrt_gas=False)  # the loss is already scaled for the micro-batches
        s.model.step()
        return
    (s.scaler.scale(loss) if s.scaler.is_enabled() else loss).backward()


def optimizer_step(s: Setup, grad_clip: float | None) -> None:
    if sharding.is_deepspeed(s.model):
        return  # stepped in backward, at the last micro-batch
    if not s.scaler.is_enabled():  # fp32/bf16: skip the scaler's bookkeeping on the hot path
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(s.model.parameters(), grad_clip)
        s.optimizer.step()
        return
    if grad_clip is not None:
        s.scaler.unscale_(s.optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(s.model.parameters(), grad_clip)
    s.scaler.step(s.optimizer)
    s.scaler.update()


def _micro_batches(batch: Batch, accumulate: int) -> list[Batch]:
    if accumulate == 1:
        return [batch]
    return [batch.slice(*share(batch.rows, i, accumulate)) for i in range(accumulate)]


def _uneven_inputs(s: Setup):
    """Chunked data gives ranks different step counts: Join keeps DDP's collectives matched."""
    if s.world.multi and s.data.train.uneven:
        from torch.distributed.algorithms.join import Join

        return Join([s.model])
    return contextlib.nullcontext()


def train_epoch(s: Setup, tc: TrainConfig, epoch: int, steps: list | None = None) -> float:
    """One pass over the training data; returns the mean loss per unit (row, or trained token) over all
    processes. steps: when a list, each step's (step, lr, loss sum, units) of this process is appended,
    the loss sum left on the device (experiment tracking reads them once, after the epoch).

    Each step's loss is scaled so that DDP's average over ranks (and the sum over micro-batches) is the
    mean over the whole global batch: N processes, or micro-batches, give a single process's gradient.
    """
    s.model.train()
    objective = objective_for(s.data.state)
    total = torch.zeros((), device=s.device)
    units = 0
    generator = shuffle_generator(tc.seed, epoch)
    with _uneven_inputs(s):
        for batch, n_global in s.data.train.train_batches(
            s.batch_size, generator, s.world.rank, s.world.size
        ):
            lr = lr_at(s.state.step, s.total_steps, tc)
            for group in s.optimizer.param_groups:
                group["lr"] = lr
            if not sharding.is_deepspeed(s.model):  # DeepSpeed's step clears them itself
                s.optimizer.zero_grad(set_to_none=True)
            micro = _micro_batches(batch, tc.accumulate)
            step_sum, step_units = None, 0
            for i, piece in enumerate(micro):
                last = i == len(micro) - 1
                with sharding.gradient_sync(s.model, last or not s.world.multi):
                    with autocast(s.device, s.precision):
                        out = run_model(s.model, piece)
                        if piece.rows == 0:  # an empty share still joins the gradient all-reduce
                            loss, share_units = out.sum() * 0.0, 0
                        else:
                            loss, share_units = objective.loss(out, piece)
                    scale = share_units * s.world.size / n_global
                    backward(s, loss if scale == 1 else loss * scale)
                piece_sum = loss.detach() * share_units
                total += piece_sum  # stays on the device: no sync point per step
                units += share_units
                if steps is not None:  # tracked: this step's own loss, kept on the device
                    step_sum, step_units = (
                        piece_sum if step_sum is None else step_sum + piece_sum,
                        step_units + share_units,
                    )
            optimizer_step(s, tc.grad_clip)
            s.state.step += 1
            if steps is not None:
                steps.append((s.state.step, lr, step_sum, step_units))
    loss_sum, count = distributed.all_sum([float(total), float(units)], s.world, s.device)
    return loss_sum / max(count, 1)


def evaluate_part(
    model: nn.Module, part: Any, family: Family, state: Any, device: torch.device, precision: str
) -> tuple[float, Any]:
    """Mean loss (per training unit: row or trained token) and the metrics stream of one split, streamed
    batch by batch."""
    objective = objective_for(state)
    stream = objective.stream()
    loss_sum = 0.0
    part = family.ordered(part)[0]  # texts by length: the metrics do not depend on the order
    for outputs, targets in iter_outputs(model, part.batches(family.eval_batch), device, precision):
        loss_sum += objective.update(stream, state, outputs, targets)
    return loss_sum / max(stream.n, 1), stream


def validate(s: Setup, tc: TrainConfig) -> dict[str, float]:
    loss, stream = evaluate_part(
        s.bare_model, s.data.validation, s.family, s.data.state, s.device, s.precision
    )
    return {"val_loss": loss, **{f"val_{k}": v for k, v in stream.epoch_result().items()}}


def improved(value: float, best: float | None, monitor: str) -> bool:
    if best is None:
        return True
    return value > best if monitor in MAXIMIZED_MONITORS else value < best


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    keys = ("train_loss", "val_loss", "val_accuracy", "val_r2")
    return {k.removeprefix("val_"): f"{record[k]:.4f}" for k in keys if record.get(k) is not None}


def _check_finite(loss: float, epoch: int, tc: TrainConfig) -> None:
    """A loss of NaN or infinity means training diverged: stop with the run resumable from its last
    good checkpoint, rather than train on and write NaN weights and metrics."""
    if not math.isfinite(loss):
        clip = "" if tc.grad_clip is not None else ", set train.grad_clip=1.0"
        raise DanluError(
            f"the training loss became {loss} in epoch {epoch} (training diverged)",
            f"lower train.lr (now {tc.lr:g}){clip}, or look for extreme values in the features",
        )


def _checkpoint(s: Setup, paths: list, config: Config, rng_states: list | None) -> None:
    """Write the checkpoint files in `paths`: rank 0 alone writes a whole model's; a sharded model's
    are written by every rank (rng_states: every rank's, on rank 0)."""
    trainable_only = s.family.checkpoint_trainable_only(config.model)
    args = (s.optimizer, s.scaler, asdict(s.state), config.model_dump(mode="json"), rng_states)
    if sharding.shards(config.train.strategy):
        ckpt.save_sharded(paths, s.model, *args, trainable_only, s.world)
        return
    for path in paths if s.world.main else ():
        ckpt.save_checkpoint(path, s.model, *args, trainable_only)


def fit(config: Config, run: RunDir, s: Setup, progress: bool = True, on_epoch=None, trackers=None) -> None:
    """Run epochs from s.state.epoch + 1 until the last epoch or early stopping.

    on_epoch(record, checkpoint_dir) is called on every rank after each epoch (Ray Train's reporting,
    `danlu tune`'s pruning); checkpoint_dir is set on rank 0, in the epochs that wrote a checkpoint.
    trackers: rank 0's experiment tracking (danlu.tracking.Trackers), given each epoch's record and steps.

    Every process trains; only rank 0 validates, logs, writes metrics and checkpoints, and decides early
    stopping, which it hands to the other ranks after each epoch."""
    tc = config.train
    main = s.world.main
    monitor_on = s.data.validation is not None or tc.monitor == "train_loss"
    bar = tqdm(
        total=tc.epochs,
        initial=s.state.epoch,
        unit="epoch",
        desc="train",
        disable=None if progress and main else True,
        dynamic_ncols=True,
    )
    metrics_file = open(run.metrics, "a") if main else contextlib.nullcontext()  # noqa: SIM115
    with bar, metrics_file:
        for epoch in range(s.state.epoch + 1, tc.epochs + 1):
            if s.state.stopped_early:
                break
            start = time.perf_counter()
            steps: list | None = [] if trackers else None
            record: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": train_epoch(s, tc, epoch, steps),
            }
            _check_finite(record["train_loss"], epoch, tc)  # every rank holds the same all-reduced loss
            record["lr"] = lr_at(s.state.step, s.total_steps, tc)
            evaluated = s.data.validation is not None and (epoch % tc.eval_every == 0 or epoch == tc.epochs)
            if evaluated and (main or s.sharded):  # a sharded model's forward takes every rank
                scores = validate(s, tc)
                record.update(scores if main else {})
            s.state.train_seconds += time.perf_counter() - start
            s.state.epoch = epoch
            record["seconds"] = round(s.state.train_seconds, 3)
            # each rank's RNG (dropout masks) goes into the checkpoint, so a resume replays every rank exactly
            rng_states = distributed.gather(ckpt.rng_state(s.device), s.world)  # None on other ranks
            best = saved = False
            if main:
                best = _track_best(s, tc, record, monitor_on)
                metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
                metrics_file.flush()
                if trackers:
                    trackers.epoch(record, s.state.step, steps)
                saved = epoch % tc.checkpoint_every == 0 or epoch == tc.epochs or s.state.stopped_early
            state, best, saved = distributed.broadcast((asdict(s.state), best, saved), s.world)
            s.state = TrainerState(**state)
            paths = [run.best_checkpoint] * best + [run.last_checkpoint] * saved
            if paths:
                _checkpoint(s, paths, config, rng_states)
            if on_epoch is not None:
                on_epoch(record, run.checkpoints if saved else None)
            bar.set_postfix(_postfix(record), refresh=False)
            bar.update(1)
            if evaluated and main:
                log.debug("epoch %d %s", epoch, _postfix(record))
    if s.state.stopped_early and main:
        log.info(
            "early stopping at epoch %d: %s last improved at epoch %s",
            s.state.epoch,
            tc.monitor,
            s.state.best_epoch,
        )


def _track_best(s: Setup, tc: TrainConfig, record: dict[str, Any], monitor_on: bool) -> bool:
    """Update the best value and early stopping from this epoch's record; True when it is the best yet
    (its weights become checkpoints/best.pt)."""
    if not (monitor_on and record.get(tc.monitor) is not None):
        return False  # not evaluated this epoch, or undefined on these rows (R^2 of one row)
    if improved(record[tc.monitor], s.state.best_value, tc.monitor):
        s.state.best_value, s.state.best_epoch, s.state.bad_evals = record[tc.monitor], record["epoch"], 0
        return True
    s.state.bad_evals += 1
    s.state.stopped_early = 0 < tc.patience <= s.state.bad_evals
    return False


def new_setup(config: Config, run: RunDir, world: World, device: torch.device) -> Setup:
    if world.main:
        # config.yaml with checkpoints/ marks the directory as danlu's from the start, so a run stopped
        # before its first checkpoint can still be replaced with --overwrite
        run.checkpoints.mkdir(exist_ok=True)
        atomic_write_text(run.config, dump_config(config))
    return _setup(config, run, None, world, device)


def resumed_setup(config: Config, run: RunDir, world: World, device: torch.device) -> Setup:
    """Rebuild the set-up of a stopped run and restore model, optimizer, RNG and loop state."""
    _, state = families.state_from_json(run.read_preprocess())
    s = _setup(config, run, state, world, device)
    state = ckpt.load_checkpoint(run.last_checkpoint)
    _restore(s, state, run, config, with_optimizer=True)
    if ckpt.SCALER_KEY in state:
        s.scaler.load_state_dict(state[ckpt.SCALER_KEY])
    per_rank = state.get(ckpt.RANK_RNG_KEY)
    ckpt.set_rng_state(
        per_rank[world.rank] if per_rank and len(per_rank) == world.size else state[ckpt.RNG_KEY], device
    )
    s.state = TrainerState(**state[ckpt.TRAINER_STATE_KEY])
    if world.main:
        # Epochs after the checkpoint will run again: drop their lines so metrics.jsonl has each epoch once.
        kept = [r for r in run.read_metrics() if r["epoch"] <= s.state.epoch]
        atomic_write_text(run.metrics, "".join(json.dumps(r) + "\n" for r in kept))
        log.info("resuming %s after epoch %d", run.path, s.state.epoch)
    return s


def _restore(s: Setup, record: dict[str, Any], run: RunDir, config: Config, with_optimizer: bool) -> None:
    """Load a checkpoint's weights (and the optimizer's state) into the set-up's model: a whole
    model's file on this rank, or a sharded checkpoint's shards on every rank (resharded when it was
    written by another number of processes)."""
    trainable_only = s.family.checkpoint_trainable_only(config.model)
    sharded = ckpt.SHARDS_KEY in record
    written = record.get(ckpt.STRATEGY_KEY, "fsdp" if sharded else "ddp")  # older records: by layout
    strategy = config.train.strategy
    if sharded != sharding.shards(strategy) or (sharded and written != strategy):
        raise DanluError(
            f"the run's checkpoint was written by train.strategy={written} but its config.yaml says "
            f"train.strategy={strategy}",
            "put train.strategy back as the run was trained, or train again",
        )
    if sharded:
        optimizer = s.optimizer if with_optimizer else None
        ckpt.load_sharded(run.checkpoints / record[ckpt.SHARDS_KEY], s.model, optimizer, trainable_only)
        return
    ckpt.restore_model(s.bare_model, record[ckpt.MODEL_KEY], trainable_only)
    if with_optimizer:
        s.optimizer.load_state_dict(record[ckpt.OPTIMIZER_KEY])


def final_setup(config: Config, run: RunDir, s: Setup) -> Setup | None:
    """Called on every rank after training: rank 0's set-up with the run's final model (the best
    checkpoint's weights with train.restore_best, else the last epoch's), None on the other ranks. A
    sharded model comes back whole: gathered one parameter at a time into rank 0's memory and loaded
    into a newly built model, which evaluate, export and serve then see like any other."""
    restore = (config.train.restore_best and run.best_checkpoint.is_file()) if s.world.main else False
    restore = distributed.broadcast(restore, s.world)
    if restore and (s.world.main or s.sharded):
        _restore(s, ckpt.load_checkpoint(run.best_checkpoint), run, config, with_optimizer=False)
    if not s.sharded:
        return s if s.world.main else None
    if not sharding.is_deepspeed(s.model):  # DeepSpeed's full weights come from its optimizer
        s.optimizer.state.clear()  # no more steps: its memory goes before the model is gathered
    whole = sharding.full_state(s.model)
    if not s.world.main:
        return None
    model = s.family.build_model(config.model, s.data.state)
    model.load_state_dict(whole)
    return replace(s, model=model.to(s.device))
