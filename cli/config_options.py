"""Click options derived from the settings models, so the command line never restates a default,
a choice or a help text that :mod:`treeq.config`, :mod:`treeq.schemes` or a method's ``Options``
already hold.

Every derived option defaults to "not given" (None): only what the user typed reaches
``QuantConfig``, whose own defaults and validation then apply, exactly as from Python.
"""

from __future__ import annotations

import json
import types
import typing

import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from treeq.errors import TreeqError


def _choices(annotation) -> list | None:
    """The allowed values of a Literal field (inside Optional too), else None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _choices(args[0])
    return None


def _base_type(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _base_type(args[0])
    return annotation


def _json_or_text(_ctx, _param, value):
    """Values of structured fields (tuples, unions) are read as JSON when they parse, else as text."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _takes_tuple(annotation) -> bool:
    """Whether a field (or a member of its union) holds a tuple or list."""
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        return True
    return origin is not None and any(_takes_tuple(a) for a in typing.get_args(annotation))


def _sequence(ctx, param, value):
    """A tuple field's value as typed on a command line: ``1,1`` or ``[1, 1]``, and one number
    alone (``--lkd-layers 3``) as a tuple of one; text that is neither (``all``) stays text."""
    parsed = _json_or_text(ctx, param, value)
    if isinstance(parsed, str) and "," in parsed:
        return [_json_or_text(ctx, param, part.strip()) for part in parsed.split(",")]
    if isinstance(parsed, int | float) and not isinstance(parsed, bool):
        return [parsed]
    return parsed


def _default_text(info: FieldInfo) -> str:
    default = info.get_default(call_default_factory=True)
    return "" if default is None else f" [default: {default}]"


def option_for(name: str, info: FieldInfo, owner: str, prefix: str = ""):
    """A click.option decorator for one field, spelled ``--{prefix}{name}``; the field may name its
    own spelling (``json_schema_extra={"cli": "--sym/--asym"}``)."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    flag = "--" + prefix + name.replace("_", "-")
    attrs: dict = dict(default=None, help=(info.description or "") + _default_text(info))
    choices, base = _choices(info.annotation), _base_type(info.annotation)
    if base is bool:
        flag = f"{flag}/--no-{flag[2:]}"
    elif choices is not None and all(isinstance(c, int) for c in choices):
        attrs.update(type=click.Choice([str(c) for c in choices]), callback=lambda _c, _p, v: v and int(v))
    elif choices is not None:
        attrs.update(type=click.Choice(choices))
    elif base in (int, float, str):
        attrs.update(type=base)
    elif _takes_tuple(info.annotation):
        attrs.update(callback=_sequence, help=attrs["help"] + " (comma-separated, or JSON)")
    else:
        attrs.update(callback=_json_or_text, help=attrs["help"] + " (JSON)")
    return click.option(extra.get("cli", flag), f"{owner}__{name}", **attrs)


def derived_options(models: dict[str, list[type[BaseModel]]], skip: tuple[str, ...] = (), prefix: str = ""):
    """A decorator adding one option per field of each model, keyed by where the value goes (the
    QuantConfig field holding the model, or "options"); a name two models share (an option
    several methods have) is one option. ``prefix`` (``"kv-"``) keeps a model's options apart from
    same-named ones of another (``--kv-group-size`` vs the weights' ``--group-size``)."""
    decorators: dict[str, object] = {}
    for owner, owned in models.items():
        for model in owned:
            for name, info in model.model_fields.items():
                if name not in skip and name not in decorators:
                    decorators[name] = option_for(name, info, owner, prefix)

    def decorate(fn):
        for add in reversed(list(decorators.values())):
            fn = add(fn)
        return fn

    return decorate


def settings_from(kwargs: dict) -> dict:
    """The derived options the user gave, as QuantConfig keyword arguments: nested per model, and
    method options under ``options``. Removes them from ``kwargs``."""
    nested: dict[str, dict] = {}
    for key in [k for k in kwargs if "__" in k]:
        value = kwargs.pop(key)
        owner, field = key.split("__", 1)
        if value is not None:
            nested.setdefault(owner, {})[field] = value
    return nested


def parse_key_values(pairs: tuple[str, ...]) -> dict:
    """``KEY=VALUE`` strings to a dict; values are read as JSON when they parse, else as text."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TreeqError(f"--option {pair!r} is not KEY=VALUE; e.g. --option krot=8")
        out[key] = _json_or_text(None, None, value)
    return out
