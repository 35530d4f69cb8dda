"""The `danlu` command: parse arguments, call the library, print. One module per verb; each imports torch
and the library only inside its run function, so `danlu --help` stays fast."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from danlu import __version__
from danlu.cli.chat import add_chat
from danlu.cli.doctor import add_doctor
from danlu.cli.embed import add_embed
from danlu.cli.evaluate import add_evaluate
from danlu.cli.export import add_export
from danlu.cli.package import add_env, add_package
from danlu.cli.predict import add_predict
from danlu.cli.runs import add_runs
from danlu.cli.serve import add_serve
from danlu.cli.train import add_quickstart, add_train
from danlu.cli.tune import add_tune
from danlu.errors import DanluError, printable

EXAMPLES = """examples:
  danlu quickstart                                   train the tutorial workload end to end
  danlu train cfg.yaml train.epochs=5 model.hidden=[64,32] --out runs/small
  danlu train --resume runs/small                    continue a stopped run
  danlu tune cfg.yaml --space space.yaml --trials 30 an Optuna search; runs/cfg-tune/best.yaml
  danlu runs [runs/]                                 the runs under a folder; danlu runs compare A B
  danlu evaluate runs/small [test.csv] [--json]      metrics on the test split or on a file
  danlu predict runs/small new.csv -o predictions.csv
  danlu train digits.yaml data.train=digits/         images: a folder with one subfolder per class
  danlu train reviews.yaml model.pretrained=DIR      texts: data.text names the column; DIR a local encoder
  danlu embed CLIP_DIR photos/ -o vectors.parquet    embed images (or texts) with a local encoder
  danlu chat model.gguf                              chat with a local language model in the terminal
  danlu serve model.gguf                             an OpenAI-compatible chat server with a web page
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="danlu",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
        description="danlu: config-driven training, evaluation and prediction for PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"danlu {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or info logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (
        add_doctor,
        add_train,
        add_tune,
        add_runs,
        add_evaluate,
        add_predict,
        add_embed,
        add_export,
        add_serve,
        add_chat,
        add_package,
        add_env,
        add_quickstart,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also come after options (`train cfg.yaml --out runs/x train.epochs=5`)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="danlu: %(message)s", stream=sys.stderr)
    if not args.debug:
        logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        return args.run(args)
    except DanluError as exc:
        if args.debug:
            raise
        print(f"danlu: error: {printable(str(exc))}", file=sys.stderr)  # one line, whatever it quotes
        return 2
    except KeyboardInterrupt:
        print(
            "danlu: interrupted (a stopped run continues with `danlu train --resume RUN_DIR`)",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:  # the reader left (`danlu ... | head`): nothing more to say, and no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit fails too
        return 141
