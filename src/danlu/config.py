"""The whole config schema in one place: defaults -> YAML -> `a.b=value` overrides, all typed.

Unknown keys and wrong types are `DanluError`s naming the key path (and the closest valid key for typos).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from danlu.errors import DanluError, not_utf8

SCHEMA_VERSION = 1
SYNTHETIC_PREFIX = "synthetic:"
TABLE_SUFFIXES = (".csv", ".parquet", ".pq", ".npy", ".jsonl")  # sources that need data.target

CLASSIFICATION_MONITORS = ("val_loss", "val_accuracy", "val_f1_macro", "train_loss")
REGRESSION_MONITORS = ("val_loss", "val_mae", "val_rmse", "val_r2", "train_loss")
GENERATION_MONITORS = ("val_loss", "val_perplexity", "train_loss")
MAXIMIZED_MONITORS = ("val_accuracy", "val_f1_macro", "val_r2")  # the rest improve by going down


class Section(BaseModel):
    # a NaN or infinity is never a setting (and the resolved config is written to the run as strict JSON)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SyntheticConfig(Section):
    """Parameters of sklearn's make_classification / make_regression (defaults: the tutorial workload)."""

    n_samples: int = Field(100_000, ge=2, description="rows to generate")
    n_features: int = Field(10, ge=1, description="feature columns x0..x{n-1}")
    n_informative: int = Field(5, ge=1, description="informative features")
    n_redundant: int = Field(2, ge=0, description="linear combinations of informative ones (classification)")
    n_classes: int = Field(3, ge=2, description="classes (classification)")
    n_clusters_per_class: int = Field(1, ge=1, description="clusters per class (classification)")
    flip_y: float = Field(0.05, ge=0, le=1, description="fraction of randomly flipped labels")
    class_sep: float = Field(1.0, gt=0, description="class separation (classification)")
    noise: float = Field(10.0, ge=0, description="gaussian noise on the target (regression)")
    random_state: int = Field(42, description="generator seed")


class DataConfig(Section):
    train: str = Field(
        description="training data: CSV, Parquet, NPZ, NPY, or synthetic:classification|regression"
    )
    family: str = Field(
        "auto", description="kind of data: auto (the family that claims the source), or a family's name"
    )
    text: str | None = Field(None, description="text family: the column of texts in a CSV/Parquet/JSONL")
    max_length: int = Field(
        256,
        ge=8,
        description="text family: tokens per text (longer texts are truncated); causal LMs: tokens per "
        "conversation (see on_long)",
    )
    on_long: Literal["skip", "error"] = Field(
        "skip",
        description="causal LMs: a conversation longer than max_length is skipped (and counted) or an error",
    )
    packing: bool = Field(
        False,
        description="causal LMs: several conversations per row of up to max_length tokens, each attending "
        "only to itself (less padding)",
    )
    group_by_length: bool | None = Field(
        None,
        description="texts and causal LMs: training batches of similar lengths (less padding); default "
        "yes for texts, no for conversations (see README: it cost held-out loss when fine-tuning)",
    )
    image: str | None = Field(None, description="image family: the column of image paths in a CSV/Parquet")
    image_size: int | list[int] | None = Field(
        None, description="image family: resize to SIZE or [height, width]; default the images' own size"
    )
    color: Literal["auto", "grayscale", "rgb"] = Field(
        "auto", description="image family: channels; auto: grayscale when every training image is"
    )
    augment: Literal["none", "light", "standard"] = Field(
        "none", description="image family: light: random shifts (padded crops); standard: also flips"
    )
    skip_bad_images: bool = Field(False, description="image family: skip unreadable images (counted)")
    validation: str | None = Field(None, description="validation file; default: split from train")
    test: str | None = Field(None, description="test file; default: split from train")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="validation split when no validation file")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="test split when no test file")
    stratify: bool = Field(True, description="stratify splits by class (classification)")
    split_seed: int = Field(0, description="seed of the train/validation/test split")
    target: str | None = Field(None, description="target column (default for synthetic: label / target)")
    features: list[str] | None = Field(None, description="feature columns; default: all but the target")
    categorical: list[str] = Field(default_factory=list, description="columns to treat as categorical")
    max_categories: int | None = Field(
        10_000,
        ge=1,
        description="categorical columns keep their N most common training values; the rest share the "
        "unknown value's index (null: keep every value)",
    )
    task: Literal["auto", "classification", "regression"] = Field("auto", description="inferred when auto")
    in_memory: Literal["auto"] | bool = Field("auto", description="auto: in memory if under the budget")
    memory_budget_gb: float | None = Field(
        None, gt=0, description="budget for in_memory=auto; default a quarter of available RAM"
    )
    chunk_rows: int = Field(262_144, ge=1024, description="rows per chunk when training out of memory")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @field_validator("family")
    @classmethod
    def _known_family(cls, name: str) -> str:
        from danlu.families import FAMILIES  # the registry's names: no family is imported

        if name != "auto" and name not in FAMILIES:
            choices = ["auto", *FAMILIES]
            raise ValueError(f"unknown family '{name}'{_closest(name, choices)}; choose one of {choices}")
        return name

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("data.val_fraction + data.test_fraction must be below 1")
        from danlu.families import NO_TARGET  # the registry's names: no family is imported

        # conversations (family auto) are told from tables by model.pretrained: Config checks those
        untargeted = self.family == "auto" or self.family in NO_TARGET
        needs_target = Path(self.train).suffix.lower() in TABLE_SUFFIXES and not untargeted
        if self.target is None and needs_target:
            raise ValueError("data.target is required: name the column to predict, e.g. data.target=label")
        size = self.image_size
        if size is not None and (
            (isinstance(size, int) and size < 1)
            or (isinstance(size, list) and (len(size) != 2 or min(size) < 1))
        ):
            raise ValueError("data.image_size must be a positive size or [height, width]")
        if self.train.startswith(SYNTHETIC_PREFIX):
            kind = self.train[len(SYNTHETIC_PREFIX) :]
            if kind not in ("classification", "regression"):
                raise ValueError(
                    f"data.train: unknown generator '{self.train}'; "
                    "use synthetic:classification or synthetic:regression"
                )
            if self.target is None:
                self.target = "label" if kind == "classification" else "target"
        return self


class ModelConfig(Section):
    type: str = Field(
        "auto", description="a built-in architecture of the data's family; auto: the family's default"
    )
    pretrained: str | None = Field(
        None,
        description="text family: a local Hugging Face encoder directory (config.json, safetensors weights, "
        "tokenizer files); causal LMs: a local causal-LM directory or GGUF file; never downloaded",
    )
    adapter: Literal["lora", "none"] = Field(
        "lora", description="causal LMs: train a LoRA adapter (peft), or every weight (none)"
    )
    lora_r: int = Field(16, ge=1, description="causal LMs: the LoRA rank")
    lora_alpha: float = Field(32, gt=0, description="causal LMs: the LoRA scale numerator (alpha / r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="causal LMs: dropout on the LoRA input")
    lora_targets: list[str] | None = Field(
        None,
        description="causal LMs: module names LoRA adapts; default every linear projection of the blocks",
    )
    template: str | None = Field(
        None,
        description="causal LMs: the chat template (chatml, llama3, zephyr, starchat or a Jinja file); "
        "default the tokenizer's own. Stored in the run and served with it",
    )
    freeze_encoder: bool = Field(False, description="text family: train the head only")
    hidden: list[int] | None = Field(
        None, description="hidden layer sizes; default [256, 256] (mlp), [128] (cnn)"
    )
    channels: list[int] | None = Field(
        None, description="image family: conv widths; default [32, 64] (cnn), [32, 64, 128] (resnet)"
    )
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="hidden activation")
    dropout: float | None = Field(
        None, ge=0, lt=1, description="dropout; default 0.1 (mlp), 0.25 and 0.5 (cnn), 0 (resnet)"
    )
    normalization: Literal["none", "batchnorm", "layernorm"] = Field(
        "none", description="normalization after each hidden linear layer"
    )
    categorical: Literal["embedding", "onehot"] = Field("embedding", description="how categoricals enter")
    embedding_dim: int | None = Field(None, ge=1, description="default: min(16, (cardinality + 1) // 2)")
    target: str | None = Field(None, description='your own nn.Module: "package.module:ClassName"')
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for target")

    @field_validator("hidden", "channels")
    @classmethod
    def _positive(cls, sizes: list[int] | None) -> list[int] | None:
        if sizes is not None and any(h < 1 for h in sizes):
            raise ValueError("sizes must be positive integers")
        return sizes

    @field_validator("target")
    @classmethod
    def _import_path(cls, target: str | None) -> str | None:
        if target is not None and (target.count(":") != 1 or not all(target.split(":"))):
            raise ValueError(f"'{target}' is not of the form package.module:ClassName")
        return target


class TrainConfig(Section):
    epochs: int = Field(200, ge=1, description="maximum epochs")
    batch_size: int | Literal["auto"] = Field("auto", description="rows per step; auto: from data size")
    optimizer: Literal["adam", "adamw", "sgd", "adadelta"] = Field("adamw", description="optimizer")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="weight decay")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum (sgd)")
    schedule: Literal["none", "cosine", "onecycle", "step", "linear"] = Field(
        "cosine",
        description="learning-rate schedule; step: times step_gamma after every epoch; linear: down to 0",
    )
    warmup: float = Field(
        0.0, ge=0, lt=1, description="share of the steps that warm the learning rate up linearly from 0"
    )
    step_gamma: float = Field(0.7, gt=0, le=1, description="schedule step: the factor per epoch")
    patience: int = Field(20, ge=0, description="early stopping: evaluations without improvement; 0 = off")
    monitor: str = Field("val_loss", description="metric for early stopping and the best checkpoint")
    restore_best: bool = Field(True, description="end with the best weights, not the last")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this value")
    seed: int = Field(0, description="seed for initialisation, shuffling and dropout")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto: cuda, then mps, then cpu"
    )
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "fp32",
        description="fp32; bf16 autocast (GPU, or a CPU with bf16 support); fp16 (GPU, with a gradient "
        "scaler); auto: bf16 where the device supports it, else fp32",
    )
    eval_every: int = Field(1, ge=1, description="validate every N epochs")
    checkpoint_every: int = Field(1, ge=1, description="write checkpoints/last.pt every N epochs")
    accumulate: int = Field(
        1, ge=1, description="micro-batches per optimizer step (batch_size is the whole step, all processes)"
    )
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="several processes: ddp (each holds the whole model, its gradients and optimizer "
        "state), fsdp (PyTorch's FSDP2: each holds 1/N of them) or deepspeed (ZeRO, train.zero_stage)",
    )
    zero_stage: int = Field(
        2,
        ge=1,
        le=3,
        description="train.strategy=deepspeed: ZeRO stage; 1 shards the optimizer state, 2 also the "
        "gradients, 3 also the parameters",
    )
    dist_timeout: float = Field(
        300, gt=0, description="seconds a multi-process run waits on its peers before failing"
    )
    loss_on: Literal["assistant", "last_turn", "all"] = Field(
        "assistant",
        description="causal LMs: the tokens trained: every assistant turn (with its end-of-turn token), "
        "the last one only, or every token",
    )
    gradient_checkpointing: bool = Field(
        False, description="causal LMs: recompute activations in backward (less memory, about 30% slower)"
    )
    log_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="experiment tracking: tensorboard (event files in RUN/tensorboard/), mlflow (a run in "
        "MLflow's tracking store: MLFLOW_TRACKING_URI, else MLflow's default in the working directory)",
    )
    experiment: str | None = Field(
        None, description="log_to mlflow: the MLflow experiment (default MLFLOW_EXPERIMENT_NAME, else danlu)"
    )

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("batch_size must be a positive integer or auto")
        return value

    @field_validator("monitor")
    @classmethod
    def _monitor(cls, value: str) -> str:
        known = sorted(set(CLASSIFICATION_MONITORS + REGRESSION_MONITORS + GENERATION_MONITORS))
        if value not in known:
            raise ValueError(f"unknown metric '{value}'{_closest(value, known)}; choose one of {known}")
        return value


class Config(Section):
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: str = Field("runs/run", description="run directory")

    @model_validator(mode="after")
    def _target(self) -> Config:
        """A table needs data.target; conversations for a causal LM (model.pretrained) do not."""
        from danlu.serve.chat.model import is_causal_lm  # reads config.json only

        data = self.data
        if (
            data.family == "auto"
            and data.target is None
            and Path(data.train).suffix.lower() in TABLE_SUFFIXES
        ) and (self.model.pretrained is None or not is_causal_lm(self.model.pretrained)):
            raise ValueError("data.target is required: name the column to predict, e.g. data.target=label")
        return self


def _closest(name: str, candidates: list[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


def _fields_at(path: tuple[str | int, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # Union members add their own location parts (e.g. 'int', 'literal[...]'); keep real keys only.
    keys = []
    for part in loc:
        if isinstance(part, int) or (
            isinstance(part, str) and not part.startswith(("literal[", "int", "bool"))
        ):
            keys.append(part)
    path = ".".join(str(p) for p in keys) or "config"
    kind = error["type"]
    if kind == "extra_forbidden":
        parent, name = keys[:-1], str(keys[-1])
        prefix = "".join(f"{p}." for p in parent)
        return f"unknown key '{path}'{_closest(name, _fields_at(tuple(parent)), prefix)}"
    if kind == "missing":
        return f"missing required key '{path}'"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        return message if message.startswith("data.") else f"{path}: {message}"
    return f"{path}: {message}, got {error.get('input')!r}"


def check_batch_split(tc: TrainConfig, processes: int) -> None:
    """train.batch_size is one step's global batch: it must split evenly over processes x micro-batches."""
    parts = processes * tc.accumulate
    if tc.batch_size != "auto" and tc.batch_size % parts:
        raise DanluError(
            f"train.batch_size={tc.batch_size} does not divide into {processes} process(es) x "
            f"train.accumulate={tc.accumulate}",
            f"use a multiple of {parts}, e.g. train.batch_size={max(parts, tc.batch_size // parts * parts)}",
        )


def validate(raw: dict[str, Any]) -> Config:
    """Build a typed Config from a plain dict, turning validation errors into one clear DanluError."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise DanluError(
            f"invalid config: {_describe(first)}{suffix}", "see `danlu train --help` and README"
        ) from None


def load_yaml(path: str | os.PathLike) -> Any:
    """A YAML file's contents, whatever they are (None for an empty file); a file that is not YAML is one
    line naming where it stops being YAML."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise DanluError(f"cannot parse '{path}'{where}: {problem}", "fix the YAML syntax") from None
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc, "save it as UTF-8, or pass a YAML file") from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A config file's mapping of sections."""
    path = Path(path)
    if not path.is_file():
        raise DanluError(f"config file '{path}' not found", "check the path, or run `danlu quickstart`")
    raw = load_yaml(path)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DanluError(f"'{path}' must hold a mapping of sections (data:, model:, train:)", "see README")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides; values are parsed as YAML (`5`, `[64,32]`, `true`, `null`)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise DanluError(f"override '{item}' is not KEY=VALUE", "write e.g. train.epochs=5")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise DanluError(f"override '{item}': '{part}' is not a section", "check the key path")
            node = child
        node[parts[-1]] = value
    return raw


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or start from defaults when path is None) and apply overrides.

    A config file that names no `output` trains into runs/<file name without suffix>.
    """
    raw = apply_overrides(read_yaml(path) if path is not None else {}, list(overrides))
    if path is not None:
        raw.setdefault("output", f"runs/{Path(path).stem}")
    return validate(raw)


def as_config(config: Config | dict | str | os.PathLike | None, overrides: Iterable[str] = ()) -> Config:
    """A config object, mapping or YAML path (None: the defaults) with KEY=VALUE overrides applied."""
    if isinstance(config, Config):  # unset keys stay unset, so family defaults still apply to them
        return validate(apply_overrides(config.model_dump(mode="json", exclude_unset=True), list(overrides)))
    if isinstance(config, dict):
        return validate(apply_overrides(dict(config), list(overrides)))
    return load_config(config, list(overrides))


def resolve_paths(config: Config, base: Path) -> Config:
    """Make data paths and model.pretrained absolute (relative to `base`) so the saved config reproduces
    the run anywhere (a model.pretrained that does not exist stays as written, for its error message)."""
    data = config.data
    updates = {name: str((base / value).resolve()) for name, value in data_files(data).items()}
    model = config.model
    if model.pretrained is not None and Path(base / model.pretrained).expanduser().exists():
        model = model.model_copy(update={"pretrained": str((base / model.pretrained).expanduser().resolve())})
    return config.model_copy(update={"data": data.model_copy(update=updates), "model": model})


def data_files(data: DataConfig) -> dict[str, str]:
    """data.train, validation and test where they name a file or folder (not synthetic data), by key."""
    values = {"train": data.train, "validation": data.validation, "test": data.test}
    return {k: v for k, v in values.items() if v is not None and not v.startswith(SYNTHETIC_PREFIX)}


def existing_data(spec: str, what: str = "data file") -> Path:
    """The path a data.train/validation/test value names, which must exist (a file or a folder), or a
    pattern of Parquet shards (data/train-*.parquet) that must match a file."""
    path = Path(spec)
    if is_pattern(path):
        if not any(p.is_file() for p in path.parent.glob(path.name)):
            raise DanluError(
                f"{what} '{spec}' matches no file", "check the pattern in the config or on the command line"
            )
        return path
    if not path.exists():
        raise DanluError(f"{what} '{spec}' not found", "check the path in the config or on the command line")
    return path


def is_pattern(path: Path) -> bool:
    """The path's last part is a glob pattern (*, ? or [...]) and no file of that very name exists."""
    return any(c in path.name for c in "*?[") and not path.exists()


def check_data(data: DataConfig) -> None:
    """Every data file the config names exists, has data rows and holds the columns the config names: a
    mistyped path or column name, the commonest mistakes, is said before torch and the data load (paths
    relative to the working directory, as training reads them)."""
    from danlu.data.columns import check_data_files

    for name, value in data_files(data).items():
        existing_data(value, f"data file (data.{name})")
    check_data_files(data)


def dump_config(config: Config) -> str:
    header = (
        f"# danlu resolved config (schema {SCHEMA_VERSION}); `danlu train` this file to reproduce the run\n"
    )
    body = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    return header + body
