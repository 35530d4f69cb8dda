"""Evaluating and predicting with a fine-tuned causal LM, which answers conversations rather than rows.

`evaluate_run`: on the run's held-out conversations (or a file of them), the loss and perplexity per
trained token of the fine-tuned model and of the model it started from (when that is still where the run
found it), and greedy answers to up to `samples` of the conversations' last questions, written to
RUN/samples.jsonl with the reference answer, and scored by exact match and by containing the reference.
Plain texts have no questions: their loss and perplexity alone.

`predict_run`: answers to every conversation of a file (or continuations of every text), batched
through the chat engine, as JSONL."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from danlu.errors import DanluError
from danlu.families.causal_lm.conversations import Row, kind, read_conversations, read_prompts
from danlu.families.causal_lm.data import Encoded, encode_all
from danlu.families.causal_lm.models import CausalLMModel, load_pretrained
from danlu.families.causal_lm.pretrained import tokenizer_of
from danlu.families.causal_lm.state import CausalLMState
from danlu.inference import autocast, resolve_precision
from danlu.run import SAMPLES, RunDir, atomic_write
from danlu.serve.chat.templates import Template
from danlu.training.objectives import TokenStream, trained_tokens

log = logging.getLogger("danlu")
ANSWERED = 32  # held-out conversations answered by `danlu evaluate`
MAX_ANSWER_TOKENS = 256


def token_loss(model: CausalLMModel, encoded: Encoded, pad_id: int, batch: int = 8) -> dict[str, Any]:
    """The mean loss and perplexity per trained token of conversations, batched by length."""
    part = encoded.part(torch.arange(len(encoded.kept)).numpy(), pad_id, torch.device("cpu"))
    part, _ = part.by_length()
    stream = TokenStream()
    device = torch.device("cpu")
    precision = resolve_precision(device, "auto")
    model.eval()
    with torch.no_grad():
        for b in part.batches(batch):
            with autocast(device, precision):
                loss = model(*b.inputs.values())
            stream.add(float(loss), trained_tokens(b.target))
    return stream.result()


def _conversations(run: RunDir, family: Any, state: CausalLMState, data: str | Path | None) -> list:
    if data is not None:
        return read_conversations(Path(data)).messages
    from danlu.data import heldout

    _, chunks = heldout.items(run, family, state)
    return [conversation for chunk in chunks for conversation in chunk]


def evaluate_run(
    run: RunDir, family: Any, state: CausalLMState, data: str | Path | None = None
) -> dict[str, Any]:
    """Loss before and after fine-tuning, and scored answers; writes RUN/samples.jsonl."""
    conversations = _conversations(run, family, state, data)
    if not conversations:
        raise DanluError(
            f"no conversation to evaluate in {data or run.heldout}", "pass a file of conversations"
        )
    tokenizer = tokenizer_of(state)
    template = Template.of_source(tokenizer, state.template, state.template_name)
    lines = list(range(1, len(conversations) + 1))
    encoded = encode_all(state, template, conversations, lines, "skip", "evaluation")
    if not encoded.kept:
        raise DanluError(
            f"no conversation fits data.max_length={state.max_length}", "pass shorter conversations"
        )
    texts = encoded.pieces is not None
    after = token_loss(CausalLMModel(load_pretrained(run.hf)), encoded, state.pad_id)
    metrics: dict[str, Any] = {**after, kind(texts): len(encoded.kept)}
    base = Path(state.pretrained)
    if base.exists():
        before = token_loss(CausalLMModel(load_pretrained(base)), encoded, state.pad_id)
        metrics.update(base_loss=before["loss"], base_perplexity=before["perplexity"])
    else:
        metrics["undefined"] = {"base_loss": f"undefined: the base model '{base}' is not there any more"}
    if texts:
        return metrics
    answered = answer_last_turns(run, [conversations[i] for i in encoded.kept[:ANSWERED]])
    rows = [
        {"messages": prompt, "reference": reference, "answer": text, "finish_reason": reason}
        for prompt, reference, text, reason in answered
    ]
    samples = run.path / SAMPLES
    atomic_write(samples, lambda f: f.write(_jsonl(rows)))
    metrics.update(
        samples=len(rows),
        exact_match=sum(r["answer"].strip() == r["reference"].strip() for r in rows) / len(rows),
        contains=sum(r["reference"].strip() in r["answer"] for r in rows) / len(rows),
        samples_file=str(samples),
    )
    return metrics


def answer_last_turns(run: RunDir, conversations: list) -> list[tuple[list, str, str, str]]:
    """(the messages before the last assistant turn, that turn's text, the model's greedy answer, why
    it ended) for each conversation."""
    prompts, references = [], []
    for messages in conversations:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(messages[:last])
        references.append(messages[last]["content"])
    answers = answer(run, prompts)
    return [(p, r, t, f) for p, r, (t, f) in zip(prompts, references, answers, strict=True)]


def answer(run: RunDir, prompts: list[Row]) -> list[tuple[str, str]]:
    """The fine-tuned model's greedy answers to conversations (or continuations of texts, tokenized as the
    completions endpoint does), batched through the chat engine."""
    from danlu.serve.chat.engine import engine_for
    from danlu.serve.chat.model import load_chat_model
    from danlu.serve.chat.sampling import SamplingParams

    chat = load_chat_model(str(run.hf))
    template = Template(chat.tokenizer)  # RUN/hf's template: the run's own
    engine = engine_for(chat, max_batch=8, extra_stops=template.stops)
    try:
        encoded = [
            chat.tokenizer(p)["input_ids"] if isinstance(p, str) else template.encode_messages(p)
            for p in prompts
        ]
        params = SamplingParams(max_tokens=MAX_ANSWER_TOKENS, temperature=0.0)
        return engine.answer_all(encoded, params)
    finally:
        engine.stop()


def predict_run(run: RunDir, data: str | Path, out: str | Path) -> int:
    """Answers to every conversation of DATA (its messages up to the last user turn), or continuations
    of its texts, as JSONL in OUT: each row's messages (or text) and the answer. Returns the rows written;
    OUT appears only when complete."""
    if Path(out).suffix.lower() != ".jsonl":
        raise DanluError(
            f"output '{out}' must end in .jsonl for a fine-tuned language model", "e.g. -o answers.jsonl"
        )
    prompts = read_prompts(Path(data))
    answers = answer(run, prompts)
    rows = [
        {("text" if isinstance(p, str) else "messages"): p, "answer": t, "finish_reason": f}
        for p, (t, f) in zip(prompts, answers, strict=True)
    ]
    atomic_write(Path(out), lambda f: f.write(_jsonl(rows)))
    return len(rows)


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
