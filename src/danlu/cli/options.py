"""Options several verbs share."""

from __future__ import annotations

import argparse
import math


def add_trust_model_code(p) -> None:
    p.add_argument(
        "--trust-model-code",
        action="store_true",
        help="load a run whose model comes from code (model.target in its config.yaml), which loading "
        "imports and runs: only for runs whose code you trust",
    )


def add_skip_bad_images(p) -> None:
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="image runs: leave out images that cannot be read (damaged, missing, another format), "
        "named in a warning, instead of stopping at the first",
    )


def number(text: str) -> float:
    """A finite number, for options that take one (argparse's float takes nan and inf)."""
    value = float(text)  # a ValueError: argparse's "invalid number value"
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def config_and_overrides(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """(the config file, the overrides) of `danlu train|tune CONFIG KEY=VALUE...`: with no config file,
    the first override took CONFIG's place, and the overrides alone apply to the defaults."""
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *overrides]
    return config, list(overrides)
