"""The predictions server's handler: a run's Predictor behind a MicroBatcher, answering POST /v1/predict
and GET /v1/metadata, with the web form at / and OpenAPI docs at /docs built from the run's real inputs.
The shell (danlu.serve.shell) adds the key, the limits, the probes, the metrics and the drain; everything
is checked when the app is built (run directory, engine, limits), not per request.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Histogram
from pydantic import BaseModel, Field, ValidationError

from danlu.errors import DanluError
from danlu.predictor import Predictor, nonfinite_rows
from danlu.run import RunDir
from danlu.serve.batching import MicroBatcher, QueueFull, TorchThread
from danlu.serve.fastpath import JsonPredict
from danlu.serve.guard import RequestMetrics
from danlu.serve.settings import ServeSettings
from danlu.serve.shell import BUSY, ServeError, Shell, page_with, settings_from_env
from danlu.serve.shell import create_app as create_shell_app

PREDICT = "/v1/predict"
# A batch whose forward pass takes less than this runs on the event loop (see MicroBatcher.inline_rows)
INLINE_BUDGET_S = 0.001
# JSON bodies up to this size are parsed on the event loop, unless the family's decoding is heavy: the hop
# to a parsing thread costs more than parsing them
INLINE_PARSE_BYTES = 64 * 1024
FULL = 503, {"detail": BUSY}, {"Retry-After": "1"}  # the answer while the queue is full


class PredictResponse(BaseModel):
    predictions: list[Any] = Field(description="class labels or values, in request order")
    probabilities: list[list[float]] | None = Field(None, description="per row, in the order of 'classes'")
    classes: list[Any] | None = None


class Metrics(RequestMetrics):
    """The request series and the rows per forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_rows = Histogram(
            "danlu_batch_rows",
            "rows per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
            registry=self.registry,
        )


def inline_rows(predictor: Predictor, max_batch: int, warm_up_s: float) -> int:
    """max_batch when a full batch of warm-up rows predicts in under INLINE_BUDGET_S (best of three),
    else 0. A model slower than that on one row is not timed on a full batch, nor at all when the
    warm-up (the first prediction, with its one-off costs) took over 100 times the budget."""
    if warm_up_s > 100 * INLINE_BUDGET_S:
        return 0
    items = predictor.family.warmup_items(predictor.state)
    for rows in (items, items * max_batch):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            predictor.decoded_items(rows)
            best = min(best, time.perf_counter() - start)
        if best > INLINE_BUDGET_S:
            return 0
    return max_batch


def warm_up(predictor: Predictor, timeout_s: float, torch_thread: Executor) -> float:
    """One real prediction on the server's torch thread before serving, bounded by the request timeout;
    returns its seconds.

    Raises:
        DanluError: it took longer than timeout_s (a model too slow for the timeout it is served with).
    """
    start = time.perf_counter()
    items = predictor.family.warmup_items(predictor.state)
    try:
        torch_thread.submit(predictor.decoded_items, items).result(timeout_s)
    except FutureTimeout:
        raise DanluError(
            f"the warm-up prediction took longer than the request timeout ({timeout_s:g} s)",
            "raise --timeout to cover one forward pass of this model, e.g. --timeout 120",
        ) from None
    return time.perf_counter() - start


def _encode(state: Any, output: np.ndarray) -> dict[str, Any]:
    if state.task == "classification":
        labels = state.labels(output.argmax(axis=1))
        return {"predictions": labels.tolist(), "probabilities": output.tolist(), "classes": state.classes}
    return {"predictions": np.asarray(output, dtype=np.float64).tolist()}


def request_body(model: type[BaseModel], uploads: bool) -> dict[str, Any]:
    """The OpenAPI request body of /v1/predict: the family's JSON model (and file uploads)."""
    content: dict[str, Any] = {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
    }
    if uploads:
        files = {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "the files, in order; every file part counts, whatever its field name",
        }
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": {"files": files}}}
    return {"required": True, "content": content}


def _openapi_with(app: FastAPI, model: type[BaseModel]):
    """app.openapi, with the request model and the models it refers to among the components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def _load(settings: ServeSettings, torch_thread: Executor) -> tuple[Predictor, int]:
    """The predictor, loaded and warmed up on the torch thread (/readyz turns 200 only after a real
    prediction), and the rows a batch may have to run on the event loop."""
    predictor = torch_thread.submit(
        Predictor.load, settings.run_dir, engine=settings.engine, trust_model_code=settings.trust_model_code
    ).result()
    warm_up_s = warm_up(predictor, settings.timeout_s, torch_thread)
    inline = torch_thread.submit(inline_rows, predictor, settings.max_batch, warm_up_s).result()
    return predictor, inline


def _details(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # where and what only: echoing the input back could be large, or NaN that JSON cannot carry
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]


class PredictHandler:
    """Predictions of one finished run, for its family's inputs."""

    ready_means = "The model is loaded and a warm-up prediction has run."
    endpoints = frozenset({"/", "/healthz", "/readyz", "/metrics", PREDICT, "/v1/metadata", "/docs"})
    endpoints |= {"/openapi.json"}
    drive = None

    def __init__(self, settings: ServeSettings) -> None:
        """Loads the run (raises DanluError for a bad run directory, engine or limit)."""
        settings.check()
        self.settings = settings
        self.torch_thread = TorchThread()  # loading, warm-up and every forward pass that is not inline
        try:
            self.predictor, inline = _load(settings, self.torch_thread)
        except BaseException:
            self.torch_thread.shutdown(wait=False)
            raise
        self.run = RunDir(settings.run_dir)
        self.report = self.run.read_report()
        self.family, self.state = self.predictor.family, self.predictor.state
        self.request_model = self.family.request_model(self.state, settings.max_rows)
        self.metrics = Metrics()
        self.batcher = MicroBatcher(
            self.predictor.decoded_items,
            settings.max_batch,
            settings.max_wait_ms,
            settings.max_queue_rows,
            settings.timeout_s,
            on_batch=self.metrics.batch_rows.observe,
            inline_rows=inline,
            executor=self.torch_thread,
        )
        uploads = ("multipart/form-data",) if self.family.form_items is not None else ()
        self.json_paths = {PREDICT: ("application/json", *uploads)}
        self.title = f"danlu: {self.run.path.resolve().name}"
        self.description = (
            f"Predictions of a danlu {self.state.task} model with {self.family.description(self.state)}."
        )

    def error_body(self, error: ServeError) -> dict[str, Any]:
        return {"detail": error.message}

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    def page(self) -> str:
        config = {
            "title": self.title,
            "task": self.state.task,
            **self.family.page_form(self.state),
            "classes": self.state.classes,
            "api_key_required": self.settings.api_key is not None,
        }
        return page_with("index.html", "__DANLU_SCHEMA__", config)

    def parse(self, body: bytes) -> tuple[list, list[dict[str, Any]]]:
        """A JSON body's items and its validation errors, validated by the family's request model in one
        pass (pydantic-core parses and checks together)."""
        try:
            request = self.request_model.model_validate_json(body)
        except ValidationError as exc:
            return [], _details([{**e, "loc": ["body", *e["loc"]]} for e in exc.errors()])
        return self.family.request_items(self.state, request)

    def full(self) -> bool:
        """No room for one more row in the queue: answered before any work on the request."""
        return self.batcher.queued_rows >= self.settings.max_queue_rows

    async def handle(self, body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        """A JSON body's answer: capacity first, then parsing (off the event loop when heavy), the model."""
        if self.full():
            return FULL
        if self.family.heavy_requests or len(body) > INLINE_PARSE_BYTES:
            return await self.answer(*await self.shell.off_loop(self.parse, body))
        return await self.answer(*self.parse(body))

    async def handle_form(self, request: Request) -> tuple[int, dict[str, Any], dict[str, str]]:
        """A multipart upload's answer (only families with form_items get one past the Guard): its files,
        in order, decoded on the parsing threads."""
        if self.full():
            return FULL
        limit = self.settings.max_rows
        async with request.form(max_files=limit, max_fields=limit) as form:
            files = [await v.read() for _, v in form.multi_items() if not isinstance(v, str)]
        return await self.answer(*await self.shell.off_loop(self.family.form_items, self.state, files))

    async def answer(self, items: list, errors: list) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Status, JSON content and extra headers for a request's items."""
        if errors:
            return 413 if any(e.get("type") == "too_large" for e in errors) else 422, {"detail": errors}, {}
        try:
            output = await self.batcher.submit(items)
        except QueueFull:
            return FULL
        except asyncio.TimeoutError:
            return 504, {"detail": f"inference took over {self.settings.timeout_s:g} s"}, {}
        except DanluError as exc:
            return 422, {"detail": str(exc)}, {}
        bad = nonfinite_rows(output)
        if bad:  # values so large that float32 or the model overflow: this request's fault, not the batch's
            detail = f"the model's output is not a finite number for rows {bad[:10]}: inputs far out of range"
            return 422, {"detail": detail}, {}
        return 200, _encode(self.state, output), {}

    def wrap(self, app: Any) -> Any:
        """JSON bodies of /v1/predict are answered in plain ASGI before FastAPI's layers (fastpath.py)."""
        return JsonPredict(app, PREDICT, self.settings.api_key, self.handle)

    def metadata(self) -> dict[str, Any]:
        from danlu import __version__

        report, settings = self.report, self.settings
        return {
            "family": self.family.name,
            "task": self.state.task,
            "target": self.state.target,
            **self.family.metadata(self.state),
            "classes": self.state.classes,
            "test_metrics": report.get("test"),
            "test_split": report.get("test_split"),
            "model": {
                "run": self.run.path.resolve().name,
                "type": self.predictor.config.model.target or self.predictor.config.model.type,
            },
            "engine": self.predictor.engine,
            "danlu_version": __version__,
            "trained_with_danlu": report.get("danlu_version"),
            "limits": {"max_rows": settings.max_rows, "max_body_bytes": settings.max_body_bytes},
        }

    def add_routes(self, app: FastAPI, shell: Shell) -> None:
        self.shell = shell
        uploads = self.family.form_items is not None  # families that take file uploads (images)

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            return JSONResponse({"detail": _details(exc.errors())}, status_code=422)

        @app.post(
            PREDICT,
            response_model=PredictResponse,
            dependencies=[Depends(shell.authorize)],
            openapi_extra={"requestBody": request_body(self.request_model, uploads)},
        )
        async def predict(request: Request) -> Any:
            """Predictions, in request order."""
            # JSON bodies are answered by JsonPredict before they get here; this route documents the API
            # and takes multipart uploads
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                code, content, headers = await self.handle_form(request)
            else:
                code, content, headers = await self.handle(await request.body())
            return JSONResponse(content, status_code=code, headers=headers)  # plain JSON: no re-validation

        @app.get("/v1/metadata", dependencies=[Depends(shell.authorize)])
        async def metadata() -> dict[str, Any]:
            """Task, inputs, classes, test metrics, versions and limits."""
            return self.metadata()

        app.openapi = _openapi_with(app, self.request_model)


def create_app(settings: ServeSettings) -> FastAPI:
    """The predictions server's app for one run directory (raises DanluError for a bad run directory,
    engine or limit)."""
    return create_shell_app(PredictHandler(settings))


def app_from_env() -> FastAPI:
    """The factory each `--workers N` process calls."""
    return create_app(ServeSettings(**settings_from_env()))
