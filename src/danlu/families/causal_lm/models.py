"""The model a causal-LM run trains: a Hugging Face causal LM (from model.pretrained, in float32), with a
LoRA adapter on every linear projection of its blocks (peft) or all of its weights trainable, behind a
module that returns the summed cross-entropy of the batch's trained tokens. The output layer runs only
at trained positions: most of a conversation's tokens (the prompt, the template's tags) need no logits,
and the output layer is a large share of a small model's compute.

A finished run holds RUN/hf (the merged model, tokenizer with the run's chat template, and
generation_config.json with its end-of-turn tokens: what `danlu serve` and `transformers` load as any
model directory), RUN/adapter (the LoRA adapter, for peft.PeftModel.from_pretrained on the base model)
and RUN/model.safetensors (a hard link to RUN/hf's weights)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from danlu.config import ModelConfig, TrainConfig
from danlu.errors import DanluError
from danlu.families.causal_lm.pretrained import check_pretrained, tokenizer_of
from danlu.families.causal_lm.state import CausalLMState
from danlu.hf import load_model, quiet_transformers, save_model
from danlu.run import MANIFEST, replace_folder
from danlu.training.objectives import IGNORE

log = logging.getLogger("danlu")


class CausalLMModel(nn.Module):
    """input_ids, attention_mask, labels [rows, tokens] -> the summed cross-entropy of the trained tokens
    (labels other than IGNORE, each predicted from the tokens before it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model  # a *ForCausalLM, or a peft model around one

    @property
    def causal_lm(self) -> nn.Module:
        """The *ForCausalLM (inside the peft model when there is one)."""
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return inner

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """attention_mask: [rows, tokens] (1 on real tokens), or packed rows' [rows, 1, tokens, tokens]
        boolean mask with their position_ids (packing.py)."""
        causal = self.causal_lm
        if attention_mask.dim() == 4 and causal.config._attn_implementation == "eager":
            # eager attention adds its mask: a boolean one becomes 0 / the float minimum
            blocked = torch.finfo(torch.float32).min
            zeros = torch.zeros(attention_mask.shape, device=attention_mask.device)
            attention_mask = zeros.masked_fill(~attention_mask, blocked)
        hidden = causal.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        targets = labels[:, 1:]
        trained = targets != IGNORE
        logits = causal.get_output_embeddings()(hidden.last_hidden_state[:, :-1][trained])
        cap = getattr(causal.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return F.cross_entropy(logits.float(), targets[trained], reduction="sum")


def lora_targets(model: nn.Module) -> list[str]:
    """The names of every linear projection inside the model's blocks (not its output layer)."""
    output = model.get_output_embeddings()
    decoder = model.get_decoder()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in decoder.named_modules()
            if isinstance(module, nn.Linear) and module is not output
        }
    )


def load_pretrained(path: Path) -> nn.Module:
    """A causal LM in float32 from a local directory (safetensors only) or GGUF file. A GGUF file is
    unpacked into dense weights as it loads (else transformers may keep its blocks packed, which trains
    nothing and cannot be saved)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    where, extra = (
        (path.parent, {"gguf_file": path.name, "quantization_config": GgufConfig(dequantize=True)})
        if path.is_file()
        else (path, {"use_safetensors": True})
    )
    with quiet_transformers():
        try:
            return load_model(AutoModelForCausalLM, where, dtype=torch.float32, **extra)
        except Exception as exc:
            raise DanluError(
                f"cannot load '{path}': {exc}".splitlines()[0], "check the model files"
            ) from None


def build_model(config: ModelConfig, state: CausalLMState) -> CausalLMModel:
    """Training: model.pretrained with a LoRA adapter (or every weight trainable). A finished run: its
    merged model in RUN/hf."""
    if config.target is not None:
        raise DanluError("a causal-LM run fine-tunes model.pretrained", "remove model.target")
    if state.run_hf is not None:
        return CausalLMModel(load_pretrained(state.run_hf))
    model = load_pretrained(check_pretrained(state.pretrained))
    model.config.use_cache = False
    if config.adapter == "none":
        return CausalLMModel(model)
    from peft import LoraConfig, get_peft_model

    targets = config.lora_targets or lora_targets(model)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with quiet_transformers():  # peft asks transformers about checkpointing by a deprecated name
            adapted = get_peft_model(model, lora)
    except ValueError as exc:  # a target that matches no module
        raise DanluError(
            f"model.lora_targets: {exc}".splitlines()[0],
            f"use module names such as {', '.join(lora_targets(model))}",
        ) from None
    return CausalLMModel(adapted)


def prepare_training(model: CausalLMModel, train: TrainConfig) -> None:
    """train.gradient_checkpointing: recompute each block in backward, non-reentrant (with LoRA the
    reentrant kind sees no input that needs a gradient, and trains nothing)."""
    if train.gradient_checkpointing:
        causal = model.causal_lm
        causal.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        causal.enable_input_require_grads()


def trainable_share(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def write_artifacts(run: Any, model: CausalLMModel, state: CausalLMState) -> None:
    """RUN/adapter (with LoRA), then RUN/hf with the adapter merged in, and RUN/model.safetensors."""
    inner = model.model
    if hasattr(inner, "merge_and_unload"):
        _write_dir(run.adapter, lambda tmp: save_model(inner, tmp))
        with quiet_transformers():
            merged = inner.merge_and_unload()  # in place: the model evaluated after this is the merged one
        model.model = merged
    causal = model.causal_lm

    def hf(tmp: Path) -> None:
        tokenizer = tokenizer_of(state)
        tokenizer.chat_template = state.template  # the one the run trained with, served with it
        causal.generation_config.eos_token_id = list(state.end_ids)
        causal.generation_config.pad_token_id = state.pad_id
        causal.config.use_cache = True
        save_model(causal, tmp)
        with quiet_transformers():
            tokenizer.save_pretrained(tmp)

    _write_dir(run.hf, hf)
    weights = run.hf / "model.safetensors"
    if not weights.is_file():
        raise DanluError(f"{run.hf} holds sharded weights", "report this: danlu writes one file")
    if run.weights.exists():
        run.weights.unlink()
    try:
        os.link(weights, run.weights)
    except OSError:
        shutil.copyfile(weights, run.weights)


def _write_dir(target: Path, write) -> None:
    """A directory written beside its place and renamed into it, with the list of what danlu wrote."""
    tmp = target.with_name(f".{target.name}.writing.tmp")  # a name run.py knows as danlu's
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    names = sorted(p.name for p in tmp.iterdir())
    (tmp / MANIFEST).write_text(json.dumps(names) + "\n")
    replace_folder(tmp, target)
