"""OpenAI's chat and completions API as danlu reads and writes it: the request body, checked into
SamplingParams and a prompt (every value that could break generation is a 400 here, before the engine
sees it), and the response objects, whole or as Server-Sent Events."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from danlu.serve.chat.sampling import GREEDY_BELOW, SamplingParams
from danlu.serve.settings import MAX_TEMPERATURE
from danlu.serve.shell import ServeError

log = logging.getLogger("danlu")
# what danlu reads from a request; anything else OpenAI defines is accepted, logged and ignored
CHAT_FIELDS = {
    "model", "messages", "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "stop",
    "stream", "stream_options", "seed", "n", "frequency_penalty", "presence_penalty", "repetition_penalty",
}  # fmt: skip
COMPLETION_FIELDS = (CHAT_FIELDS - {"messages", "max_completion_tokens"}) | {"prompt"}
MAX_STOPS, MAX_STOP_CHARS = 4, 64
# a seed is any integer a 64-bit generator takes
SEED_RANGE = (-(2**63), 2**64 - 1)
# a top_k is any integer a 32-bit one holds (as llama.cpp and vLLM take it); at or above the vocabulary: off
MAX_TOP_K = 2**31 - 1
MAX_MESSAGES = 1024
LOGGED_KEYS, LOGGED_KEY_CHARS = 8, 40


def bad(message: str, param: str | None = None) -> ServeError:
    return ServeError(400, message, param)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def read_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object. Strict JSON: NaN and Infinity (which Python's parser accepts)
    are refused, and so is nesting too deep to parse."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise bad("the body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise bad("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise bad("the body must be a JSON object")
    return data


def number(body: dict, key: str, kind: type, low: float | None = None, high: float | None = None):
    """body[key] as an int (kind int) or a finite number (kind float) within [low, high], or None."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise bad(f"'{key}' must be {'a number' if kind is float else 'an integer'}", key)
    if isinstance(value, float) and not math.isfinite(value):
        raise bad(f"'{key}' must be a finite number", key)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise bad(f"'{key}' is {value}; it must be {bounds}", key)
    return kind(value)


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise bad(f"'stop' must be a string or a list of up to {MAX_STOPS} strings", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad(f"a stop string may have at most {MAX_STOP_CHARS} characters", "stop")
    return stops


def sampling_from(
    body: dict, defaults: dict[str, Any], max_tokens_cap: int, chat_api: bool
) -> SamplingParams:
    """The request's sampling parameters over the model's generation_config.json defaults."""
    keys = ("max_completion_tokens", "max_tokens") if chat_api else ("max_tokens",)
    max_tokens = next((number(body, k, int, 1) for k in keys if body.get(k) is not None), None)
    if max_tokens is not None and max_tokens > max_tokens_cap:
        raise bad(f"'max_tokens' is {max_tokens}; this server allows at most {max_tokens_cap}", "max_tokens")
    n = number(body, "n", int, 1)
    if n is not None and n > 1:
        raise bad("'n' > 1 is not supported: send one request per completion", "n")

    def pick(key, kind, low, high, fallback):
        value = number(body, key, kind, low, high)
        return value if value is not None else defaults.get(key, fallback)

    temperature = pick("temperature", float, 0, MAX_TEMPERATURE, 1.0)
    return SamplingParams(
        max_tokens=max_tokens or max_tokens_cap,
        # below this the softmax overflows to NaN: such a temperature means greedy anyway
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=pick("top_p", float, 0, 1, 1.0) or 1.0,
        top_k=pick("top_k", int, 0, MAX_TOP_K, 0),
        repetition_penalty=pick("repetition_penalty", float, 0.01, 10, 1.0),
        frequency_penalty=pick("frequency_penalty", float, -2, 2, 0.0),
        presence_penalty=pick("presence_penalty", float, -2, 2, 0.0),
        stop=_stops(body),
        seed=number(body, "seed", int, *SEED_RANGE),
    )


def messages_of(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise bad("'messages' must be a list of {role, content} objects", "messages")
    if len(messages) > MAX_MESSAGES:
        raise bad(f"'messages' has {len(messages)} messages; at most {MAX_MESSAGES} are taken", "messages")
    return messages


def prompt_text(body: dict) -> str:
    text = body.get("prompt")
    if isinstance(text, list) and len(text) == 1 and isinstance(text[0], str):
        text = text[0]
    if not isinstance(text, str) or not text:
        raise bad("'prompt' must be a non-empty string", "prompt")
    return text


def log_unknown(body: dict, known: set[str], endpoint: str) -> None:
    """Log the fields danlu does not use: a few of them, each cut short and escaped (a key is the client's
    text: it must not write lines of its own into the log)."""
    extra = sorted(set(body) - known)
    if extra:
        shown = [repr(key[:LOGGED_KEY_CHARS]) for key in extra[:LOGGED_KEYS]]
        more = f" and {len(extra) - LOGGED_KEYS} more" if len(extra) > LOGGED_KEYS else ""
        log.info("%s: ignoring fields danlu does not use: %s%s", endpoint, ", ".join(shown), more)


def error_body(error: ServeError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": None}}


@dataclass
class Shape:
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
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.ident, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage}  # fmt: skip

    def usage_chunk(self, usage: dict) -> dict:
        return {**self.chunk(None, None), "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def sse_line(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def sse_error(message: str, kind: str, code: int) -> str:
    """An error inside a stream, whose 200 is already sent."""
    return sse_line({"error": {"message": message, "type": kind, "code": code}})
