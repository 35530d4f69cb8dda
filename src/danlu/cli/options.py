"""Options several verbs share."""

from __future__ import annotations


def add_trust_model_code(p) -> None:
    p.add_argument(
        "--trust-model-code",
        action="store_true",
        help="load a run whose model comes from code (model.target in its config.yaml), which loading "
        "imports and runs: only for runs whose code you trust",
    )
