"""The user's own nn.Module, named as "package.module:ClassName" in model.target.

Each family says what it is built with and what its forward receives (tabular:
`ClassName(in_features=..., out_features=..., [cardinalities=...], **model.kwargs)`, forward(x_num[, x_cat])).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator

from torch import nn

from danlu.config import ModelConfig
from danlu.errors import DanluError


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


def build_custom(config: ModelConfig, **inputs) -> nn.Module:
    """The user's class built with what the family gives (e.g. in_features, out_features) and
    model.kwargs; a wrong signature is one line naming the arguments."""
    cls = import_class(config.target)
    kwargs = {**inputs, **config.kwargs}
    try:
        model = cls(**kwargs)
    except TypeError as exc:
        raise DanluError(
            f"model.target '{config.target}' cannot be built with {sorted(kwargs)}: {exc}",
            f"accept {', '.join(sorted(inputs))} (see the README for your data's family)",
        ) from None
    if not isinstance(model, nn.Module):
        raise DanluError(f"model.target '{config.target}' is not a torch.nn.Module", "subclass nn.Module")
    return model
