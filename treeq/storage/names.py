"""Checkpoint tensor names: those of the architecture's original checkpoints, not transformers 5's.

transformers 5 renames some modules on load (its conversion_mapping.py: Mixtral's
``block_sparse_moe.experts.{i}.w1`` becomes ``mlp.experts`` fused), and its own save_pretrained
writes the original names back; GPTQModel and vLLM look only for those. treeq quantizes under the
in-memory names, so the writer renames by the spec's ``checkpoint_names`` and the loader undoes it.
Undoing leaves names without a stored form alone, so checkpoints written before (in-memory names)
still load.

GPTQModel's ``dynamic`` patterns are matched against the stored names too (by treeq's loader and
``inspect`` as by the others), so the writer makes them hold there (:func:`upstream_dynamic`).
"""

from __future__ import annotations

import re

import torch

from ..models.spec import EACH_EXPERT, TreeSpec


def _renamed(name: str, layers: str, pairs) -> str:
    """``name`` with the first of ``pairs`` (from-path, to-path; relative to a decoder layer) that
    leads it replaced; ``*`` segments carry the expert index across."""
    head = f"{layers}."
    if not name.startswith(head):
        return name
    index, *rest = name[len(head) :].split(".")
    for source, target in pairs:
        want = source.split(".")
        got = rest[: len(want)]
        if len(got) < len(want) or any(w != g and not (w == EACH_EXPERT and g.isdigit()) for w, g in zip(want, got)):
            continue
        experts = iter(g for w, g in zip(want, got) if w == EACH_EXPERT)
        new = [next(experts) if t == EACH_EXPERT else t for t in target.split(".")]
        return head + ".".join([index, *new, *rest[len(want) :]])
    return name


def upstream_name(spec: TreeSpec, name: str) -> str:
    """A module or tensor name as the architecture's original checkpoints spell it."""
    return _renamed(name, spec.layers, spec.checkpoint_names)


def runtime_name(spec: TreeSpec, name: str) -> str:
    """A stored module or tensor name as transformers 5 names it in memory."""
    return _renamed(name, spec.layers, [(stored, memory) for memory, stored in spec.checkpoint_names])


def upstream_state(tensors: dict[str, torch.Tensor], spec: TreeSpec) -> dict[str, torch.Tensor]:
    return {upstream_name(spec, k): v for k, v in tensors.items()}


def runtime_state(state: dict[str, torch.Tensor], spec: TreeSpec) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state under in-memory names, and each in-memory key's stored one."""
    stored = {runtime_name(spec, k): k for k in state}
    return {k: state[s] for k, s in stored.items()}, stored


def first_entry(dynamic: dict, name: str) -> str | None:
    """The first key of GPTQModel's ``dynamic`` whose pattern (after its "-:"/"+:" sign) re.match-es
    ``name``, as GPTQModel and vLLM pick it; None if none does."""
    for key in dynamic:
        if re.match(key.removeprefix("-:").removeprefix("+:"), name):
            return key
    return None


def upstream_dynamic(dynamic: dict, spec: TreeSpec, modules) -> dict:
    """``dynamic``, whose patterns were written against the in-memory names of ``modules``, made to
    pick the same entry for their stored names: each renamed module whose stored name another entry
    (or none) would catch gets an exact entry ahead of the patterns."""
    exact = {}
    for name in modules:
        stored, meant = upstream_name(spec, name), first_entry(dynamic, name)
        if stored != name and first_entry(dynamic, stored) != meant:
            sign = "+:" if meant is None else meant[:2]
            exact[f"{sign}{re.escape(stored)}$"] = {} if meant is None else dynamic[meant]
    return {**exact, **dynamic}
