"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations

import typing

import pydantic


class TreeqError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback."""


def from_validation(err: pydantic.ValidationError, model: type[pydantic.BaseModel] | None = None) -> TreeqError:
    """One line for every failure of ``err``; ``model``, the class validated, lets an unknown
    setting's message list the known ones."""
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            parts.append(_unknown_setting(field, model, e))
        elif e["type"] == "value_error":
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
        parts = []
        for err in e.errors():
            where = f"{field}.{'.'.join(map(str, err['loc']))}"
            if err["type"] == "extra_forbidden":
                parts.append(_unknown_setting(where, model, err))
            else:
                parts.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
        raise ValueError("; ".join(parts)) from None


def _unknown_setting(field: str, model: type[pydantic.BaseModel] | None, err: dict) -> str:
    """``field`` is no setting of its model: say which are (where ``model``, the class validated,
    leads to it)."""
    known = _settings_at(model, err["loc"][:-1]) if model is not None else None
    allowed = f"; the settings there are {', '.join(known)}" if known else ""
    return f"{field}: no such setting{allowed} (got {err.get('input')!r})"


def _settings_at(model: type[pydantic.BaseModel] | None, loc: tuple) -> list[str] | None:
    """The setting names of the model at ``loc`` under ``model`` (list indices skipped), or None."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model is not None else None
        model = _model_in(field.annotation) if field is not None else None
    return sorted(model.model_fields) if model is not None else None


def _model_in(annotation) -> type[pydantic.BaseModel] | None:
    """The pydantic model an annotation holds (itself, or within Optional, a union or a tuple)."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None
