"""The text model: a local Hugging Face encoder with a sequence classification (or regression) head, as
AutoModelForSequenceClassification builds it, behind a thin module that returns the logits.

`TextModel` registers the Hugging Face model's own children as its children, so its state dict has the
Hugging Face key names: RUN/model.safetensors is the very file RUN/hf/ needs (hard-linked there)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from danlu.config import ModelConfig
from danlu.errors import DanluError
from danlu.families.text.pretrained import check_dir
from danlu.families.text.state import TextState
from danlu.hf import load_files, load_model, quiet_transformers
from danlu.run import MANIFEST


class TextModel(nn.Module):
    """input_ids, attention_mask (int64 [n, tokens]) -> logits [n, outputs]."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        if dict(hf.named_parameters(recurse=False)) or dict(hf.named_buffers(recurse=False)):
            raise DanluError(
                f"{type(hf).__name__} keeps parameters outside its submodules", "use another encoder"
            )
        for name, child in hf.named_children():
            self.add_module(name, child)
        self._hf = (hf,)  # a tuple: not registered twice

    @property
    def hf(self) -> nn.Module:
        return self._hf[0]

    def train(self, mode: bool = True) -> TextModel:
        super().train(mode)
        self.hf.training = mode
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits


def _head_settings(state: TextState) -> dict:
    if state.task == "classification":
        labels = [str(c) for c in state.classes]
        return {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
            "problem_type": "single_label_classification",
        }
    return {"num_labels": 1, "problem_type": "regression"}


def build_model(config: ModelConfig, state: TextState) -> nn.Module:
    """Training: the encoder's weights from model.pretrained with a new head. A finished run: the
    architecture from RUN/hf/config.json (its weights are loaded from model.safetensors after)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if config.target is not None:
        raise DanluError("the text family fine-tunes model.pretrained", "remove model.target")
    with quiet_transformers():
        if state.run_hf is not None:
            hf_config = load_files(AutoConfig, state.run_hf)
            hf = AutoModelForSequenceClassification.from_config(hf_config)
        else:
            path = check_dir(config.pretrained)
            try:
                hf = load_model(AutoModelForSequenceClassification, path, **_head_settings(state))
            except (OSError, ValueError, KeyError) as exc:
                raise DanluError(
                    f"cannot load '{path}' as an encoder: {str(exc).splitlines()[0]}",
                    "pass a BERT-style encoder directory (config.json with a model_type transformers knows)",
                ) from None
    if state.task == "regression":  # standardized outputs; RUN/hf's config says how to undo that
        hf.config.danlu_target_mean, hf.config.danlu_target_std = state.head.mean, state.head.std
    if config.freeze_encoder:
        for p in hf.base_model.parameters():
            p.requires_grad_(False)
    return TextModel(hf)


def write_hf(model: TextModel, state: TextState, weights: Path, target: Path) -> None:
    """RUN/hf: config.json, the tokenizer and model.safetensors (a hard link to the run's weights, or a
    copy where links are not possible), written beside and renamed into place."""
    tmp = target.with_name(f".{target.name}.writing.tmp")  # a name run.py knows as danlu's
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with quiet_transformers():
        model.hf.config.save_pretrained(tmp)
        state.tokenizer().save_pretrained(tmp)
    try:
        os.link(weights, tmp / "model.safetensors")
    except OSError:
        shutil.copyfile(weights, tmp / "model.safetensors")
    # what danlu wrote here, so that --overwrite deletes these and nothing a user adds
    names = sorted(p.name for p in tmp.iterdir())
    (tmp / MANIFEST).write_text(json.dumps(names) + "\n")
    if not target.exists():
        tmp.rename(target)
        return
    for item in tmp.iterdir():  # a user's files that --overwrite kept there: danlu's go in beside them
        os.replace(item, target / item.name)
    tmp.rmdir()
