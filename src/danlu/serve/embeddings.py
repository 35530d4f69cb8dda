"""The embeddings server's handler: a local CLIP or SigLIP directory, or an encoder-only text model,
answering OpenAI's POST /v1/embeddings (texts, and images for image-text models) and POST /v1/zero-shot
(images against labels named per request), GET /v1/models, and a page at / (labels with probability
bars for an uploaded image; the similarity matrix of typed texts).

Every request is checked whole before any work (items, characters, pixels, tokens, formats: a 400 in
OpenAI's error shape naming the input), its images decoded and its texts counted on the shell's parsing
threads. Texts and images from concurrent requests are micro-batched into shared forward passes (texts
sorted by length inside each pass), on one torch thread; label embeddings are computed once per (labels,
templates) and kept.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import json
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response

from danlu.embeddings.detect import DEFAULT_TEMPLATE
from danlu.embeddings.encoders import (
    ImageTextEncoder,
    TextEncoder,
    check_shape,
    load_encoder,
)
from danlu.errors import DanluError
from danlu.serve.batching import MicroBatcher, QueueFull, TorchThread
from danlu.serve.chat import protocol
from danlu.serve.settings import EmbedSettings
from danlu.serve.shell import ServeError, Shell, create_app, page_with

EMBEDDINGS, ZERO_SHOT, MODELS = "/v1/embeddings", "/v1/zero-shot", "/v1/models"
MAX_TEMPLATES = 32
NOT_FINITE = "the model's output is not a finite number for these inputs"
ENCODING_FORMATS = ("float", "base64")
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}
ZERO_SHOT_FIELDS = {"model", "images", "labels", "templates"}


@dataclass
class Inputs:
    """A request's texts and images, each with its place in the request."""

    texts: list[str] = field(default_factory=list)
    text_at: list[int] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    image_at: list[int] = field(default_factory=list)
    tokens: int = 0  # the text tokens embedded (after any truncation)

    @property
    def count(self) -> int:
        return len(self.texts) + len(self.images)


def decode_image(value: Any, where: str, max_pixels: int) -> np.ndarray:
    """A base64 string or data URL as uint8 RGB pixels [h, w, 3], read by danlu's image reader (the
    formats it allows); ServeError(400) for anything else, a URL to fetch among them (the server fetches
    nothing), or an image over max_pixels or too long and thin (both read from its header, before
    decoding)."""
    from danlu.families.image.decode import decode_opened, open_image

    if not isinstance(value, str) or not value:
        raise protocol.bad(f"{where} must be a base64 image or a data URL", where)
    if value.startswith(("http://", "https://")):
        raise protocol.bad(
            f"{where}: image URLs are not fetched; send the image as base64 or a data URL", where
        )
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64"):
            raise protocol.bad(f"{where}: a data URL must be base64 (data:image/png;base64,...)", where)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise protocol.bad(f"{where} is not valid base64", where) from None
    try:
        image = open_image(data, where, load=False)
        if image.width * image.height > max_pixels:
            raise protocol.bad(
                f"{where} has {image.width}x{image.height} pixels; at most {max_pixels} are taken", where
            )
        check_shape(image.width, image.height, where)
        return decode_opened(image, None, 3, where)
    except DanluError as exc:
        raise protocol.bad(exc.message, where) from None


def strict_json(content: dict[str, Any]) -> bytes:
    """content as strict JSON; a vector or probability that is not finite fails this request alone
    (ServeError 500), never with NaN in the body."""
    try:
        return json.dumps(content, allow_nan=False).encode()
    except ValueError:
        raise ServeError(500, NOT_FINITE, kind="server_error") from None


def _image_part(item: dict) -> Any:
    """The image of an input part: {"type": "image_url", "image_url": {"url": ...}} or {"image": ...}."""
    if "image" in item:
        return item["image"]
    url = item.get("image_url")
    return url.get("url") if isinstance(url, dict) else url


class EmbedHandler:
    """Embeddings and zero-shot labels of one local encoder."""

    ready_means = "The model is loaded and a warm-up embedding has run."
    endpoints = frozenset({"/", "/healthz", "/readyz", "/metrics", MODELS, EMBEDDINGS, ZERO_SHOT})
    json_paths: ClassVar[dict[str, tuple[str, ...]]] = {
        EMBEDDINGS: ("application/json",),
        ZERO_SHOT: ("application/json",),
    }
    drive = None

    def __init__(
        self, settings: EmbedSettings, encoder: ImageTextEncoder | TextEncoder | None = None
    ) -> None:
        """Loads the model (raises DanluError for a directory danlu cannot embed with, or a bad setting)."""
        from danlu.serve.app import Metrics

        settings.check()
        self.settings = settings
        self.torch_thread = TorchThread()  # loading, warm-up and every forward pass
        try:
            self.encoder = (
                encoder or self.torch_thread.submit(load_encoder, settings.model, settings.dtype).result()
            )
            self._warm_up()
        except BaseException:
            self.torch_thread.shutdown(wait=False)
            raise
        self.images = isinstance(self.encoder, ImageTextEncoder)
        self.metrics = Metrics()
        # token counts on the parsing threads, with a tokenizer of their own: a fast tokenizer changes
        # its truncation settings per call and must not be shared with the torch thread's
        self._counter, self._counting = copy.deepcopy(self.encoder.text.tokenizer), threading.Lock()
        truncate = "end" if settings.truncate == "error" else settings.truncate  # checked before
        batching = {
            "max_batch": settings.max_batch,
            "max_wait_ms": settings.max_wait_ms,
            "max_queue_rows": settings.max_queue_rows,
            "timeout_s": settings.timeout_s,
            "on_batch": self.metrics.batch_rows.observe,
            "executor": self.torch_thread,
        }
        self.text_batcher = MicroBatcher(
            lambda texts: self.encoder.embed_texts(texts, truncate=truncate, batch_size=32), **batching
        )
        self.image_batcher = MicroBatcher(lambda images: self.encoder.embed_images(images), **batching)
        self.name = self.encoder.name
        self.title = f"danlu embeddings: {self.name}"
        self.description = (
            f"OpenAI-compatible embeddings{' and zero-shot labels' if self.images else ''} of {self.name}."
        )

    def _warm_up(self) -> None:
        """One text (and one image) through the model before /readyz says ready, bounded by the timeout."""
        from concurrent.futures import TimeoutError as FutureTimeout

        from PIL import Image

        def run() -> None:
            self.encoder.embed_texts(["warm up"])
            if isinstance(self.encoder, ImageTextEncoder):
                self.encoder.embed_images([Image.new("RGB", (32, 32))])

        try:
            self.torch_thread.submit(run).result(self.settings.timeout_s)
        except FutureTimeout:
            raise DanluError(
                f"the warm-up embedding took longer than the request timeout ({self.settings.timeout_s:g} s)",
                "raise --timeout, e.g. --timeout 120",
            ) from None

    def error_body(self, error: ServeError) -> dict[str, Any]:
        return protocol.error_body(error)

    def wrap(self, app: Any) -> Any:
        return app

    async def start(self) -> None:
        await self.text_batcher.start()
        await self.image_batcher.start()

    async def stop(self) -> None:
        await self.text_batcher.stop()
        await self.image_batcher.stop()
        self.torch_thread.shutdown(wait=False)

    def page(self) -> str:
        config = {
            "title": self.title,
            "model": self.name,
            "images": self.images,
            "template": DEFAULT_TEMPLATE,
            "api_key_required": self.settings.api_key is not None,
        }
        return page_with("embed.html", "__DANLU_EMBED__", config)

    # --- reading requests (on the parsing threads) -------------------------------------------------

    def _text(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise protocol.bad(f"{where} must be a non-empty string", where)
        if len(value) > self.settings.max_text_chars:
            raise protocol.bad(
                f"{where} has {len(value)} characters; at most {self.settings.max_text_chars} are taken",
                where,
            )
        return value

    def _count(self, inputs: Inputs) -> None:
        """inputs.tokens, and a 400 naming the first text over the limit unless the server truncates."""
        if not inputs.texts:
            return
        limit = self.encoder.text.limit
        with self._counting:
            counts = [len(ids) for ids in self._counter(inputs.texts, truncation=False)["input_ids"]]
        if self.settings.truncate == "error":
            for at, count in zip(inputs.text_at, counts, strict=True):
                if count > limit:
                    raise protocol.bad(
                        f"input {at} has {count} tokens; {self.name} reads at most {limit} (shorten it; "
                        "the server truncates only when started with --truncate end or start)",
                        "input",
                    )
        inputs.tokens = sum(min(count, limit) for count in counts)

    def _checked_list(self, value: Any, name: str) -> list:
        items = [value] if isinstance(value, str | dict) else value
        if not isinstance(items, list) or not items:
            raise protocol.bad(f"'{name}' must be a string or a non-empty list", name)
        if len(items) > self.settings.max_rows:
            raise protocol.bad(
                f"'{name}' holds {len(items)} items; at most {self.settings.max_rows} are taken per request",
                name,
            )
        return items

    def read_embeddings(self, raw: bytes) -> tuple[Inputs, str, int | None]:
        """The inputs of an embeddings request, its encoding format and dimensions, all checked."""
        body = protocol.read_json(raw)
        protocol.log_unknown(body, EMBEDDING_FIELDS, EMBEDDINGS)
        inputs = Inputs()
        for i, item in enumerate(self._checked_list(body.get("input"), "input")):
            where = f"input[{i}]"
            if isinstance(item, dict) and item.get("type", "image_url") in ("image_url", "image"):
                if not self.images:
                    raise protocol.bad(f"{self.name} embeds texts, not images ({where})", "input")
                image = decode_image(_image_part(item), where, self.settings.max_image_pixels)
                inputs.images.append(image)
                inputs.image_at.append(i)
            elif isinstance(item, dict) and item.get("type") == "text":
                inputs.texts.append(self._text(item.get("text"), where))
                inputs.text_at.append(i)
            elif isinstance(item, int | list):
                raise protocol.bad(f"{where}: token ids are not taken; send the text", "input")
            else:
                inputs.texts.append(self._text(item, where))
                inputs.text_at.append(i)
        self._count(inputs)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ENCODING_FORMATS:
            raise protocol.bad(
                f"'encoding_format' must be float or base64, not {encoding!r}", "encoding_format"
            )
        return inputs, encoding, self._dimensions(body.get("dimensions"))

    def _dimensions(self, value: Any) -> int | None:
        full = self.encoder.dimensions
        if value is None or value == full:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= full:
            raise protocol.bad(f"'dimensions' must be an integer from 1 to {full}", "dimensions")
        if not self.settings.matryoshka:
            raise protocol.bad(
                f"{self.name} gives {full}-dimensional vectors; it was not served for shorter ones (a model "
                "trained for them, Matryoshka-style, is served with --matryoshka)",
                "dimensions",
            )
        return value

    def read_zero_shot(self, raw: bytes) -> tuple[list[Any], list[str], list[str]]:
        """The images, labels and templates of a zero-shot request, all checked."""
        body = protocol.read_json(raw)
        protocol.log_unknown(body, ZERO_SHOT_FIELDS, ZERO_SHOT)
        if not self.images:
            raise protocol.bad(f"{self.name} has no image tower: zero-shot labels need CLIP or SigLIP")
        labels = [
            self._text(v, f"labels[{i}]")
            for i, v in enumerate(self._checked_list(body.get("labels"), "labels"))
        ]
        if len(set(labels)) != len(labels):
            raise protocol.bad("'labels' names a label twice; name each once", "labels")
        templates = body.get("templates") or [DEFAULT_TEMPLATE]
        if not isinstance(templates, list) or len(templates) > MAX_TEMPLATES:
            raise protocol.bad(f"'templates' must be a list of at most {MAX_TEMPLATES} strings", "templates")
        for i, template in enumerate(templates):
            if "{}" not in self._text(template, f"templates[{i}]"):
                raise protocol.bad(f"templates[{i}] has no {{}} for the label", "templates")
        limit = self.settings.max_image_pixels
        images = [
            decode_image(v, f"images[{i}]", limit)
            for i, v in enumerate(self._checked_list(body.get("images"), "images"))
        ]
        return images, labels, templates

    # --- answering --------------------------------------------------------------------------------

    def full(self) -> bool:
        queued = self.text_batcher.queued_rows + self.image_batcher.queued_rows
        return queued >= self.settings.max_queue_rows

    async def _embed(self, inputs: Inputs) -> np.ndarray:
        """[inputs.count, dimensions], in request order: texts and images batched with other requests'."""
        waits = [self.text_batcher.submit(inputs.texts)] if inputs.texts else []
        waits += [self.image_batcher.submit(inputs.images)] if inputs.images else []
        try:
            parts = await asyncio.gather(*waits)
        except QueueFull:
            raise self.shell.busy() from None
        except asyncio.TimeoutError:
            raise ServeError(
                504, f"embedding took over {self.settings.timeout_s:g} s", kind="server_error"
            ) from None
        vectors = np.empty((inputs.count, self.encoder.dimensions), dtype=np.float32)
        done = 0
        for at in (inputs.text_at, inputs.image_at):
            if at:
                vectors[at] = parts[done]
                done += 1
        return vectors

    def embeddings_body(
        self, vectors: np.ndarray, encoding: str, dimensions: int | None, tokens: int
    ) -> bytes:
        """OpenAI's response object as JSON bytes (built on a parsing thread: a large one takes time)."""
        if dimensions is not None:  # Matryoshka: the leading dimensions, renormalized
            vectors = vectors[:, :dimensions]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        vectors = vectors.astype("<f4")
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(row.tobytes()).decode()
                if encoding == "base64"
                else row.tolist(),
            }
            for i, row in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return strict_json({"object": "list", "data": data, "model": self.name, "usage": usage})

    async def embeddings(self, request: Request) -> Response:
        self.shell.authorize(request)
        if self.full():
            raise self.shell.busy()
        inputs, encoding, dimensions = await self.shell.off_loop(self.read_embeddings, await request.body())
        vectors = await self._embed(inputs)
        body = await self.shell.off_loop(self.embeddings_body, vectors, encoding, dimensions, inputs.tokens)
        return Response(body, media_type="application/json")

    async def zero_shot(self, request: Request) -> Response:
        self.shell.authorize(request)
        if self.full():
            raise self.shell.busy()
        images, labels, templates = await self.shell.off_loop(self.read_zero_shot, await request.body())
        vectors = await self._embed(Inputs(images=images, image_at=list(range(len(images)))))
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(
            self.torch_thread, self.encoder.label_probabilities, vectors, labels, templates
        )
        try:
            probabilities = await asyncio.wait_for(work, self.settings.timeout_s)
        except asyncio.TimeoutError:
            raise ServeError(
                504, f"labelling took over {self.settings.timeout_s:g} s", kind="server_error"
            ) from None
        body = await self.shell.off_loop(self.zero_shot_body, probabilities, labels, templates)
        return Response(body, media_type="application/json")

    def zero_shot_body(self, probabilities: np.ndarray, labels: list[str], templates: list[str]) -> bytes:
        """/v1/zero-shot's answer as JSON bytes (on a parsing thread: images x labels can be many)."""
        data = [
            {
                "index": i,
                "label": labels[int(row.argmax())],
                "probabilities": dict(zip(labels, row.astype(float).tolist(), strict=True)),
            }
            for i, row in enumerate(probabilities)
        ]
        content = {"object": "list", "model": self.name, "labels": labels, "templates": templates}
        return strict_json({**content, "data": data})

    def models(self) -> dict[str, Any]:
        encoder = self.encoder
        model = {
            "id": self.name,
            "object": "model",
            "created": 0,
            "owned_by": "danlu",
            "kind": getattr(encoder, "kind", "text"),
            "images": self.images,
            "dimensions": encoder.dimensions,
            "max_input_tokens": encoder.text.limit,
            "truncate": self.settings.truncate,
            "matryoshka": self.settings.matryoshka,
            "dtype": self.encoder.precision,
            "limits": {
                "max_rows": self.settings.max_rows,
                "max_text_chars": self.settings.max_text_chars,
                "max_image_pixels": self.settings.max_image_pixels,
                "max_body_bytes": self.settings.max_body_bytes,
            },
        }
        return {"object": "list", "data": [model]}

    def add_routes(self, app: FastAPI, shell: Shell) -> None:
        self.shell = shell

        @app.post(EMBEDDINGS)
        async def embeddings(request: Request) -> Response:
            """OpenAI embeddings: texts, and images as {"type": "image_url", "image_url": {"url": ...}}."""
            return await self.embeddings(request)

        @app.post(ZERO_SHOT)
        async def zero_shot(request: Request) -> Response:
            """Images (base64 or data URLs) against labels (and templates): each label's probability."""
            return await self.zero_shot(request)

        @app.get(MODELS)
        async def models(request: Request) -> dict[str, Any]:
            shell.authorize(request)
            return self.models()


def create_embed_app(
    settings: EmbedSettings, encoder: ImageTextEncoder | TextEncoder | None = None
) -> FastAPI:
    """The embeddings server's app (raises DanluError for a model or setting it cannot serve)."""
    return create_app(EmbedHandler(settings, encoder))
