"""Quantization methods, one file each; each file defines ``METHOD``, a :class:`Method` subclass."""

from __future__ import annotations

import importlib
import pkgutil

from .base import InputStats, Method, QuantResult, output_error


def _discover() -> dict[str, type[Method]]:
    found: dict[str, type[Method]] = {}
    for info in pkgutil.iter_modules(__path__):
        cls = getattr(importlib.import_module(f"{__name__}.{info.name}"), "METHOD", None)
        if cls is not None:
            found[cls.name] = cls
    return found


METHODS = _discover()


def make_method(config) -> Method:
    return METHODS[config.method](config)


__all__ = ["METHODS", "InputStats", "Method", "QuantResult", "make_method", "output_error"]
