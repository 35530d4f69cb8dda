"""danlu train and danlu quickstart."""

from __future__ import annotations

from danlu.cli.output import print_run
from danlu.errors import DanluError


def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train from a YAML config, with KEY=VALUE overrides (values parsed as YAML), "
        "into a run directory (default: runs/<config name>).",
    )
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.epochs=5 model.hidden=[64,32]"
    )
    p.add_argument("--out", help="run directory (default: output in the config, else runs/<config name>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(run=run_train)


def run_train(args) -> int:
    import danlu

    if args.resume:
        run = danlu.train(
            args.config, args.overrides, out=args.out, resume=args.resume, progress=not args.quiet
        )
    else:
        if not args.config:
            raise DanluError(
                "no config given", "run `danlu train CONFIG.yaml` or `danlu train --resume RUN_DIR`"
            )
        if "=" in args.config and not args.config.endswith((".yaml", ".yml")):
            raise DanluError(f"'{args.config}' looks like an override", "put the config file first")
        run = danlu.train(
            args.config, args.overrides, out=args.out, overwrite=args.overwrite, progress=not args.quiet
        )
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
    import danlu

    run, predictions = danlu.quickstart(out=args.out, overrides=args.overrides, progress=not args.quiet)
    print_run(run, [("predictions", predictions), ("next", f"danlu evaluate {run.path}")])
    return 0
