"""Routed experts as one linear per expert and projection, for calibration and for checkpoints.

transformers stores a layer's experts fused in 3-D parameters and runs them from routing indices
and weights. :class:`UnfusedExperts` keeps that forward contract (hidden [tokens, hidden], top-k
indices, top-k weights -> [tokens, hidden]) but holds nn.Linear modules per expert, so each expert
is quantized from the tokens routed to it and saved under its own keys, and it knows no
architecture: the spec's :class:`~treeq.models.spec.ExpertGroup` says where the fused tensors are.

Before each projection the experts' inputs pass, as one list, through an identity :class:`Tap`.
The looper records and pauses there, once per forward, whatever the routing: an expert that
received no tokens contributes an empty tensor and never stalls the lockstep batches.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from ..errors import TreeqError
from ..models.spec import EACH_EXPERT, ExpertGroup, Subset, TreeSpec


class Tap(nn.Module):
    """Identity over the list of per-expert inputs of one projection; hooks read it."""

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return inputs


class Expert(nn.Module):
    def __init__(self, names: tuple[str, str, str], gate: nn.Linear, up: nn.Linear, down: nn.Linear):
        super().__init__()
        self.names = names
        for name, linear in zip(names, (gate, up, down)):
            self.add_module(name, linear)

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return tuple(getattr(self, n) for n in self.names)


class UnfusedExperts(nn.Module):
    """Experts ``"0"``, ``"1"``... plus the fused module's gate function (it holds the activation).

    ``bypass`` (calibration only) runs every expert on every token, so each one's statistics see
    all of them, while the output still mixes only the routed experts with the router's weights.
    """

    def __init__(self, experts: list[Expert], gating: nn.Module):
        super().__init__()
        for i, expert in enumerate(experts):
            self.add_module(str(i), expert)
        self.count = len(experts)
        self.gating = gating  # the emptied fused module: its _apply_gate is the model's own act(gate) * up
        self.gate_up_tap = Tap()
        self.down_tap = Tap()
        self.bypass = False

    def experts(self) -> list[Expert]:
        return [getattr(self, str(i)) for i in range(self.count)]

    def tap_for(self, projection: str) -> Tap:
        return self.down_tap if projection == self.experts()[0].names[2] else self.gate_up_tap

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        routed = [torch.nonzero(top_k_index == e, as_tuple=True) for e in range(self.count)]  # (token, slot)
        inputs = [hidden if self.bypass else hidden[token] for token, _ in routed]
        inputs = self.gate_up_tap(inputs)
        experts = self.experts()
        inner = []
        for expert, x in zip(experts, inputs):
            gate, up, _ = expert.projections()
            inner.append(self.gating._apply_gate(torch.cat([gate(x), up(x)], dim=-1)) if len(x) else x[:, :0])
        inner = self.down_tap(inner)
        out = torch.zeros_like(hidden)
        for expert, h, (token, slot) in zip(experts, inner, routed):
            if len(token) == 0:
                continue
            y = expert.projections()[2](h)
            if self.bypass:
                y = y[token]
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return linear


def unfuse(fused: nn.Module, group: ExpertGroup) -> UnfusedExperts:
    """Per-expert linears viewing the fused tensors' slices (no copy); the fused module keeps only its gate."""
    gate_up, down = getattr(fused, group.gate_up), getattr(fused, group.down)
    inter = gate_up.shape[1] // 2
    experts = [
        Expert(group.names, _linear(gate_up[e, :inter]), _linear(gate_up[e, inter:]), _linear(down[e]))
        for e in range(gate_up.shape[0])
    ]
    delattr(fused, group.gate_up)
    delattr(fused, group.down)
    return UnfusedExperts(experts, fused)


def unfuse_experts(model: nn.Module, spec: TreeSpec) -> None:
    """Replace every layer's fused experts module with :class:`UnfusedExperts`; idempotent."""
    if spec.experts is None:
        return
    path = spec.experts.path
    parent_path, _, child = path.rpartition(".")
    for layer in model.get_submodule(spec.layers):
        module = _find(layer, path)
        if module is not None and not isinstance(module, UnfusedExperts):
            setattr(layer.get_submodule(parent_path) if parent_path else layer, child, unfuse(module, spec.experts))


def _find(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def expert_count(module: nn.Module, group: ExpertGroup) -> int | None:
    """Experts in a fused or unfused group module; None when it is neither."""
    if isinstance(module, UnfusedExperts):
        return module.count
    weight = getattr(module, group.gate_up, None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 3 else None


def present(layer: nn.Module, spec: TreeSpec, subset: Subset) -> bool:
    """Whether ``subset`` applies to ``layer``; only optional subsets may be absent."""
    if not subset.optional:
        return True
    where = spec.experts.path if subset.per_expert else subset.modules[0]
    return _find(layer, where) is not None


def module_groups(layer: nn.Module, spec: TreeSpec, subset: Subset) -> list[list[str]]:
    """The subset's module names in groups that share one input: a single group for a plain subset,
    one per expert (in expert order) for a per-expert one."""
    if not subset.per_expert:
        return [list(subset.modules)]
    count = expert_count(layer.get_submodule(spec.experts.path), spec.experts)
    return [[m.replace(f".{EACH_EXPERT}.", f".{e}.") for m in subset.modules] for e in range(count)]


def layer_modules(layer: nn.Module, spec: TreeSpec) -> list[str]:
    """Every module the spec quantizes in ``layer``, in spec order."""
    return [m for s in spec.subsets if present(layer, spec, s) for g in module_groups(layer, spec, s) for m in g]


def input_taps(layer: nn.Module, spec: TreeSpec, subset: Subset) -> list[nn.Module]:
    """Modules whose first call in a forward carries the subset's input."""
    if subset.per_expert:
        projection = subset.modules[0].rsplit(".", 1)[1]
        return [layer.get_submodule(spec.experts.path).tap_for(projection)]
    return [layer.get_submodule(m) for m in subset.modules]


def _routing_top_k(routing, count: int) -> int:
    if routing == "all":
        return count
    if routing > count:
        raise TreeqError(f"routing={routing} exceeds the {count} experts of a layer; use at most {count} or 'all'")
    return routing


@contextmanager
def calibration_routing(model: nn.Module, spec: TreeSpec, routing):
    """Route calibration tokens as ``routing`` says ("normal", "bypass", "all" or a top-k count),
    restoring the model's own routing afterwards. A top-k override changes the routing itself
    (outputs mix that many experts); bypass only widens what each expert's statistics see."""
    if spec.experts is None or routing == "normal":
        yield
        return
    undo = []
    for layer in model.get_submodule(spec.layers):
        experts = _find(layer, spec.experts.path)
        if not isinstance(experts, UnfusedExperts):
            continue
        if routing == "bypass":
            experts.bypass = True
            undo.append((experts, "bypass", False))
        else:
            router = layer.get_submodule(spec.experts.router)
            undo.append((router, spec.experts.top_k, getattr(router, spec.experts.top_k)))
            setattr(router, spec.experts.top_k, _routing_top_k(routing, experts.count))
    try:
        yield
    finally:
        for obj, attr, value in undo:
            setattr(obj, attr, value)
