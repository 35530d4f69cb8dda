"""The request-size guard as plain ASGI: what reaches the app, what is refused, what is recorded."""

import asyncio
import json

import pytest

from danlu.serve.guard import Guard

LIMIT = 100


class Recorder:
    def __init__(self):
        self.observed = []

    def observe(self, endpoint, status, seconds):
        self.observed.append((endpoint, status))


async def echo_app(scope, receive, send):
    """Reads the whole body and answers with its length."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def call(path, headers, chunks, method="POST"):
    """Send a request through Guard(echo_app); returns (status, body, metrics, whether the app ran)."""
    metrics, ran, sent = Recorder(), [], []

    async def app(scope, receive, send):
        ran.append(True)
        await echo_app(scope, receive, send)

    guard = Guard(
        app,
        max_body_bytes=LIMIT,
        metrics=metrics,
        endpoints={"/v1/predict"},
        error_body=lambda status, message: {"detail": message},
    )
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "method": method, "headers": headers}
    asyncio.run(guard(scope, receive, send))
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, body, metrics.observed, bool(ran)


def test_a_declared_length_over_the_limit_is_413_before_the_app_runs():
    status, body, observed, ran = call("/v1/predict", [(b"content-length", b"101")], [b"x" * 101])
    assert status == 413 and not ran
    assert "over the limit of 100 bytes" in json.loads(body)["detail"]
    assert observed == [("/v1/predict", 413)]


@pytest.mark.parametrize("length", [b"-5", b"1e3", b"ten"])
def test_a_malformed_length_is_refused(length):
    status, _, _, ran = call("/v1/predict", [(b"content-length", length)], [b"x"])
    assert status == 413 and not ran


def test_a_body_without_length_is_counted_as_it_streams():
    status, _, _, ran = call("/v1/predict", [], [b"x" * 40, b"x" * 40, b"x" * 40])
    assert status == 413 and not ran


def test_bodies_within_the_limit_reach_the_app_whole():
    assert call("/v1/predict", [(b"content-length", b"100")], [b"x" * 100])[:2] == (200, b"100")
    status, body, observed, _ = call("/v1/predict", [], [b"x" * 50, b"x" * 50])  # replayed in one piece
    assert (status, body) == (200, b"100")
    assert observed == [("/v1/predict", 200)]


def test_unknown_paths_are_recorded_as_other():
    _, _, observed, _ = call("/secret/admin", [], [b""], method="GET")
    assert observed == [("other", 200)]


def test_read_body_joins_many_chunks_once_and_stops_at_the_limit():
    from danlu.serve.guard import TooLarge, read_body

    def receiver(chunks, end="http.request"):
        messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
        messages.append({"type": end, "body": b"", "more_body": False})

        async def receive():
            return messages.pop(0)

        return receive

    pieces = [bytes([i % 256]) * 7 for i in range(20_000)]
    assert asyncio.run(read_body(receiver(pieces), 10**6)) == b"".join(pieces)
    with pytest.raises(TooLarge):
        asyncio.run(read_body(receiver(pieces), 1000))
    assert asyncio.run(read_body(receiver([b"x"], end="http.disconnect"), 100)) is None  # the client left
