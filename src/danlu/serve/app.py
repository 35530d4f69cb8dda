"""The HTTP server: `create_app(ServeSettings)` builds a FastAPI app around a Predictor and a MicroBatcher.

Endpoints: POST /v1/predict, GET /v1/metadata, /healthz, /readyz, /metrics (Prometheus), / (a web page),
/docs (OpenAPI with the run's real feature names). Everything is validated when the app is built
(run directory, engine, limits), not per request.
"""

import asyncio
import gc
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import Executor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import Histogram
from pydantic import BaseModel, Field, ValidationError

from danlu import __version__
from danlu.errors import DanluError
from danlu.predictor import Predictor, nonfinite_rows
from danlu.run import RunDir
from danlu.serve.batching import MicroBatcher, QueueFull, TorchThread
from danlu.serve.fastpath import JsonPredict
from danlu.serve.guard import Guard, RequestMetrics, add_probes, check_limits, key_matches

# How `--workers N` hands the settings to each worker process: the path of a file only this user can read,
# so the API key is never in an environment that child processes inherit.
SETTINGS_FILE_ENV = "DANLU_SERVE_SETTINGS_FILE"


@dataclass
class ServeSettings:
    run_dir: str
    engine: str = "torch"
    max_batch: int = 64  # rows per forward pass
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for company
    max_rows: int = 1024  # rows per request
    max_body_bytes: int = 10 * 1024 * 1024
    max_queue_rows: int = 8192  # rows waiting before requests get 503
    timeout_s: float = 30.0  # a request waiting longer gets 504
    api_key: str | None = None

    def check(self) -> None:
        check_limits(self, ("max_batch", "max_rows", "max_body_bytes", "max_queue_rows"))
        if self.max_wait_ms < 0:
            raise DanluError("--max-wait-ms must be 0 or more", "e.g. --max-wait-ms 2")


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


# A batch whose forward pass takes less than this runs on the event loop (see MicroBatcher.inline_rows)
INLINE_BUDGET_S = 0.001


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


def _page(predictor: Predictor, settings: ServeSettings, title: str) -> str:
    schema = {
        "title": title,
        "task": predictor.task,
        **predictor.family.page_form(predictor.state),
        "classes": predictor.classes,
        "api_key_required": settings.api_key is not None,
    }
    # "</" cannot close the script element from inside a JSON string
    inline = json.dumps(schema).replace("</", "<\\/")
    page = resources.files("danlu.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    return page.replace("__DANLU_SCHEMA__", inline)


def request_body(model: type[BaseModel], uploads: bool) -> dict[str, Any]:
    """The OpenAPI request body of /v1/predict: the family's JSON model (and file uploads)."""
    content: dict[str, Any] = {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
    }
    if uploads:
        files = {"type": "array", "items": {"type": "string", "format": "binary"}}
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": {"images": files}}}
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
    predictor = torch_thread.submit(Predictor.load, settings.run_dir, engine=settings.engine).result()
    warm_up_s = warm_up(predictor, settings.timeout_s, torch_thread)
    inline = torch_thread.submit(inline_rows, predictor, settings.max_batch, warm_up_s).result()
    return predictor, inline


def create_app(settings: ServeSettings) -> FastAPI:
    """The app for one run directory. Raises DanluError for a bad run directory, engine or limit."""
    settings.check()
    torch_thread = TorchThread()  # loading, warm-up and every forward pass that is not inline
    try:
        predictor, inline = _load(settings, torch_thread)
    except BaseException:
        torch_thread.shutdown(wait=False)
        raise
    run = RunDir(settings.run_dir)
    report = run.read_report()
    family, state = predictor.family, predictor.state
    PredictRequest = family.request_model(state, settings.max_rows)
    metrics = Metrics()
    batcher = MicroBatcher(
        predictor.decoded_items,
        settings.max_batch,
        settings.max_wait_ms,
        settings.max_queue_rows,
        settings.timeout_s,
        on_batch=metrics.batch_rows.observe,
        inline_rows=inline,
        executor=torch_thread,
    )
    status = {"ready": False}
    title = f"danlu: {run.path.resolve().name}"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        # What start-up made (modules, the model, the app) lives as long as the server: out of the
        # collector's sight, a full collection no longer pauses every request for tens of milliseconds.
        gc.freeze()
        status["ready"] = True
        yield
        status["ready"] = False
        await batcher.stop()

    app = FastAPI(
        title=title,
        version=__version__,
        description=f"Predictions of a danlu {state.task} model with {family.description(state)}.",
        lifespan=lifespan,
    )
    known = {"/", "/healthz", "/readyz", "/metrics", "/v1/predict", "/v1/metadata", "/docs", "/openapi.json"}

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # where and what only: echoing the input back could be large, or NaN that JSON cannot carry
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    def require_key(request: Request) -> None:
        if not key_matches(settings.api_key, request.headers):
            raise HTTPException(
                401,
                "missing or wrong API key: send 'X-API-Key: KEY' or 'Authorization: Bearer KEY'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    form_items = family.form_items  # families that take file uploads (images)

    def parse(body: bytes) -> tuple[list, list[dict[str, Any]]]:
        """A JSON body's items and its validation errors, validated by the family's request model in one
        pass (pydantic-core parses and checks together)."""
        try:
            request = PredictRequest.model_validate_json(body)
        except ValidationError as exc:
            # where and what only: echoing the input back could be large, or NaN that JSON cannot carry
            return [], [
                {"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()
            ]
        return family.request_items(state, request)

    async def answer(items: list, errors: list) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Status, JSON content and extra headers for a request's items."""
        if errors:
            return 422, {"detail": errors}, {}
        try:
            output = await batcher.submit(items)
        except QueueFull:
            return 503, {"detail": "the server is at capacity; retry shortly"}, {"Retry-After": "1"}
        except asyncio.TimeoutError:
            return 504, {"detail": f"inference took over {settings.timeout_s:g} s"}, {}
        except DanluError as exc:
            return 422, {"detail": str(exc)}, {}
        bad = nonfinite_rows(output)
        if bad:  # values so large that float32 or the model overflow: this request's fault, not the batch's
            detail = f"the model's output is not a finite number for rows {bad[:10]}: inputs far out of range"
            return 422, {"detail": detail}, {}
        return 200, _encode(state, output), {}

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        dependencies=[Depends(require_key)],
        openapi_extra={"requestBody": request_body(PredictRequest, form_items is not None)},
    )
    async def predict(request: Request) -> Any:
        """Predictions, in request order."""
        # JSON bodies are answered by JsonPredict before they get here; this route documents the API and
        # takes multipart uploads
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            if form_items is None:
                items = []
                errors = [{"loc": ["body"], "msg": "this run takes a JSON body", "type": "value_error"}]
            else:
                async with request.form(max_files=settings.max_rows, max_fields=settings.max_rows) as form:
                    items, errors = await form_items(state, form)
        else:
            items, errors = parse(await request.body())
        code, content, headers = await answer(items, errors)
        return JSONResponse(content, status_code=code, headers=headers)  # plain JSON types: no re-validation

    app.add_middleware(JsonPredict, path="/v1/predict", api_key=settings.api_key, parse=parse, answer=answer)
    app.add_middleware(Guard, max_body_bytes=settings.max_body_bytes, metrics=metrics, endpoints=known)
    app.openapi = _openapi_with(app, PredictRequest)

    @app.get("/v1/metadata", dependencies=[Depends(require_key)])
    async def metadata() -> dict[str, Any]:
        """Task, features, classes, test metrics, versions and limits."""
        return {
            "family": family.name,
            "task": state.task,
            "target": state.target,
            **family.metadata(state),
            "classes": state.classes,
            "test_metrics": report.get("test"),
            "test_split": report.get("test_split"),
            "model": {
                "run": run.path.resolve().name,
                "type": predictor.config.model.target or predictor.config.model.type,
            },
            "engine": predictor.engine,
            "danlu_version": __version__,
            "trained_with_danlu": report.get("danlu_version"),
            "limits": {"max_rows": settings.max_rows, "max_body_bytes": settings.max_body_bytes},
        }

    add_probes(app, status, metrics, "The model is loaded and a warm-up prediction has run.")

    page = _page(predictor, settings, title)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


def app_from_env() -> FastAPI:
    """The factory each `--workers N` process calls: the settings file's path travels in the environment."""
    path = Path(os.environ[SETTINGS_FILE_ENV])
    return create_app(ServeSettings(**json.loads(path.read_text())))


def serve(
    settings: ServeSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    access_log: bool = False,
) -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests finish before the process exits."""
    import uvicorn

    app = create_app(settings)  # fail here, before binding, on a bad run directory, setting or warm-up
    options = {
        "host": host,
        "port": port,
        "access_log": access_log,
        "timeout_graceful_shutdown": settings.timeout_s,
        "log_level": "info",
    }
    if workers == 1:
        uvicorn.run(app, **options)
        return
    private = Path(tempfile.mkdtemp(prefix="danlu-serve-"))  # mode 0700: this user only
    try:
        settings_file = private / "settings.json"
        fd = os.open(settings_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(settings), f)
        os.environ[SETTINGS_FILE_ENV] = str(settings_file)
        uvicorn.run("danlu.serve.app:app_from_env", factory=True, workers=workers, **options)
    finally:
        os.environ.pop(SETTINGS_FILE_ENV, None)
        shutil.rmtree(private, ignore_errors=True)
