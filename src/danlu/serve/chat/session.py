"""A conversation with a local causal LM in this process: `danlu chat` in the terminal, `danlu.chat` in
Python. The model's own template and generation defaults, and the server's engines, one answer at a
time on the caller's thread."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from danlu.errors import DanluError

if TYPE_CHECKING:
    from danlu.serve.chat.model import VllmOptions
    from danlu.serve.chat.sampling import SamplingParams

# what one answer may set (the OpenAI API's names, checked as the server checks them)
SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty",
            "presence_penalty", "stop", "seed")  # fmt: skip


class GenerationFailed(RuntimeError):
    """The engine ended an answer with an error (its log line says why); the conversation is as it was."""


class Chat:
    """A chat with a causal LM: a Hugging Face directory, a .gguf file, or a fine-tuned run (its RUN/hf).

    ask(message) answers after the system prompt and the history, and keeps the exchange; stream(message)
    yields the answer's text as it is generated (the exchange is kept once the answer is whole);
    complete(messages) answers OpenAI-style messages and keeps nothing. reset() clears the history.
    Each takes one answer's sampling options by the OpenAI API's names (SAMPLING: max_tokens up to the
    chat's own, temperature, top_p, top_k, stop, seed, the penalties) over the chat's defaults: its
    temperature, seed and max_tokens, else the model's generation_config.json.
    Close it (or use `with`) to free the model.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        system: str | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        max_tokens: int = 512,
        dtype: str = "auto",
        device: str = "cpu",
        quantize: str | None = None,
        engine: str = "auto",
        template: str | None = None,
        trust_remote_code: bool = False,
        vllm: VllmOptions | None = None,
    ):
        from danlu.serve.chat.model import check_path, served_model
        from danlu.serve.settings import MAX_TEMPERATURE

        spec = served_model(str(model))  # a fine-tuned causal LM's run: the model it holds
        check_path(spec)  # a missing path or a hub id: one line before torch is imported
        if max_tokens < 1:
            raise DanluError("--max-tokens must be at least 1", "e.g. --max-tokens 256")
        if temperature is not None and not 0 <= temperature <= MAX_TEMPERATURE:  # the server's range
            raise DanluError(
                f"--temperature must be between 0 and {MAX_TEMPERATURE:g}",
                "0 is greedy; e.g. --temperature 0.7",
            )
        from danlu.serve.chat.engine import engine_for
        from danlu.serve.chat.model import load_chat_model
        from danlu.serve.chat.templates import Template

        self.model = load_chat_model(spec, dtype, device, trust_remote_code, quantize, engine, vllm=vllm)
        self.template = Template(self.model.tokenizer, template)
        # max_batch 1: generate() steps the engine on the caller's thread, one answer at a time
        self.engine = engine_for(self.model, max_batch=1, extra_stops=self.template.stops)
        # the model's generation_config.json sampling, as the server takes it, under the chat's own
        self.sampling: dict[str, Any] = dict(self.model.defaults)
        if temperature is not None:
            self.sampling["temperature"] = temperature
        self.seed, self.max_tokens = seed, max_tokens
        self.system = system
        self.history: list[dict[str, str]] = []

    @property
    def name(self) -> str:
        return self.model.name

    def ask(self, message: str, **sampling: Any) -> str:
        """The answer to `message`, after the system prompt and the history; the exchange joins the history.

        Raises:
            DanluError: the conversation no longer fits the model's context (reset() starts again).
            GenerationFailed: the engine failed the answer; the history is as it was.
        """
        return "".join(self.stream(message, **sampling))

    def stream(self, message: str, **sampling: Any) -> Iterator[str]:
        """ask(), as the answer's pieces of text while they are generated. An answer left unfinished
        (the loop broken) is cancelled and not kept."""
        turn = {"role": "user", "content": message}
        parts = []
        for piece in self.stream_messages([*self._system(), *self.history, turn], **sampling):
            parts.append(piece)
            yield piece
        self.history += [turn, {"role": "assistant", "content": "".join(parts)}]

    def complete(self, messages: list[dict[str, str]], **sampling: Any) -> str:
        """The answer to OpenAI-style messages ({"role": ..., "content": ...}), with no history kept."""
        return "".join(self.stream_messages(messages, **sampling))

    def stream_messages(self, messages: list[dict[str, str]], **sampling: Any) -> Iterator[str]:
        """complete(), as pieces of text while they are generated."""
        params = self.sampling_params(sampling)
        prompt = self.template.encode_messages(messages)
        self.engine.check_fits(len(prompt), params.max_tokens)
        error = None
        for event in self.engine.generate(prompt, params):
            if event.text:
                yield event.text
            error = event.error or error
        if error is not None:
            raise GenerationFailed(f"generation failed: {error}")

    def sampling_params(self, sampling: dict[str, Any]) -> SamplingParams:
        """One answer's sampling over the chat's defaults, checked as the server checks a request's.

        Raises:
            DanluError: an unknown option, or a value out of its range.
        """
        from danlu.serve.chat.protocol import sampling_from
        from danlu.serve.shell import ServeError

        unknown = sorted(set(sampling) - set(SAMPLING))
        if unknown:
            raise DanluError(f"unknown sampling option {', '.join(unknown)}", f"use {', '.join(SAMPLING)}")
        tokens = sampling.get("max_tokens")
        if isinstance(tokens, int) and tokens > self.max_tokens:
            raise DanluError(
                f"max_tokens={tokens} is over this chat's max_tokens ({self.max_tokens})",
                "pass a larger max_tokens to danlu.chat",
            )
        body = {"seed": self.seed, **sampling}
        try:
            return sampling_from(body, self.sampling, self.max_tokens, chat_api=False)
        except ServeError as error:
            raise DanluError(error.message, "pass a value in its range") from None

    def reset(self) -> None:
        self.history = []

    def close(self) -> None:
        self.engine.stop()

    def __enter__(self) -> Chat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Chat({self.name!r}, {len(self.history) // 2} exchanges)"

    def _system(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []


chat = Chat  # danlu.chat(model, ...): danlu chat's Python equal
