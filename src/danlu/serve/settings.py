"""What each danlu server takes, and its checks: plain dataclasses with no torch, FastAPI or model import,
so `danlu serve` refuses a limit out of range before anything heavy loads, and `danlu package` reads the
defaults without loading a server.

ServerSettings is what every server takes (where it listens, its key, its limits); ServeSettings a run's
predictions server, ChatSettings a chat model's, EmbedSettings an encoder's."""

from __future__ import annotations

import math
from dataclasses import dataclass

from danlu.embeddings.detect import TRUNCATE
from danlu.errors import DanluError

MAX_TEMPERATURE = 2.0  # sampling temperatures run 0 (greedy) to this, as OpenAI's API allows (server, CLI)
# settings whose `danlu serve` option has another name (the others are their name with dashes)
OPTIONS = {"max_queue_rows": "--max-queue", "max_body_bytes": "--max-body-mb"}


@dataclass(kw_only=True)
class ServerSettings:
    """What every danlu server takes: where it listens, its key and its limits."""

    host: str = "127.0.0.1"  # loopback: only this machine, and only Host headers that name it
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 10 * 1024 * 1024
    timeout_s: float = 30.0  # a request running longer is ended; SIGTERM drains for as long
    access_log: bool = False

    def check_common(self, counts: tuple[str, ...]) -> None:
        """Each setting in `counts` at least 1 and timeout_s above 0, or one DanluError naming it (and
        the CLI option that sets it, where that has another name)."""
        for name in (*counts, "max_body_bytes"):
            if not 1 <= getattr(self, name) < math.inf:  # written so that a NaN fails too
                named = f"{OPTIONS[name]} ({name})" if name in OPTIONS else name.replace("_", "-")
                raise DanluError(f"{named} must be at least 1 (and finite)", "pass a positive number")
        if not 0 < self.timeout_s < math.inf:
            raise DanluError("--timeout must be a finite number of seconds above 0", "e.g. --timeout 30")
        if not 1 <= self.port <= 65535:  # the system would take 99999 as 34463, and 0 as any free port
            raise DanluError(
                f"--port {self.port} is not a port", "pass a port from 1 to 65535, e.g. --port 8000"
            )


@dataclass
class ServeSettings(ServerSettings):
    """A run's predictions server (danlu.serve.app)."""

    run_dir: str
    engine: str = "torch"
    max_batch: int = 64  # rows per forward pass
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for company
    max_rows: int = 1024  # rows per request
    max_queue_rows: int = 8192  # rows waiting before requests get 503
    trust_model_code: bool = False  # a run whose model comes from code (model.target) loads only with it

    def check(self) -> None:
        self.check_common(("max_batch", "max_rows", "max_queue_rows"))
        check_wait(self.max_wait_ms)


@dataclass(kw_only=True)
class ChatSettings(ServerSettings):
    """A chat model's server (danlu.serve.chat.app)."""

    max_batch: int = 8  # running sequences
    max_batch_tokens: int | None = None  # the KV cache's size in tokens (executors count it); None: budget()
    max_queue: int = 64  # waiting sequences before 503
    max_tokens: int = 512  # the most tokens a request may ask for (and the default)
    prefill_chunk: int = 512  # prompt tokens per engine step
    timeout_s: float = 300.0
    max_body_bytes: int = 4 * 1024 * 1024
    template: str | None = None

    def check(self) -> None:
        self.check_common(("max_batch", "max_queue", "max_tokens", "prefill_chunk"))
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise DanluError("max-batch-tokens must be at least 1", "pass a positive number")

    def budget(self, context: int) -> int:
        """--max-batch-tokens, or by default 16,384 cache tokens, or the model's whole context where that
        is more (so any one request the model can take fits alone)."""
        return self.max_batch_tokens if self.max_batch_tokens is not None else max(16_384, context)


@dataclass(kw_only=True)
class EmbedSettings(ServerSettings):
    """An encoder's embeddings server (danlu.serve.embeddings)."""

    model: str
    max_batch: int = 64  # texts or images per forward pass
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for company
    max_rows: int = 1024  # inputs per request (texts and images; labels of a zero-shot request)
    max_queue_rows: int = 8192  # inputs waiting before requests get 503
    max_text_chars: int = 20_000  # characters of one text (or label)
    max_image_pixels: int = 40_000_000  # width x height of one image, read from its header
    truncate: str = "error"  # a text over the model's limit: 400 (error), or cut at its end or start
    matryoshka: bool = False  # `dimensions` below the model's may cut vectors (a model trained for it)
    dtype: str = "float32"  # or bfloat16 matrix products, checked against float32 at load

    def check(self) -> None:
        self.check_common(("max_batch", "max_rows", "max_queue_rows", "max_text_chars", "max_image_pixels"))
        check_wait(self.max_wait_ms)
        if self.truncate not in TRUNCATE:
            raise DanluError(f"--truncate must be one of {', '.join(TRUNCATE)}", "e.g. --truncate error")


def check_wait(max_wait_ms: float) -> None:
    if not 0 <= max_wait_ms < math.inf:
        raise DanluError("--max-wait-ms must be a finite number, 0 or more", "e.g. --max-wait-ms 2")


def check_address(host: str, port: int) -> None:
    """`danlu serve` can listen on host:port: said before the model loads (uvicorn finds out after, and
    ends with its own log lines). A race with another server starting meanwhile is still uvicorn's.

    Raises:
        DanluError: the port is taken, not ours to take, or the host is no address of this machine.
    """
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, OverflowError) as exc:
        raise DanluError(
            f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}",
            "pass --host 127.0.0.1 (this machine) or 0.0.0.0 (every interface)",
        ) from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise DanluError(
                    f"port {port} on {host} is in use", "stop what listens there, or pick another --port"
                ) from None
            raise DanluError(
                f"cannot listen on {host}:{port}: {exc.strerror}",
                "pick another --port (ports below 1024 need root) or --host (an address of this machine)",
            ) from None
