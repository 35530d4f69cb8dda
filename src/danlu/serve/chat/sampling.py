"""Per-request sampling: greedy or temperature / top-k / top-p sampling from a generator seeded by the
request (never the process's global RNG), with the OpenAI frequency and presence penalties (additive, on
the generated tokens' counts) and Hugging Face's repetition penalty (multiplicative, on prompt and
generated tokens)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Temperatures below this are greedy: logits divided by them overflow float32, and the softmax of such a
# temperature puts all its mass on the top token anyway.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1


def generator_for(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The request's own generator, on the device its logits are sampled on (None when greedy)."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()  # fresh entropy
    else:
        generator.manual_seed(params.seed)
    return generator


def penalized(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.frequency_penalty or params.presence_penalty)


def penalize(logits: torch.Tensor, params: SamplingParams, prompt: torch.Tensor, output: list[int]) -> None:
    """Apply the penalties to one row of logits [vocab], in place, on its device (prompt: on it too)."""
    if params.repetition_penalty != 1.0:
        generated = torch.tensor(output, dtype=torch.long, device=logits.device)
        seen = torch.unique(torch.cat([prompt, generated]))
        values = logits[seen]
        logits[seen] = torch.where(
            values > 0, values / params.repetition_penalty, values * params.repetition_penalty
        )
    if output and (params.frequency_penalty or params.presence_penalty):
        generated = torch.tensor(output, dtype=torch.long, device=logits.device)
        counts = torch.bincount(generated, minlength=logits.numel())
        counts = counts[: logits.numel()].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """The next token from one row of (penalized) float32 logits, as a tensor on their device: reading it
    is left to the caller, once for the whole step."""
    if params.greedy or generator is None:
        return torch.argmax(logits)
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest set whose mass reaches top_p (the first token always stays)
        drop = torch.cumsum(sorted_probs, 0) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0]
