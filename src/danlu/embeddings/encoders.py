"""Encoders from local Hugging Face directories: image-text models (CLIP, SigLIP) and text encoders
(BERT/MiniLM, with sentence-transformers' pooling files when present). They embed texts and images and
classify images against labels named at run time (zero-shot).

What the checkpoint says is what runs: the activation comes with the model's config (transformers builds
QuickGELU where CLIP's config names it); CLIP scores labels by a softmax over logit_scale * cosine, SigLIP
by a sigmoid of logit_scale * cosine + logit_bias, with its text padded to the length it was trained at
(padding to the longest text instead changes its embeddings). A text over the model's limit is an error,
or truncated at its end or start, as asked. Label embeddings are computed once per (labels, templates)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from danlu.embeddings.detect import (
    IMAGE_TEXT,
    TRUNCATE,
    is_text_encoder,
    json_file,
    local_model_dir,
    model_type,
)
from danlu.embeddings.files import check_templates
from danlu.errors import DanluError, one_line

MAX_ASPECT = 50  # the most an image's long side may exceed its short side (check_shape)
SPREAD = 0.5  # a batch's shortest text is at least this share of its longest (by_length)
PRECISIONS = ("float32", "bfloat16")
MIN_COSINE = 0.9999  # bfloat16 is taken only where every check vector agrees with float32 this well
CHECK_TEXTS = [
    "a photo of a cat",
    "an old car parked in the street at night, its lights still on",
    "two dogs",
    "the quick brown fox jumps over the lazy dog while the cat sleeps on a warm sofa by the window",
]


class TextTower:
    """Tokenizing within a model's limit, as the model was trained to read its text."""

    def __init__(self, tokenizer: Any, limit: int, pad_to_limit: bool) -> None:
        self.tokenizer, self.limit, self.pad_to_limit = tokenizer, limit, pad_to_limit

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Each text's tokens, special tokens included, before any truncation."""
        return [len(ids) for ids in self.tokenizer(list(texts), truncation=False)["input_ids"]]

    def check(self, texts: Sequence[str], truncate: str, counts: list[int] | None = None) -> None:
        """Raises DanluError for an unknown truncate, or (truncate="error") naming the first text over the
        limit; counts: token_counts(texts), when the caller has them."""
        if truncate not in TRUNCATE:
            raise DanluError(f"truncate must be one of {', '.join(TRUNCATE)}, not '{truncate}'", "e.g. end")
        if truncate == "error":
            for i, count in enumerate(counts if counts is not None else self.token_counts(texts)):
                if count > self.limit:
                    raise DanluError(
                        f"text {i} has {count} tokens; this model reads at most {self.limit}",
                        "shorten it, or truncate it (--truncate end or start)",
                    )

    def encode(self, texts: Sequence[str], truncate: str = "end") -> dict[str, torch.Tensor]:
        """Token ids and attention mask of a batch, each text within the limit (cut at its start or end)."""
        self.tokenizer.truncation_side = "left" if truncate == "start" else "right"
        padding = "max_length" if self.pad_to_limit else True
        return self.tokenizer(
            list(texts), padding=padding, truncation=True, max_length=self.limit, return_tensors="pt"
        )


def _longest_first(texts: Sequence[str]) -> list[int]:
    return sorted(range(len(texts)), key=lambda i: -len(texts[i]))


def by_length(texts: Sequence[str], batch_size: int, spread: float | None = None) -> list[list[str]]:
    """Batches of texts of similar length, longest first (by characters): a batch ends at batch_size
    texts, or where the next text is shorter than `spread` times the batch's first, so no text is padded
    to more than 1/spread of its length (on a CPU a padded token costs as much as a real one)."""
    spread = SPREAD if spread is None else spread
    batches: list[list[str]] = []
    for i in _longest_first(texts):
        text = texts[i]
        last = batches[-1] if batches else None
        if last is None or len(last) == batch_size or len(text) < spread * len(last[0]):
            batches.append([text])
        else:
            last.append(text)
    return batches


def in_input_order(vectors: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """The rows of by_length's batches back in the order of `texts`."""
    restored = np.empty_like(vectors)
    restored[_longest_first(texts)] = vectors
    return restored


def _autocast(bf16: bool):
    """bfloat16 matrix products on the CPU (oneDNN), float32 accumulation, norms and softmax."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def _features(output: Any) -> torch.Tensor:
    """get_*_features' answer: a tensor, or (newer transformers) an output whose pooler_output it is."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalized(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors.float(), dim=-1)


class _Encoder:
    """What every encoder shares: its text tower, texts batched by length, the precision it runs in."""

    text: TextTower
    name: str
    dimensions: int
    normalizes: bool  # vectors of unit length unless the caller says otherwise
    precision: str = "float32"

    def text_vectors(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """[batch, dimensions] of one tokenized batch (TextTower.encode's tensors), before normalizing."""
        raise NotImplementedError

    @torch.inference_mode()
    def embed_texts(
        self, texts: Sequence[str], normalize: bool | None = None, truncate: str = "end", batch_size: int = 64
    ) -> np.ndarray:
        """[len(texts), dimensions] float32, in input order; normalize None: the model's own default."""
        self.text.check(texts, truncate)
        parts = []
        for batch in by_length(texts, batch_size):
            inputs = self.text.encode(batch, truncate)
            with _autocast(self.precision == "bfloat16"):
                parts.append(self.text_vectors(dict(inputs)).float())
        vectors = _array(parts, self.normalizes if normalize is None else normalize, self.dimensions)
        return in_input_order(vectors, texts)


class ImageTextEncoder(_Encoder):
    """A CLIP or SigLIP model with its tokenizer and image processor."""

    normalizes = True

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, kind: str, name: str) -> None:
        self.model, self.image_processor, self.kind, self.name = model.eval(), image_processor, kind, name
        text = model.config.text_config
        self.text = TextTower(tokenizer, int(text.max_position_embeddings), pad_to_limit=kind == "siglip")
        self.dimensions = int(model.config.projection_dim if kind == "clip" else text.hidden_size)

    def text_vectors(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return _features(self.model.get_text_features(**inputs))

    def image_vectors(self, pixels: torch.Tensor) -> torch.Tensor:
        """[batch, dimensions] of the image processor's pixel_values, before normalizing."""
        return _features(self.model.get_image_features(pixel_values=pixels))

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Any], normalize: bool = True, batch_size: int = 32) -> np.ndarray:
        """[len(images), dimensions] float32, in input order; images are paths, PIL images or uint8
        arrays."""
        parts = []
        for start in range(0, len(images), batch_size):
            batch = [open_rgb(image) for image in images[start : start + batch_size]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            with _autocast(self.precision == "bfloat16"):
                parts.append(self.image_vectors(pixels).float())
        return _array(parts, normalize, self.dimensions)

    def label_embeddings(self, labels: Sequence[str], templates: Sequence[str] = ("{}",)) -> np.ndarray:
        """One normalized vector per label: its templates' embeddings averaged and renormalized (the CLIP
        paper's prompt ensembling); computed once per (labels, templates)."""
        return self._labels(tuple(labels), tuple(templates))

    @functools.lru_cache(maxsize=32)  # noqa: B019  # an encoder lives as long as its process
    def _labels(self, labels: tuple[str, ...], templates: tuple[str, ...]) -> np.ndarray:
        if not labels:
            raise DanluError("no labels to classify the images by", 'name them, e.g. --labels "cat,dog"')
        check_templates(templates)
        prompts = [template.format(label) for label in labels for template in templates]
        vectors = self.embed_texts(prompts).reshape(len(labels), len(templates), -1).mean(axis=1)
        return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)

    def zero_shot(
        self, images: Sequence[Any], labels: Sequence[str], templates: Sequence[str] = ("{}",)
    ) -> np.ndarray:
        """[len(images), len(labels)] probabilities: CLIP's softmax over the labels, SigLIP's sigmoid of
        each label on its own."""
        return self.label_probabilities(self.embed_images(images), labels, templates)

    @torch.inference_mode()
    def label_probabilities(
        self, image_vectors: np.ndarray, labels: Sequence[str], templates: Sequence[str] = ("{}",)
    ) -> np.ndarray:
        """zero_shot's answer for images already embedded (normalized, as embed_images returns them)."""
        text = torch.from_numpy(self.label_embeddings(labels, templates))
        logits = torch.from_numpy(image_vectors) @ text.T * self.model.logit_scale.exp().float()
        if self.kind == "siglip":
            return torch.sigmoid(logits + self.model.logit_bias.float()).numpy()
        return torch.softmax(logits, dim=-1).numpy()


def check_shape(width: int, height: int, name: str) -> None:
    """Raises DanluError for an image whose sides differ more than MAX_ASPECT times: the image processor
    scales the short side to the model's size, so a 1x100,000 strip would become gigapixels."""
    if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        raise DanluError(
            f"{name} is {width}x{height}: its sides differ more than {MAX_ASPECT} times", "crop it first"
        )


def open_rgb(image: Any, name: str | None = None) -> Any:
    """An RGB PIL image of a path, PIL image or uint8 array, read by danlu's image reader (the formats it
    allows, its pixel limit) and of a shape the image processor can scale."""
    from danlu.families.image.decode import open_image, pil_from_array

    if isinstance(image, str | Path):
        image = open_image(image, name or f"'{image}'")
    elif isinstance(image, np.ndarray):
        image = pil_from_array(image)
    check_shape(image.width, image.height, name or "an image")
    return image.convert("RGB")


def _array(parts: list[torch.Tensor], normalize: bool, dimensions: int) -> np.ndarray:
    if not parts:
        return np.zeros((0, dimensions), dtype=np.float32)
    vectors = torch.cat(parts)
    return (_normalized(vectors) if normalize else vectors).numpy().astype(np.float32)


class TextEncoder(_Encoder):
    """An encoder-only text model (BERT, MiniLM, ...) whose token states are pooled into one vector per
    text, as its sentence-transformers files say (1_Pooling: mean, CLS or max; 2_Normalize), else mean
    pooling, normalized."""

    def __init__(
        self, model: Any, tokenizer: Any, pooling: str, normalizes: bool, limit: int, name: str
    ) -> None:
        self.model, self.pooling, self.normalizes, self.name = model.eval(), pooling, normalizes, name
        self.text = TextTower(tokenizer, limit, pad_to_limit=False)
        self.dimensions = int(model.config.hidden_size)

    def text_vectors(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        states = self.model(**inputs).last_hidden_state
        return pool(states.float(), inputs["attention_mask"], self.pooling)


def pool(states: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """[batch, tokens, width] states to [batch, width]: the mean or max over the real tokens, or the first."""
    if how == "cls":
        return states[:, 0].float()
    keep = mask.unsqueeze(-1).to(states.dtype)
    if how == "max":
        return states.masked_fill(keep == 0, float("-inf")).max(dim=1).values.float()
    return ((states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)).float()


def sentence_transformers_files(path: Path) -> tuple[str, bool, int | None]:
    """(pooling, normalizes, max_seq_length) from a sentence-transformers directory's files; a plain
    encoder directory: mean pooling, normalized, no limit of its own."""
    modules = json_file(path / "modules.json")
    if not isinstance(modules, list):
        return "mean", True, None
    kinds = {
        str(m.get("type", "")).rsplit(".", 1)[-1]: m.get("path", "") for m in modules if isinstance(m, dict)
    }
    pooling = json_file(path / str(kinds.get("Pooling", "1_Pooling")) / "config.json") or {}
    how = (
        "cls"
        if pooling.get("pooling_mode_cls_token")
        else "max"
        if pooling.get("pooling_mode_max_tokens")
        else "mean"
    )
    limit = (json_file(path / "sentence_bert_config.json") or {}).get("max_seq_length")
    return how, "Normalize" in kinds, int(limit) if limit else None


def load_text_encoder(path: Path) -> TextEncoder:
    """An encoder-only text directory. Raises DanluError when it cannot be read as one."""
    import transformers

    from danlu.hf import load_files, load_model, quiet_transformers

    how, normalizes, limit = sentence_transformers_files(path)
    with quiet_transformers():
        try:
            model = load_model(transformers.AutoModel, path, dtype=torch.float32)
            tokenizer = load_files(transformers.AutoTokenizer, path)
        except (OSError, ValueError) as exc:
            raise DanluError(f"cannot read '{path}': {one_line(exc)}", "check the model files") from None
    positions = int(getattr(model.config, "max_position_embeddings", 0) or 512)
    return TextEncoder(model, tokenizer, how, normalizes, min(limit or positions, positions), path.name)


def load_image_text(path: Path) -> ImageTextEncoder:
    """A CLIP or SigLIP directory. Raises DanluError when it is neither or cannot be read."""
    import transformers

    from danlu.hf import load_files, load_model, quiet_transformers

    kind = model_type(path)
    if kind not in IMAGE_TEXT:
        raise DanluError(f"'{path}' holds no CLIP or SigLIP model", "pass a CLIP or SigLIP directory")
    with quiet_transformers():
        try:
            model = load_model(getattr(transformers, IMAGE_TEXT[kind]), path, dtype=torch.float32)
            tokenizer = load_files(transformers.AutoTokenizer, path)
            images = load_files(transformers.AutoImageProcessor, path)
        except (OSError, ValueError) as exc:
            message = f"cannot read '{path}': {one_line(exc)}"
            raise DanluError(message, "check the model files") from None
    return ImageTextEncoder(model, tokenizer, images, kind, path.name)


def load_encoder(spec: str | Path, dtype: str = "float32") -> ImageTextEncoder | TextEncoder:
    """The encoder in a local directory: CLIP or SigLIP, or an encoder-only text model. dtype
    "bfloat16": matrix products in bfloat16 (autocast), taken only on a CPU that computes bfloat16
    natively and when the vectors of a check batch agree with float32's (set_precision).

    Raises:
        DanluError: a missing directory (a hub id among them: danlu never downloads), another model, or
            a precision the CPU or the model's vectors do not allow.
    """
    if dtype not in PRECISIONS:
        raise DanluError(f"an encoder runs in float32 or bfloat16, not {dtype}", "e.g. --dtype bfloat16")
    path = local_model_dir(spec)
    if model_type(path) in IMAGE_TEXT:
        return set_precision(load_image_text(path), dtype)
    if is_text_encoder(path):
        return set_precision(load_text_encoder(path), dtype)
    raise DanluError(
        f"'{path}' holds no encoder danlu embeds with",
        "pass a CLIP or SigLIP directory, or an encoder-only text model (BERT, MiniLM, ...)",
    )


def set_precision(encoder: ImageTextEncoder | TextEncoder, precision: str) -> ImageTextEncoder | TextEncoder:
    """The encoder computing in `precision`. bfloat16 is checked first: the CPU must compute it natively
    (AVX512-BF16 or AMX: elsewhere it is slower than float32), and every vector of a check batch (texts,
    and images for image-text models) must agree with float32's to cosine MIN_COSINE.

    Raises:
        DanluError: either check fails (the encoder stays in float32).
    """
    encoder.precision = "float32"
    if precision == "float32":
        return encoder
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise DanluError(
            "this CPU has no native bfloat16 (AVX512-BF16 or AMX): it would run slower than float32",
            "leave out --dtype (float32)",
        )
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    checks = [lambda: encoder.embed_texts(CHECK_TEXTS, normalize=True)]
    if isinstance(encoder, ImageTextEncoder):
        from PIL import Image

        checks.append(lambda: encoder.embed_images([Image.fromarray(p) for p in pictures]))
    exact = [check() for check in checks]
    encoder.precision = "bfloat16"
    cosine = min(float((check() * want).sum(axis=1).min()) for check, want in zip(checks, exact, strict=True))
    if cosine < MIN_COSINE:
        encoder.precision = "float32"
        raise DanluError(
            f"{encoder.name}'s bfloat16 vectors differ from float32's (cosine {cosine:.6f} < {MIN_COSINE})",
            "leave out --dtype (float32)",
        )
    return encoder
