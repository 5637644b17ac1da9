"""Plug-in discovery: every module of a package that defines ``attr`` contributes it."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def discover(package: str, path, attr: str) -> list[Any]:
    found = []
    for info in pkgutil.iter_modules(path):
        value = getattr(importlib.import_module(f"{package}.{info.name}"), attr, None)
        if value is not None:
            found.append(value)
    return found
