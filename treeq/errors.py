"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations

import pydantic


class TreeqError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback."""


def from_validation(err: pydantic.ValidationError) -> TreeqError:
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "value_error":
            # A validator's own message already names the field and the value; its input is the
            # whole model's dict, which would bury the line.
            message = e["msg"].removeprefix("Value error, ")
            parts.append(f"{field}: {message}" if e["loc"] else message)
        else:
            parts.append(f"{field}: {e['msg']} (got {e.get('input')!r})")
    return TreeqError("invalid quantization settings: " + "; ".join(parts))


def parse_settings(model: type[pydantic.BaseModel] | None, values: dict, field: str, owner: str):
    """``values`` validated by ``model`` (None: ``owner`` takes no settings); a ValueError naming
    ``field.<key>`` and what is allowed otherwise. Methods and migrations check their options here."""
    if model is None:
        if values:
            raise ValueError(f"{field}: {owner} takes no options (got {sorted(values)})")
        return None
    try:
        return model(**values)
    except pydantic.ValidationError as e:
        parts = [
            f"{field}.{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})" for err in e.errors()
        ]
        raise ValueError("; ".join(parts)) from None
