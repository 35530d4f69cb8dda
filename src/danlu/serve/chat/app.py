"""The chat server: OpenAI-compatible /v1/chat/completions, /v1/completions and /v1/models over the
continuous-batching engine, with health, readiness, Prometheus metrics, the API key and a web chat page.

Streaming is Server-Sent Events as OpenAI clients expect: `data: {chunk}\\n\\n` per event, a usage chunk
(`choices: []`) when `stream_options.include_usage` asks, and `data: [DONE]` always, also after an error,
which goes in-band since the 200 has been sent. A client that goes away cancels its sequence, streaming
or not, and frees its slot."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import Counter, Gauge, Histogram

from danlu import __version__
from danlu.errors import DanluError
from danlu.serve.chat.engine import Engine, Event, Sequence
from danlu.serve.chat.model import ChatModel
from danlu.serve.chat.sampling import SamplingParams
from danlu.serve.chat.templates import Template
from danlu.serve.guard import Guard, RequestMetrics, add_probes, check_limits, key_matches

log = logging.getLogger("danlu")
# what danlu reads from a request; anything else OpenAI defines is accepted, logged and ignored
CHAT_FIELDS = {
    "model", "messages", "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "stop",
    "stream", "stream_options", "seed", "n", "frequency_penalty", "presence_penalty", "repetition_penalty",
}  # fmt: skip
STOPPED = "the server stopped before the generation finished; retry"
COMPLETION_FIELDS = (CHAT_FIELDS - {"messages", "max_completion_tokens"}) | {"prompt"}


@dataclass
class ChatSettings:
    max_batch: int = 8  # running sequences
    max_queue: int = 64  # waiting sequences before 503
    max_tokens: int = 512  # the most tokens a request may ask for (and the default)
    prefill_chunk: int = 512  # prompt tokens per engine step
    timeout_s: float = 300.0  # a request running longer is ended (504, or an in-band error)
    max_body_bytes: int = 4 * 1024 * 1024
    api_key: str | None = None
    template: str | None = None

    def check(self) -> None:
        check_limits(self, ("max_batch", "max_queue", "max_tokens", "prefill_chunk", "max_body_bytes"))


class BadRequest(Exception):
    def __init__(
        self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=headers)


class ChatMetrics(RequestMetrics):
    """The request series, the engine's queue, tokens and the per-request token timings."""

    def __init__(self) -> None:
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        super().__init__(latency_buckets=buckets)
        r = self.registry
        self.running = Gauge("danlu_chat_running_sequences", "sequences decoding", registry=r)
        self.waiting = Gauge("danlu_chat_waiting_sequences", "sequences queued (queue depth)", registry=r)
        self.prompt_tokens = Counter("danlu_chat_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated_tokens = Counter("danlu_chat_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram(
            "danlu_chat_time_to_first_token_seconds", "time to first token", buckets=buckets, registry=r
        )
        self.itl = Histogram(
            "danlu_chat_inter_token_seconds", "mean time between generated tokens, per request",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1), registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "danlu_chat_request_seconds", "request latency, submit to last token", buckets=buckets, registry=r
        )

    def finished(self, sequence: Sequence) -> None:
        self.prompt_tokens.inc(len(sequence.prompt))
        self.generated_tokens.inc(len(sequence.output))
        if sequence.first_token_at is not None:
            self.ttft.observe(sequence.first_token_at - sequence.submitted)
            if len(sequence.output) > 1 and sequence.finished_at is not None:
                self.itl.observe(
                    (sequence.finished_at - sequence.first_token_at) / (len(sequence.output) - 1)
                )
        if sequence.finished_at is not None:
            self.e2e.observe(sequence.finished_at - sequence.submitted)


def _number(body: dict, key: str, kind: type, low: float | None = None, high: float | None = None):
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise BadRequest(f"'{key}' must be {'a number' if kind is float else 'an integer'}", key)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise BadRequest(f"'{key}' is {value}; it must be {bounds}", key)
    return kind(value)


def sampling_from(body: dict, chat: ChatModel, settings: ChatSettings, chat_api: bool) -> SamplingParams:
    """The request's sampling parameters over the model's generation_config.json defaults."""
    defaults = chat.defaults
    keys = ("max_completion_tokens", "max_tokens") if chat_api else ("max_tokens",)
    max_tokens = next((_number(body, k, int, 1) for k in keys if body.get(k) is not None), None)
    if max_tokens is not None and max_tokens > settings.max_tokens:
        raise BadRequest(
            f"'max_tokens' is {max_tokens}; this server allows at most {settings.max_tokens}", "max_tokens"
        )
    n = _number(body, "n", int, 1)
    if n is not None and n > 1:
        raise BadRequest("'n' > 1 is not supported: send one request per completion", "n")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (
        not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4
    ):
        raise BadRequest("'stop' must be a string or a list of up to 4 strings", "stop")

    def pick(key, kind, low, high, fallback):
        value = _number(body, key, kind, low, high)
        return value if value is not None else defaults.get(key, fallback)

    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("'seed' must be an integer", "seed")
    return SamplingParams(
        max_tokens=max_tokens or settings.max_tokens,
        temperature=pick("temperature", float, 0, 2, 1.0),
        top_p=pick("top_p", float, 0, 1, 1.0) or 1.0,
        top_k=pick("top_k", int, 0, None, 0),
        repetition_penalty=pick("repetition_penalty", float, 0.01, 10, 1.0),
        frequency_penalty=pick("frequency_penalty", float, -2, 2, 0.0),
        presence_penalty=pick("presence_penalty", float, -2, 2, 0.0),
        stop=stop or [],
        seed=seed,
    )


def _unknown(body: dict, known: set[str], endpoint: str) -> None:
    extra = sorted(set(body) - known)
    if extra:
        log.info("%s: ignoring fields danlu does not use: %s", endpoint, ", ".join(extra))


async def _read_json(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def create_chat_app(chat: ChatModel, settings: ChatSettings, engine_thread: bool = True) -> FastAPI:
    """The app; its engine is app.state.engine. With engine_thread=False the caller drives it with
    engine.run() (danlu serve does, from the main thread) and the app's shutdown stops it."""
    settings.check()
    metrics = ChatMetrics()
    template = Template(chat.tokenizer, settings.template)
    engine = Engine(
        chat,
        max_batch=settings.max_batch,
        prefill_chunk=settings.prefill_chunk,
        extra_stops=template.stops,
        on_step=lambda running, waiting: (metrics.running.set(running), metrics.waiting.set(waiting)),
    )
    status = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine_thread:
            engine.start()
        status["ready"] = True
        yield
        status["ready"] = False
        engine.stop()

    app = FastAPI(title=f"danlu chat: {chat.name}", version=__version__, lifespan=lifespan)
    known = {"/", "/healthz", "/readyz", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}
    app.add_middleware(Guard, max_body_bytes=settings.max_body_bytes, metrics=metrics, endpoints=known)
    app.state.engine = engine

    def check_key(request: Request) -> None:
        if not key_matches(settings.api_key, request.headers):
            raise BadRequest(
                "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                status=401,
                kind="authentication_error",
            )

    def submit(prompt: list[int], params: SamplingParams) -> tuple[Sequence, asyncio.Queue]:
        if engine.load[1] >= settings.max_queue:
            raise BadRequest("the server is at capacity; retry shortly", status=503, kind="server_error")
        if len(prompt) >= chat.context:
            raise BadRequest(
                f"the prompt has {len(prompt)} tokens; the model's context is {chat.context}", "messages"
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            if event.finish_reason is not None:
                metrics.finished(sequence)
            loop.call_soon_threadsafe(events.put_nowait, event)

        sequence = Sequence(prompt, params, emit)
        engine.submit(sequence)
        return sequence, events

    async def completion(request: Request, chat_api: bool) -> Response:
        check_key(request)
        body = await _read_json(request)
        endpoint = "/v1/chat/completions" if chat_api else "/v1/completions"
        _unknown(body, CHAT_FIELDS if chat_api else COMPLETION_FIELDS, endpoint)
        if chat_api:
            messages = body.get("messages")
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise BadRequest("'messages' must be a list of {role, content} objects", "messages")
            try:
                prompt = template.encode(template.render(messages))
            except DanluError as exc:
                raise BadRequest(exc.message, "messages") from None
        else:
            text = body.get("prompt")
            if isinstance(text, list) and len(text) == 1 and isinstance(text[0], str):
                text = text[0]
            if not isinstance(text, str) or not text:
                raise BadRequest("'prompt' must be a non-empty string", "prompt")
            prompt = chat.tokenizer(text)["input_ids"]  # a raw completion keeps the tokenizer's own BOS
        params = sampling_from(body, chat, settings, chat_api)
        options = body.get("stream_options") or {}
        usage_wanted = bool(isinstance(options, dict) and options.get("include_usage"))
        sequence, events = submit(prompt, params)
        ident = f"{'chatcmpl' if chat_api else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        shape = _Shape(ident, chat.name, chat_api)
        if body.get("stream"):
            stream = _sse(request, sequence, events, shape, usage_wanted, settings.timeout_s)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        return await _whole(request, sequence, events, shape, settings.timeout_s)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return exc.response({"Retry-After": "1"} if exc.status == 503 else None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions: messages in, an assistant message (or its stream) out."""
        return await completion(request, chat_api=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        """OpenAI (legacy) completions: a prompt string continued as is, no chat template."""
        return await completion(request, chat_api=False)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": chat.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "danlu",
                    "context_length": chat.context,
                    "dtype": chat.dtype,
                    "quantize": chat.quantize,
                    "weight_bytes": chat.weight_bytes,
                    "generation_defaults": chat.defaults,  # from the model's generation_config.json
                    "max_tokens": settings.max_tokens,
                    "template": template.name,
                }
            ],
        }

    add_probes(app, status, metrics, "The model is loaded and the engine is running.")

    page = resources.files("danlu.serve").joinpath("static/chat.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        settings_json = json.dumps(
            {"model": chat.name, "max_tokens": settings.max_tokens, "defaults": chat.defaults,
             "api_key_required": settings.api_key is not None}
        ).replace("</", "<\\/")  # fmt: skip
        return HTMLResponse(page.replace("__DANLU_CHAT__", settings_json))

    return app


@dataclass
class _Shape:
    """OpenAI's response objects for one request."""

    ident: str
    model: str
    chat_api: bool

    def __post_init__(self) -> None:
        self.created = int(time.time())

    def chunk(self, text: str | None, finish: str | None, first: bool = False, usage: bool = False) -> dict:
        if self.chat_api:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        out = {
            "id": self.ident,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if usage:
            out["usage"] = None
        return out

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        if self.chat_api:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}  # fmt: skip
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.ident, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage}  # fmt: skip


def _usage(sequence: Sequence) -> dict[str, int]:
    prompt, completion = len(sequence.prompt), len(sequence.output)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse_line(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(
    request, sequence, events, shape: _Shape, usage_wanted: bool, timeout_s: float
) -> AsyncIterator[str]:
    """The stream; cancelling it (the client went away) cancels the sequence."""
    deadline = time.monotonic() + timeout_s
    try:
        yield _sse_line(shape.chunk("" if shape.chat_api else None, None, first=True, usage=usage_wanted))
        while True:
            try:
                event = await asyncio.wait_for(events.get(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                sequence.cancel()
                error = {"message": f"generation took over {timeout_s:g} s", "type": "timeout", "code": 504}
                yield _sse_line({"error": error})
                break
            if event.error is not None:
                yield _sse_line({"error": {"message": event.error, "type": "server_error", "code": 500}})
                break
            if event.text:
                yield _sse_line(shape.chunk(event.text, None, usage=usage_wanted))
            if event.finish_reason == "cancelled":  # by the server (shutting down): the client is still here
                yield _sse_line({"error": {"message": STOPPED, "type": "server_error", "code": 503}})
                break
            if event.finish_reason is not None:
                yield _sse_line(
                    shape.chunk(None if shape.chat_api else "", event.finish_reason, usage=usage_wanted)
                )
                if usage_wanted:
                    final = {**shape.chunk(None, None), "choices": [], "usage": _usage(sequence)}
                    yield _sse_line(final)
                break
        yield _sse_line("[DONE]")
    finally:
        sequence.cancel()  # a no-op when it finished; frees the slot when the client left mid-stream


async def _whole(request: Request, sequence: Sequence, events, shape: _Shape, timeout_s: float) -> Response:
    """The whole completion as one JSON object. Starlette does not cancel a plain handler when the client
    leaves, so a watcher polls for the disconnect and cancels the sequence itself."""

    async def collect() -> tuple[str, Event]:
        parts = []
        while True:
            event = await events.get()
            parts.append(event.text)
            if event.finish_reason is not None:
                return "".join(parts), event

    async def disconnected() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)

    work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work not in done:
        work.cancel()
        sequence.cancel()
        if watch in done:
            return Response(status_code=499)  # nobody is listening; the slot is free
        raise BadRequest(f"generation took over {timeout_s:g} s", status=504, kind="timeout")
    text, event = work.result()
    if event.finish_reason == "cancelled":
        raise BadRequest(STOPPED, status=503, kind="server_error")
    if event.error is not None:
        raise BadRequest(f"generation failed: {event.error}", status=500, kind="server_error")
    return JSONResponse(shape.whole(text, event.finish_reason, _usage(sequence)))
