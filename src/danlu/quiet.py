"""Keep the exporters' and quantizers' own warnings and log lines off the user's screen."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporter's and quantizer's warnings and log lines about their own internals."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = logging.root.manager.disable  # the caller's own logging.disable level, restored after
        logging.disable(max(before, logging.WARNING))
        try:
            yield
        finally:
            logging.disable(before)
