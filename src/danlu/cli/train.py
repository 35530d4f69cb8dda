"""danlu train and danlu quickstart."""

from __future__ import annotations

import os

from danlu.cli.options import config_and_overrides
from danlu.cli.output import print_run
from danlu.errors import DanluError


def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train from a YAML config, with KEY=VALUE overrides (values parsed as YAML), "
        "into a run directory (default: runs/<config name>); or from overrides alone "
        "(danlu train data.train=FILE data.target=COLUMN), into runs/run.",
    )
    p.add_argument(
        "config", nargs="?", help="YAML config file (or none: KEY=VALUE overrides alone, into runs/run)"
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.epochs=5 model.hidden=[64,32]"
    )
    p.add_argument("--out", help="run directory (default: output in the config, else runs/<config name>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument(
        "--log-to",
        metavar="TRACKERS",
        help="track the run in tensorboard, mlflow or both (comma-separated; sets train.log_to): "
        "TensorBoard event files in RUN/tensorboard/, an MLflow run in MLFLOW_TRACKING_URI's store",
    )
    p.add_argument(
        "--show-sample",
        action="store_true",
        help="fine-tuning a language model: print the first conversation (or text) as trained, with its "
        "trained tokens between [[ ]], and stop (nothing is written)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train in N processes on this machine through torchrun (gloo on CPU, nccl with one GPU each)",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="K",
        help="with --nproc: restart the processes up to K times after a failure, from the last checkpoint",
    )
    nodes = p.add_argument_group(
        "several machines (torchrun)",
        "Start the same command on every machine, with its own --node-rank; each starts --nproc "
        "processes. The run directory should be on storage every machine sees (checkpoints are "
        "read back by every process on --resume).",
    )
    nodes.add_argument("--nnodes", type=int, default=1, metavar="M", help="machines in the run (default 1)")
    nodes.add_argument("--node-rank", type=int, default=0, metavar="R", help="this machine's place, 0 to M-1")
    nodes.add_argument("--master-addr", metavar="HOST", help="the address of machine 0, reachable from all")
    nodes.add_argument(
        "--master-port", type=int, default=29500, metavar="PORT", help="a free port on machine 0 (29500)"
    )
    p.add_argument(
        "--backend",
        choices=["torchrun", "ray"],
        default="torchrun",
        help="ray: run on Ray Train workers (pip install 'danlu[ray]')",
    )
    p.add_argument("--workers", type=int, help="with --backend ray: Ray Train workers (default 2)")
    p.add_argument("--ray-address", help="with --backend ray: an existing cluster (default: a local Ray)")
    p.add_argument(
        "--ray-storage",
        help="with --backend ray: where Ray keeps reported checkpoints (default ~/ray_results; "
        "shared storage on a multi-node cluster)",
    )
    p.set_defaults(run=run_train)


def _config_for(args):
    """The config this command trains: the file with its overrides, or a stopped run's own. It is read and
    checked here, once, before torch is imported, so a mistake comes back at once."""
    from danlu.training.launch import checked_config

    if not (args.config or args.overrides or args.resume):
        raise DanluError(
            "no config given",
            "run `danlu train CONFIG.yaml`, `danlu train data.train=FILE data.target=COLUMN` or "
            "`danlu train --resume RUN_DIR`",
        )
    return checked_config(args.config, args.overrides, args.out, args.resume, args.overwrite)


def _launch(args):
    """The flags that start several processes (they bear Launch's field names), checked."""
    from dataclasses import fields

    from danlu.training.launch import Launch

    launch = Launch(**{field.name: getattr(args, field.name) for field in fields(Launch)})
    launch.check()
    return launch


def log_to_override(value: str, resume: str | None) -> str:
    """--log-to tensorboard,mlflow as the override train.log_to=[tensorboard,mlflow]."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in ("tensorboard", "mlflow")]
    if unknown or not names:
        raise DanluError(
            f"--log-to {value}: unknown tracker {', '.join(unknown) or '(none)'}",
            "use tensorboard, mlflow or tensorboard,mlflow",
        )
    if resume:
        raise DanluError("--log-to is not for --resume", "a resumed run tracks as its config.yaml says")
    return f"train.log_to=[{','.join(names)}]"


def run_train(args) -> int:
    args.config, args.overrides = config_and_overrides(args.config, args.overrides)
    if args.show_sample:
        if not (args.config or args.overrides) or args.resume:
            raise DanluError("--show-sample takes a config", "run `danlu train CONFIG.yaml --show-sample`")
        import danlu

        print(danlu.show_sample(args.config, args.overrides))
        return 0
    if args.log_to:
        args.overrides = [*args.overrides, log_to_override(args.log_to, args.resume)]
    launch = _launch(args)
    config = _config_for(args)
    from danlu.training import launch as launching

    if launch.backend == "ray":
        run, result = launching.ray(launch, config, args.out, args.resume, args.overwrite)
        checkpoint = result.checkpoint.path if result.checkpoint else "none"
        reported = f"last epoch reported {result.metrics.get('epoch', 'none')}, checkpoint {checkpoint}"
        print_run(run, [("ray", reported)])
        return 0
    if launch.nproc is not None:
        flags = ["--debug"] * args.debug + ["--quiet"] * args.quiet
        run_args = (args.config, args.overrides, args.out, args.resume, args.overwrite, flags)
        return launching.torchrun(launch, config, *run_args)
    from danlu.training.strategies import check_processes

    check_processes(config.train.strategy, int(os.environ.get("WORLD_SIZE", "1")))  # before torch
    import danlu
    from danlu.training.distributed import world_from_env

    if args.resume:  # alone: _config_for refused a config, overrides or --out beside it
        run = danlu.train(resume=args.resume, progress=not args.quiet)
    else:
        run = danlu.train(config, out=args.out, overwrite=args.overwrite, progress=not args.quiet)
    if world_from_env().main:  # under torchrun, one summary (rank 0's)
        print_run(run)
    return 0


def add_quickstart(sub) -> None:
    p = sub.add_parser(
        "quickstart",
        help="train, evaluate and predict a demo workload end to end",
        description="The PyTorch tutorial workload (100k synthetic rows, 3 classes, a 10-20-3 MLP, "
        "101 epochs) trained, evaluated and predicted end to end.",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.epochs=10")
    p.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart)")
    p.set_defaults(run=run_quickstart)


def run_quickstart(args) -> int:
    from danlu.run import RunDir

    RunDir(args.out).check_new(overwrite=True)  # before torch is imported
    import danlu

    run, predictions = danlu.quickstart(out=args.out, overrides=args.overrides, progress=not args.quiet)
    print_run(run, [("predictions", predictions), ("next", f"danlu evaluate {run.path}")])
    return 0
