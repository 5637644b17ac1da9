"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations

import pydantic


class TreeqError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback."""


def from_validation(err: pydantic.ValidationError) -> TreeqError:
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        parts.append(f"{field}: {e['msg']} (got {e.get('input')!r})")
    return TreeqError("invalid quantization settings: " + "; ".join(parts))
