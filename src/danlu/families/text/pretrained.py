"""Local Hugging Face encoder directories: checked before anything loads, loaded without the network and
without remote code, and quietly (transformers narrates loading on the user's screen otherwise)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from danlu.errors import DanluError
from danlu.hf import load_files, quiet_transformers

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
# model types whose position ids start after the padding index: two positions are not usable
OFFSET_POSITIONS = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "longformer": 2}


def check_dir(spec: str | None) -> Path:
    """The encoder directory, or DanluError: not set, a hub id, missing config, weights or tokenizer."""
    if spec is None:
        raise DanluError(
            "the text family needs model.pretrained",
            "set model.pretrained=PATH, a local Hugging Face encoder directory (BERT, MiniLM, RoBERTa...)",
        )
    path = Path(spec).expanduser()
    if not path.exists():
        hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
        hint = (
            f"'{spec}' looks like a hub id; danlu never downloads: pass a local directory "
            "(e.g. one written by save_pretrained, or `huggingface-cli download` run by you)"
            if hub_id
            else "pass a local Hugging Face encoder directory with config.json, weights and tokenizer"
        )
        raise DanluError(f"model.pretrained '{spec}' does not exist", hint)
    if not path.is_dir():
        raise DanluError(f"model.pretrained '{spec}' is not a directory", "pass the model's directory")
    if not (path / "config.json").is_file():
        raise DanluError(f"'{spec}' has no config.json", "pass a Hugging Face model directory")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        found = "pytorch_model.bin" if (path / "pytorch_model.bin").is_file() else None
        raise DanluError(
            f"'{spec}' has no safetensors weights (model.safetensors)"
            + (" (only pytorch_model.bin, a pickle danlu does not load)" if found else ""),
            "save the model with save_pretrained(..., safe_serialization=True) into this directory",
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise DanluError(
            f"'{spec}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)",
            "save the tokenizer beside the model: tokenizer.save_pretrained(DIR)",
        )
    return path


def encoder_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise DanluError(
            f"cannot read '{path / 'config.json'}': {exc}", "check the model directory"
        ) from None


def position_limit(config: dict) -> int | None:
    """The most tokens the encoder's position embeddings allow (None: no limit stated)."""
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int):
        return None
    return positions - OFFSET_POSITIONS.get(config.get("model_type", ""), 0)


def check_max_length(max_length: int, path: Path) -> None:
    limit = position_limit(encoder_config(path))
    if limit is not None and max_length > limit:
        raise DanluError(
            f"data.max_length={max_length} is beyond the {limit} positions of '{path}'",
            f"set data.max_length={limit} or lower",
        )


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    with quiet_transformers():
        try:
            return load_files(AutoTokenizer, path)
        except Exception as exc:
            raise DanluError(
                f"cannot load the tokenizer of '{path}': {exc}".splitlines()[0],
                "check the tokenizer files in the model directory",
            ) from None


def tokenizer_fingerprint(path: Path) -> str:
    """SHA-256 over the tokenizer files: the tokenization cache key's tokenizer part."""
    digest = hashlib.sha256()
    names = (*TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json", "merges.txt")
    for name in sorted(names):
        file = path / name
        if file.is_file():
            digest.update(name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()
