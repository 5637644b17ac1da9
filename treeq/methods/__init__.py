"""Quantization methods, one file each; each file defines ``METHOD``, a :class:`Method` subclass."""

from __future__ import annotations

from ..registry import discover
from .base import InputStats, Method, QuantResult, output_error

METHODS = {m.name: m for m in discover(__name__, __path__, "METHOD")}


def make_method(config, scheme=None) -> Method:
    """The config's method, for modules of weight ``scheme`` (default: the config's own)."""
    return METHODS[config.method](config, scheme)


__all__ = ["METHODS", "InputStats", "Method", "QuantResult", "make_method", "output_error"]
