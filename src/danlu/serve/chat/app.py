"""The chat server's handler: OpenAI-compatible /v1/chat/completions, /v1/completions and /v1/models over
the continuous-batching engine, and a web chat page; the shell (danlu.serve.shell) adds the key,
limits, probes, metrics and the drain.

Streaming is Server-Sent Events as OpenAI clients expect: `data: {chunk}\\n\\n` per event, a usage chunk
(`choices: []`) when `stream_options.include_usage` asks, and `data: [DONE]` always, also after an error,
which goes in-band since the 200 has been sent. A client that goes away cancels its sequence, streaming
or not, and frees its slot. Before any work on a request, a full queue is a 503; templating and
tokenizing run off the event loop."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import Counter, Gauge, Histogram

from danlu.errors import DanluError
from danlu.serve.chat import protocol
from danlu.serve.chat.engine import Event, Sequence, engine_for
from danlu.serve.chat.model import ChatModel
from danlu.serve.chat.sampling import SamplingParams
from danlu.serve.chat.templates import Template
from danlu.serve.guard import RequestMetrics
from danlu.serve.settings import ChatSettings
from danlu.serve.shell import ServeError, Shell, create_app, page_with

STOPPED = "the server stopped before the generation finished; retry"
FAILED = "the generation failed on the server; retry, or report it with the server's log"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
# characters of prompt text per token of context taken before tokenizing (more cannot fit anyway)
CHARS_PER_TOKEN = 32


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
        self.kv_usage = Gauge(
            "danlu_chat_kv_cache_usage", "share of the KV cache held by running sequences (0-1)", registry=r
        )
        self.executor = Gauge(
            "danlu_chat_executor_info", "the executor that runs the model (1)", ["executor"], registry=r
        )
        self.preemptions = Counter(
            "danlu_chat_preemptions", "sequences whose cache was dropped for room and recomputed", registry=r
        )
        self.shared = Counter(
            "danlu_chat_shared_prompt_tokens", "prompt tokens taken from another sequence's cache cells",
            registry=r,
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


class ChatHandler:
    """Chat and text completions of one local language model."""

    ready_means = "The model is loaded and the engine is running."
    endpoints = frozenset({"/", "/healthz", "/readyz", "/metrics", "/v1/models", CHAT, COMPLETIONS})
    json_paths: ClassVar[dict[str, tuple[str, ...]]] = {
        CHAT: ("application/json",),
        COMPLETIONS: ("application/json",),
    }

    def __init__(self, chat: ChatModel, settings: ChatSettings, engine_thread: bool = True) -> None:
        """engine_thread: generate on a thread of the handler's own (tests, embedding); else the shell's
        run() drives the engine from the main thread (danlu serve)."""
        settings.check()
        self.chat, self.settings = chat, settings
        self.metrics = ChatMetrics()
        self.template = Template(chat.tokenizer, settings.template)
        self.engine = engine_for(
            chat,
            max_batch=settings.max_batch,
            max_batch_tokens=settings.budget(chat.context),
            prefill_chunk=settings.prefill_chunk,
            extra_stops=self.template.stops,
            on_step=self._gauges,
        )
        self.metrics.executor.labels(self.engine.executor.name).set(1)
        self._preempted = self._shared = 0
        self.engine_thread = engine_thread
        self.drive = None if engine_thread else self.engine.run
        self.title = f"danlu chat: {chat.name}"
        self.description = f"OpenAI-compatible chat completions of {chat.name}, batched continuously."
        self.max_prompt_chars = CHARS_PER_TOKEN * chat.context
        self.parsing = 0  # requests past the capacity check, not yet submitted (the event loop's count)

    def _gauges(self, running: int, waiting: int) -> None:
        """After each engine step (on the generating thread)."""
        self.metrics.running.set(running)
        self.metrics.waiting.set(waiting)
        self.metrics.kv_usage.set(self.engine.kv_usage)
        if self.engine.preemptions != self._preempted:
            self.metrics.preemptions.inc(self.engine.preemptions - self._preempted)
            self._preempted = self.engine.preemptions
        if self.engine.shared_tokens != self._shared:
            self.metrics.shared.inc(self.engine.shared_tokens - self._shared)
            self._shared = self.engine.shared_tokens

    def error_body(self, error: ServeError) -> dict[str, Any]:
        return protocol.error_body(error)

    def wrap(self, app: Any) -> Any:
        return app

    async def start(self) -> None:
        if self.engine_thread:
            self.engine.start()

    async def stop(self) -> None:
        self.engine.stop()

    def page(self) -> str:
        chat, settings = self.chat, self.settings
        config = {
            "model": chat.name,
            "max_tokens": settings.max_tokens,
            "defaults": chat.defaults,
            "api_key_required": settings.api_key is not None,
        }
        return page_with("chat.html", "__DANLU_CHAT__", config)

    # --- requests ---------------------------------------------------------------------------------

    def _chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of the conversation (on a parsing thread): the characters first, then the template."""
        chars = sum(len(str(m.get("content", ""))) for m in messages)
        if chars > self.max_prompt_chars:
            raise protocol.bad(
                f"'messages' hold {chars} characters; at most {self.max_prompt_chars} are taken "
                f"(the model's context is {self.chat.context} tokens)",
                "messages",
            )
        try:
            return self.template.encode_messages(messages)
        except DanluError as exc:
            raise protocol.bad(exc.message, "messages") from None

    def _text_prompt(self, text: str) -> list[int]:
        if len(text) > self.max_prompt_chars:
            raise protocol.bad(
                f"'prompt' has {len(text)} characters; at most {self.max_prompt_chars} are taken", "prompt"
            )
        return self.chat.tokenizer(text)["input_ids"]  # a raw completion keeps the tokenizer's own BOS

    async def _read(self, request: Request, shell: Shell, chat_api: bool):
        """The body, its sampling parameters and its prompt's token ids, checked (parsing and tokenizing
        on the shell's threads)."""
        body = await shell.off_loop(protocol.read_json, await request.body())
        endpoint = CHAT if chat_api else COMPLETIONS
        protocol.log_unknown(body, protocol.CHAT_FIELDS if chat_api else protocol.COMPLETION_FIELDS, endpoint)
        params = protocol.sampling_from(body, self.chat.defaults, self.settings.max_tokens, chat_api)
        if chat_api:
            prompt = await shell.off_loop(self._chat_prompt, protocol.messages_of(body))
        else:
            prompt = await shell.off_loop(self._text_prompt, protocol.prompt_text(body))
        try:  # one that could never run is this request's 400, before it takes a place in the queue
            self.engine.check_fits(len(prompt), params.max_tokens)
        except DanluError as exc:
            raise protocol.bad(exc.message, "messages" if chat_api else "prompt") from None
        return body, params, prompt

    def _submit(self, prompt: list[int], params: SamplingParams) -> tuple[Sequence, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            if event.finish_reason is not None:
                self.metrics.finished(sequence)
            loop.call_soon_threadsafe(events.put_nowait, event)

        sequence = Sequence(prompt, params, emit)
        self.engine.submit(sequence)
        return sequence, events

    async def completion(self, request: Request, shell: Shell, chat_api: bool) -> Response:
        shell.authorize(request)
        # capacity first, before any work on the request: a slot is held from here to the submission,
        # so requests still being parsed count against --max-queue too
        if self.engine.load[1] + self.parsing >= self.settings.max_queue:
            raise shell.busy()
        self.parsing += 1
        try:
            body, params, prompt = await self._read(request, shell, chat_api)
            sequence, events = self._submit(prompt, params)
        finally:
            self.parsing -= 1
        options = body.get("stream_options") or {}
        usage_wanted = bool(isinstance(options, dict) and options.get("include_usage"))
        ident = f"{'chatcmpl' if chat_api else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        shape = protocol.Shape(ident, self.chat.name, chat_api)
        if body.get("stream"):
            stream = _sse(sequence, events, shape, usage_wanted, self.settings.timeout_s)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        return await _whole(request, sequence, events, shape, self.settings.timeout_s)

    def models(self) -> dict[str, Any]:
        chat, settings = self.chat, self.settings
        model = {
            "id": chat.name,
            "object": "model",
            "created": 0,
            "owned_by": "danlu",
            "executor": self.engine.executor.name,
            # the torch executor's decode steps: "cuda graphs" or "eager" (None: the engine's own)
            "decode": getattr(self.engine.executor, "decode_mode", None),
            # the torch executor on a CPU: the memory its oneDNN-packed copies of the layers take
            "packed_bytes": getattr(self.engine.executor, "packed_bytes", None),
            "engine_reason": chat.engine_reason,  # why --engine auto chose it
            "lora_adapter": chat.lora,  # vllm: a fine-tuned run's adapter, over its base model
            "context_length": chat.context,
            "dtype": chat.dtype,
            "quantize": chat.quantize,
            "weight_bytes": chat.weight_bytes,
            "generation_defaults": chat.defaults,  # from the model's generation_config.json
            "max_tokens": settings.max_tokens,
            "max_batch_tokens": self.engine.max_batch_tokens,
            "template": self.template.name,
        }
        return {"object": "list", "data": [model]}

    def add_routes(self, app: FastAPI, shell: Shell) -> None:
        @app.post(CHAT)
        async def chat_completions(request: Request) -> Response:
            """OpenAI chat completions: messages in, an assistant message (or its stream) out."""
            return await self.completion(request, shell, chat_api=True)

        @app.post(COMPLETIONS)
        async def completions(request: Request) -> Response:
            """OpenAI (legacy) completions: a prompt string continued as is, no chat template."""
            return await self.completion(request, shell, chat_api=False)

        @app.get("/v1/models")
        async def models(request: Request) -> dict[str, Any]:
            shell.authorize(request)
            return self.models()


def create_chat_app(chat: ChatModel, settings: ChatSettings, engine_thread: bool = True) -> FastAPI:
    """The chat server's app; its engine is app.state.shell.handler.engine. With engine_thread=False the
    caller drives the engine with engine.run() (danlu.serve.shell.run does, from the main thread) and the
    app's shutdown stops it."""
    return create_app(ChatHandler(chat, settings, engine_thread))


def _usage(sequence: Sequence) -> dict[str, int]:
    return protocol.usage(len(sequence.prompt), len(sequence.output))


TIMED_OUT = Event("", "timeout")  # what a stream's timer puts in its queue at the deadline


async def _sse(
    sequence, events, shape: protocol.Shape, usage_wanted: bool, timeout_s: float
) -> AsyncIterator[str]:
    """The stream; cancelling it (the client went away) cancels the sequence. One timer for the whole
    stream puts TIMED_OUT in its queue at the deadline (a wait_for per token would cost a task each)."""
    line = protocol.sse_line
    timer = asyncio.get_running_loop().call_later(timeout_s, events.put_nowait, TIMED_OUT)
    try:
        yield line(shape.chunk("" if shape.chat_api else None, None, first=True, usage=usage_wanted))
        while True:
            event = await events.get()
            if event is TIMED_OUT:
                sequence.cancel()
                yield protocol.sse_error(f"generation took over {timeout_s:g} s", "timeout", 504)
                break
            if event.error is not None:
                yield protocol.sse_error(FAILED, "server_error", 500)
                break
            if event.text:
                yield line(shape.chunk(event.text, None, usage=usage_wanted))
            if event.finish_reason == "cancelled":  # by the server (shutting down): the client is still here
                yield protocol.sse_error(STOPPED, "server_error", 503)
                break
            if event.finish_reason is not None:
                yield line(
                    shape.chunk(None if shape.chat_api else "", event.finish_reason, usage=usage_wanted)
                )
                if usage_wanted:
                    yield line(shape.usage_chunk(_usage(sequence)))
                break
        yield line("[DONE]")
    finally:
        timer.cancel()
        sequence.cancel()  # a no-op when it finished; frees the slot when the client left mid-stream


async def _whole(
    request: Request, sequence: Sequence, events, shape: protocol.Shape, timeout_s: float
) -> Response:
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
        raise ServeError(504, f"generation took over {timeout_s:g} s", kind="timeout")
    text, event = work.result()
    if event.finish_reason == "cancelled":
        raise ServeError(503, STOPPED, kind="server_error")
    if event.error is not None:
        raise ServeError(500, FAILED, kind="server_error")
    return JSONResponse(shape.whole(text, event.finish_reason, _usage(sequence)))
