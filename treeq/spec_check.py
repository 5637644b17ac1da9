"""Whether a tree spec describes a model exactly: every module it names exists and is a Linear, and
every Linear of each decoder layer is in exactly one subset (or kept in full precision on purpose).
"""

from __future__ import annotations

import torch.nn as nn

from .engine import experts as _experts
from .errors import TreeqError
from .models.spec import EACH_EXPERT, TreeSpec


def _has(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _layer_problems(layer: nn.Module, spec: TreeSpec, prefix: str) -> list[str]:
    problems = []
    declared = set(spec.keep_fp)
    for s in spec.subsets:
        if not _experts.present(layer, spec, s):
            continue
        if s.per_expert:
            group = layer.get_submodule(spec.experts.path)
            if _experts.expert_count(group, spec.experts) is None:
                problems.append(f"{prefix}.{spec.experts.path} holds no 3-D {spec.experts.gate_up!r} experts tensor")
                continue
            if not isinstance(group, _experts.UnfusedExperts):
                continue  # fused: its per-expert linears appear when unfused for calibration
        for path in (m for g in _experts.module_groups(layer, spec, s) for m in g):
            declared.add(path)
            if not _has(layer, path):
                problems.append(f"missing module '{prefix}.{path}' named by the spec")
            elif not isinstance(layer.get_submodule(path), nn.Linear):
                problems.append(f"{prefix}.{path} is {type(layer.get_submodule(path)).__name__}, not nn.Linear")
        if EACH_EXPERT not in s.fed_by.split(".") and not _has(layer, s.fed_by):
            problems.append(f"missing module '{prefix}.{s.fed_by}' named as fed_by of subset {s.name!r}")
    problems += _attention_problems(layer, spec, prefix)
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear) and name not in declared:
            problems.append(f"Linear {prefix}.{name} is not covered by any subset of the spec")
    return problems


def _attention_problems(layer: nn.Module, spec: TreeSpec, prefix: str) -> list[str]:
    block = spec.attention
    if block is None:
        return []
    if not _has(layer, block.path):
        return [f"missing attention block '{prefix}.{block.path}' named by the spec"]
    projections = [p for p in (block.k_proj, block.v_proj) if p is not None]
    return [
        f"missing module '{prefix}.{block.path}.{p}' named as the attention's k/v projection"
        for p in projections
        if not _has(layer, f"{block.path}.{p}")
    ]


def _model_problems(model: nn.Module, spec: TreeSpec) -> list[str]:
    paths = (spec.layers, *spec.before, *spec.after)
    problems = [f"missing module {p!r}" for p in paths if not _has(model, p)]
    block = spec.attention
    if block is not None:
        if block.rotary is not None and not _has(model, block.rotary):
            problems.append(f"missing rotary module {block.rotary!r} named by the attention block")
        config = getattr(model, "config", None)
        for attr in (block.num_heads, block.num_kv_heads, block.head_dim):
            if config is not None and getattr(config, attr, None) is None:
                problems.append(f"the model config has no {attr!r}, named by the attention block")
    return problems


def spec_problems(model: nn.Module, spec: TreeSpec) -> list[str]:
    """Everything that keeps ``spec`` from describing ``model`` exactly; empty when it fits."""
    problems = _model_problems(model, spec)
    if problems:
        return problems
    for i, layer in enumerate(model.get_submodule(spec.layers)):
        problems += _layer_problems(layer, spec, f"{spec.layers}.{i}")
    return problems


def check_spec(model: nn.Module, spec: TreeSpec) -> None:
    problems = spec_problems(model, spec)
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise TreeqError(f"spec for {spec.model_types[0]} does not fit the model: {shown}")
