"""danlu tune: a hyperparameter search over danlu runs."""

from __future__ import annotations

from danlu.cli.options import config_and_overrides, number
from danlu.errors import DanluError

SPACE_EXAMPLE = """space file (danlu's own key paths):
  train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
  train.weight_decay: {low: 0, high: 0.1}
  model.hidden: {choices: [[64], [256, 256]]}
  model.dropout: {low: 0, high: 0.5}
  train.epochs: {low: 10, high: 50, step: 10}
"""


def add_tune(sub) -> None:
    import argparse

    p = sub.add_parser(
        "tune",
        help="search hyperparameters: an Optuna study of danlu runs",
        description="Search hyperparameters over runs of CONFIG: an Optuna study (TPE sampler, median "
        "pruning on train.monitor after every epoch) in OUT/study.db, each trial a run in "
        "OUT/trials/NNN/; OUT/best.yaml is the best trial's config, OUT/plots/ the optimization history "
        "and parameter importances. Run it again to continue a stopped search.",
        epilog=SPACE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "config", help="YAML config file: what every trial starts from (or none: KEY=VALUE overrides alone)"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.epochs=30")
    p.add_argument("--space", required=True, metavar="SPACE.yaml", help="the search space (see below)")
    p.add_argument("--trials", type=int, default=20, metavar="N", help="trials in all (default 20)")
    p.add_argument("--timeout", type=number, metavar="S", help="start no trial after S seconds")
    p.add_argument(
        "--jobs", type=int, default=1, metavar="K", help="trials at once, in K processes (default 1)"
    )
    p.add_argument("--out", help="the search's folder (default: the config's output + '-tune')")
    p.add_argument(
        "--backend",
        choices=["optuna", "ray"],
        default="optuna",
        help="ray: the same search on Ray Tune, trials on the Ray cluster's workers",
    )
    p.add_argument("--ray-address", help="with --backend ray: an existing cluster (default: a local Ray)")
    p.add_argument(
        "--sampler", choices=["tpe", "random"], default="tpe", help="tpe (default) or random sampling"
    )
    p.add_argument("--no-prune", action="store_true", help="run every trial to its last epoch")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    p.set_defaults(run=run_tune)


def run_tune(args) -> int:
    from danlu.config import check_data, load_config

    config = load_config(*config_and_overrides(args.config, args.overrides))  # one line before anything
    check_data(config.data)
    import danlu

    result = danlu.tune(
        config,
        args.space,
        trials=args.trials,
        out=args.out,
        timeout=args.timeout,
        jobs=args.jobs,
        backend=args.backend,
        sampler=args.sampler,
        prune=not args.no_prune,
        seed=args.seed,
        ray_address=args.ray_address,
    )
    print(trials_table(result))
    if result.best is None:
        raise DanluError(f"no trial of {result.out} completed", "see the failed trials' lines above")
    best = result.best
    print(f"\nbest      trial {best['number']:03d}: {result.monitor}={best['value']:.6g}  ({best['run']})")
    print(f"config    {best['config']}")
    print(f"plots     {result.out / 'plots'}")
    return 0


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trials_table(result) -> str:
    """The trials as a text table: number, state, value, epochs, seconds and each parameter."""
    from danlu.cli.output import table

    keys = sorted({k for row in result.trials for k in row["params"]})
    header = ["trial", "state", result.monitor, "epochs", "seconds", *keys]
    rows = [
        [
            f"{row['number']:03d}",
            row["state"],
            "" if row["value"] is None else _value(row["value"]),
            "" if row["epochs"] is None else str(row["epochs"]),
            "" if row["seconds"] is None else f"{row['seconds']:.1f}",
            *(_value(row["params"].get(k, "")) for k in keys),
        ]
        for row in result.trials
    ]
    return table(header, rows)
