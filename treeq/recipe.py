"""Recipes: every setting of a quantization run in one YAML (or JSON) file, the same nested fields
as :class:`treeq.QuantConfig` (``method``, ``weights``, ``overrides``, ``calibration``,
``checkpoint``, ``options``...). ``treeq quantize --config recipe.yaml`` reads one; every output
directory holds the recipe that made it, so ``--config DIR/recipe.yaml`` repeats the run."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .config import QuantConfig
from .errors import TreeqError

RECIPE_NAME = "recipe.yaml"


def read_recipe(path: str | Path) -> dict:
    """The settings a recipe file holds, as QuantConfig keyword arguments."""
    path = Path(path)
    if not path.is_file():
        raise TreeqError(f"recipe {path} does not exist; give a YAML or JSON file of QuantConfig settings")
    try:
        data = yaml.safe_load(path.read_text())  # JSON is YAML too
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise TreeqError(f"recipe {path} is not valid YAML{line}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise TreeqError(f"recipe {path} must be a mapping of settings (method: gptq, weights: {{bits: 4}}, ...)")
    return data


def recipe_text(config: QuantConfig) -> str:
    """The whole config, every default spelled out, as a recipe file."""
    # Through JSON so tuples and other types become plain YAML lists and scalars.
    return yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False)


def merged(recipe: dict, given: dict) -> dict:
    """``given`` settings over a recipe's, section by section (a flag changes one field of
    ``weights``, not the whole section)."""
    out = dict(recipe)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out
