"""Tree specs: where each architecture's specs come from, and which one a model gets.

Three sources, later ones winning for the same ``model_type``:
* the files of this package, each defining ``SPEC`` (the built-in architectures);
* installed plug-in packages, through the entry-point group ``treeq.specs`` (each entry a TreeSpec,
  or a module defining ``SPEC``);
* the user's own, at run time: :func:`register_spec` from Python, or a file given to ``--spec``
  (:func:`load_spec_file`), so adding an architecture never means editing the installed package.
"""

from __future__ import annotations

import importlib.util
import logging
from importlib.metadata import entry_points
from pathlib import Path

from ..errors import TreeqError
from ..registry import discover
from .spec import AttentionBlock, ExpertGroup, Subset, TreeSpec

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "treeq.specs"
HOW_TO_ADD = (
    "write a TreeSpec (see treeq/models/llama.py) in a file defining SPEC and pass it with --spec FILE, "
    "or call treeq.register_spec(spec)"
)

SPECS: dict[str, TreeSpec] = {}


def register_spec(spec: TreeSpec) -> TreeSpec:
    """Make ``spec`` the one used for each of its ``model_types`` (replacing any registered before)."""
    if not isinstance(spec, TreeSpec):
        raise TreeqError(f"register_spec takes a treeq TreeSpec, not {type(spec).__name__}")
    for model_type in spec.model_types:
        SPECS[model_type] = spec
    return spec


def _spec_of(value, where: str) -> TreeSpec:
    spec = getattr(value, "SPEC", value)
    if not isinstance(spec, TreeSpec):
        raise TreeqError(f"{where} defines no SPEC = TreeSpec(...); {HOW_TO_ADD}")
    return spec


def load_spec_file(path: str | Path) -> TreeSpec:
    """Import a Python file that defines ``SPEC`` and register that spec."""
    path = Path(path)
    if not path.is_file():
        raise TreeqError(f"spec file {path} does not exist; give a .py file defining SPEC = TreeSpec(...)")
    module_spec = importlib.util.spec_from_file_location(f"treeq_user_spec_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise TreeqError(f"spec file {path} is not an importable Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a user's file: whatever it raises is reported in one line
        raise TreeqError(f"spec file {path} failed to import: {type(e).__name__}: {e}") from None
    return register_spec(_spec_of(module, f"spec file {path}"))


def _load_plugins() -> None:
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register_spec(_spec_of(entry.load(), f"plug-in {entry.value!r}"))
        except Exception as e:  # one broken plug-in must not take the built-in architectures down
            log.warning("treeq spec plug-in %s (%s) not loaded: %s", entry.name, entry.value, e)


def spec_for(config) -> TreeSpec:
    model_type = getattr(config, "model_type", None)
    if model_type not in SPECS:
        raise TreeqError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(SPECS))}. To add one, {HOW_TO_ADD}"
        )
    return SPECS[model_type]


for _builtin in discover(__name__, __path__, "SPEC"):
    register_spec(_builtin)
_load_plugins()

__all__ = [
    "SPECS",
    "AttentionBlock",
    "ExpertGroup",
    "Subset",
    "TreeSpec",
    "load_spec_file",
    "register_spec",
    "spec_for",
]
