"""Families: one typed contract (`danlu.families.contract.Family`) for every kind of data.

A family is one package (`families/tabular/`, `families/image/`, ...) whose `FAMILY` is its `Family`
object, registered by one line in FAMILIES below. This module imports no family until one is asked for,
so config validation knows the names without loading torch.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from danlu.errors import DanluError

if TYPE_CHECKING:
    from danlu.config import Config, DataConfig, ModelConfig
    from danlu.families.contract import Family

# name -> the module whose FAMILY is that family's contract; auto-detection asks them in this order
FAMILIES: dict[str, str] = {
    "tabular": "danlu.families.tabular",
    "image": "danlu.families.image",
    "text": "danlu.families.text",
    "causal_lm": "danlu.families.causal_lm",
}
# families whose training data has no target column (conversations): config checks data.target by these
NO_TARGET = frozenset({"causal_lm"})


def register(name: str, module: str) -> None:
    """Add a family whose package lives outside danlu (the tests' toy family): the same as a line in
    FAMILIES, for this process."""
    FAMILIES[name] = module


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise DanluError(f"unknown data.family '{name}'", f"use one of auto, {', '.join(FAMILIES)}")
    family = import_module(FAMILIES[name]).FAMILY
    if family.name != name:
        raise DanluError(
            f"family '{name}' is registered as {FAMILIES[name]}, whose FAMILY is named '{family.name}'",
            "register the family under its own name",
        )
    return family


def name_for(data: DataConfig, model: ModelConfig | None = None) -> str:
    """data.family, or for auto the first family that claims the source (and model), else the fallback
    (tables)."""
    if data.family != "auto":
        return data.family
    from danlu.config import ModelConfig

    model = model if model is not None else ModelConfig()
    every = [get(name) for name in FAMILIES]
    claimed = next((f for f in every if not f.fallback and f.detect(data, model)), None)
    chosen = claimed or next((f for f in every if f.fallback), None)
    if chosen is None:
        raise DanluError(f"no family reads '{data.train}'", "set data.family")
    return chosen.name


def resolve_family(config: Config) -> Config:
    """The config as saved: data.family resolved (auto -> the family that claims the source), model.type
    checked against what the family builds, and the family's model and train defaults filled in where
    the config left them unset."""
    name = name_for(config.data, config.model)
    family = get(name)
    family.check_model_type(config.model.type)
    model = {k: v for k, v in family.model_defaults.items() if getattr(config.model, k) in (None, "auto")}
    train = {k: v for k, v in family.train_defaults.items() if k not in config.train.model_fields_set}
    return config.model_copy(
        update={
            "data": config.data.model_copy(update={"family": name}),
            "model": config.model.model_copy(update=model),
            "train": config.train.model_copy(update=train),
        }
    )


def family_of(state_json: str) -> Family:
    """The family of a run's preprocess.json; runs written before families were tabular."""
    import json

    return get(json.loads(state_json).get("family", "tabular"))


def state_from_json(text: str, run_dir: Path | None = None) -> tuple[Family, Any]:
    """(family, state) from a run's preprocess.json.
    run_dir: a finished run the state may read files from (text: the tokenizer in RUN/hf)."""
    family = family_of(text)
    state = family.state_from_json(text)
    if run_dir is not None:
        family.bind(state, run_dir)
    return family, state
