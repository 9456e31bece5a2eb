"""The application a worker serves: `MODULE:OBJECT` imported, and whether it speaks ASGI or WSGI."""

from __future__ import annotations

import importlib
import inspect


def load_app(spec: str):
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    obj = module
    for part in (attr or "application").split("."):
        obj = getattr(obj, part)
    return obj


def is_asgi(app) -> bool:
    call = app if inspect.isfunction(app) or inspect.ismethod(app) else getattr(app, "__call__", None)
    return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(app)
