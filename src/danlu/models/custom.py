"""The user's own nn.Module, named as "package.module:ClassName" in model.target.

It is constructed as `ClassName(in_features=..., out_features=..., **model.kwargs)`, plus
`cardinalities=[...]` when the data has categorical columns; its forward then receives
`(x_num, x_cat)` instead of `(x_num)`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from torch import nn

from danlu.config import ModelConfig
from danlu.errors import DanluError

if TYPE_CHECKING:
    from danlu.models import ModelInputs


@contextlib.contextmanager
def _working_directory_importable() -> Iterator[None]:
    """Like `python -m`: a module in the working directory is importable, for this import only."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def import_class(target: str) -> type:
    module_name, _, class_name = target.partition(":")
    try:
        with _working_directory_importable():
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DanluError(
            f"model.target '{target}': cannot import module '{module_name}' ({exc})",
            "make the module importable (install it, or run from the directory that contains it)",
        ) from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise DanluError(
            f"model.target '{target}': module '{module_name}' has no '{class_name}'",
            "check the class name after the colon",
        )
    return cls


def build_custom(config: ModelConfig, inputs: ModelInputs) -> nn.Module:
    cls = import_class(config.target)
    kwargs = {"in_features": inputs.n_numeric, "out_features": inputs.n_outputs, **config.kwargs}
    if inputs.cardinalities:
        kwargs["cardinalities"] = inputs.cardinalities
    try:
        model = cls(**kwargs)
    except TypeError as exc:
        raise DanluError(
            f"model.target '{config.target}' cannot be built with {sorted(kwargs)}: {exc}",
            "accept in_features and out_features (and cardinalities with categorical data)",
        ) from None
    if not isinstance(model, nn.Module):
        raise DanluError(f"model.target '{config.target}' is not a torch.nn.Module", "subclass nn.Module")
    return model
