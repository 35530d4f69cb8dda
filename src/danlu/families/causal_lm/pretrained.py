"""The causal LM a run starts from: checked and read by the chat server's own loader functions (one loader:
a local Hugging Face directory or GGUF file, never the hub, no remote code), its tokenizer, the chat
template the run will train and serve with, and the tokens that end an assistant turn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from danlu.config import DataConfig, ModelConfig, TrainConfig
from danlu.errors import DanluError
from danlu.families.causal_lm.state import CausalLMState


def check_pretrained(spec: str | None) -> Path:
    from danlu.serve.chat.model import check_path

    if spec is None:
        raise DanluError(
            "fine-tuning a causal LM needs model.pretrained",
            "set model.pretrained=PATH, a local causal-LM directory or .gguf file",
        )
    return check_path(spec)


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of a model directory or GGUF file."""
    from transformers import AutoTokenizer

    from danlu.hf import load_local

    return load_local(AutoTokenizer, path, "tokenizer")


def tokenizer_of(state: CausalLMState) -> Any:
    """The run's tokenizer: RUN/hf's for a finished run, else model.pretrained's."""
    if state._tokenizer is None:
        state._tokenizer = load_tokenizer(
            state.run_hf if state.run_hf is not None else Path(state.pretrained)
        )
    return state._tokenizer


def new_state(data: DataConfig, model: ModelConfig, train: TrainConfig) -> CausalLMState:
    """A new run's state: the model, its tokenizer and template (model.template or the tokenizer's own),
    its end-of-turn tokens (as the chat server reads them), checked against data.max_length."""
    from danlu.serve.chat.model import generation_info
    from danlu.serve.chat.templates import Template

    path = check_pretrained(model.pretrained)
    tokenizer = load_tokenizer(path)
    template = Template(tokenizer, model.template)
    _, eos_ids, context = generation_info(path)
    end_ids = sorted(eos_ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
    if not end_ids:
        raise DanluError(
            f"'{path}' names no end-of-sequence token, so a fine-tuned model could not learn to stop",
            "set eos_token_id in its generation_config.json or tokenizer",
        )
    if data.max_length > context:
        raise DanluError(
            f"data.max_length={data.max_length} is beyond the {context} positions of '{path}'",
            f"set data.max_length={context} or lower",
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]  # masked anyway
    state = CausalLMState(
        str(path.resolve()),
        template.name,
        template.jinja,
        data.max_length,
        train.loss_on,
        end_ids,
        int(pad_id),
        weights_fingerprint(path),
    )
    state._tokenizer = tokenizer
    return state


def weights_fingerprint(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a model's weights: the GGUF file, or each safetensors file of the directory."""
    from danlu.data.sources import file_fingerprint

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    return {f.name: file_fingerprint(f) for f in files}


def check_same_weights(state: CausalLMState) -> None:
    """On resume: model.pretrained still holds the weights the run started from."""
    path = Path(state.pretrained)
    if not path.exists():
        raise DanluError(
            f"the run started from '{path}', which is not there any more",
            "put the model back where it was to resume; a finished run needs only its own RUN/hf",
        )
    if weights_fingerprint(path) != state.pretrained_weights:
        raise DanluError(
            f"the weights in '{path}' have changed since the run started",
            "put the original model back, or train a new run",
        )
