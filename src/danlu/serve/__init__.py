"""Serving: one shell (shell.py: the key, limits, probes, metrics, page, lifespan and drain) and a handler
per kind (app.py: a run's predictions; chat/: a language model's chat completions).

The package is callable: `danlu.serve(source, ...)` is `danlu.serve.start.serve`, which picks the server for
the source, checks its settings (settings.py) before anything heavy is imported, and runs it."""

import sys
import types


class _Callable(types.ModuleType):
    def __call__(self, source, **options):
        from danlu.serve.start import serve

        return serve(source, **options)


sys.modules[__name__].__class__ = _Callable
