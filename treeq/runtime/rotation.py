"""Pairwise (Givens) rotations inside groups of input channels: the one home of their math.

A rotation is ``krot`` layers; each layer turns ``g/2`` disjoint channel pairs of every group of
``g`` channels by its own angle. Pairs are stored as int16 ``[krot, in_features]``: within each
group, entries ``2t, 2t+1`` are the group-local channels (i, j) of pair t. Angles are
``[krot, in_features / 2]`` in the same pair order. One pair turns as

    x_i' =  x_i cos(a) + x_j sin(a)
    x_j' = -x_i sin(a) + x_j cos(a)

so the inverse applies the layers in reverse order with negated angles. Each layer is one gather
of the whole row into [all i | all j] order, so autograd gives exact angle gradients and no
Python loop runs per pair.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import torch


def round_robin_pairs(group_size: int, krot: int) -> torch.Tensor:
    """Rounds of a round-robin tournament (circle method): every round pairs each channel once and
    no pair repeats across rounds, for up to g - 1 layers, with no search. Returns [krot, g] int16."""
    if krot > group_size - 1:
        raise ValueError(f"krot={krot} exceeds the {group_size - 1} distinct rounds of a group of {group_size}")
    n = group_size - 1
    layers = []
    for r in range(krot):
        pairs = [(r, n)] + [((r + k) % n, (r - k) % n) for k in range(1, group_size // 2)]
        layers.append([c for p in pairs for c in p])
    return torch.tensor(layers, dtype=torch.int16)


def _greedy_layers(shuffled: list[tuple[int, int]], group_size: int, krot: int) -> list[list[int]]:
    used: set[tuple[int, int]] = set()
    layers = []
    for _ in range(krot):
        busy: set[int] = set()
        chosen: list[int] = []
        for i, j in shuffled:
            if len(chosen) == group_size:
                break
            if i in busy or j in busy or (i, j) in used:
                continue
            chosen += [i, j]
            busy.update((i, j))
            used.add((i, j))
        # When the greedy pass strands channels, they pair up with each other; the pair's angle is
        # kept at zero (see ``frozen_pairs``) so they add no rotation, as in the reference method.
        free = [c for c in range(group_size) if c not in busy]
        layers.append(chosen + [-1 - c for c in free])
    return layers


@functools.lru_cache(maxsize=16)
def random_greedy_pairs(in_features: int, group_size: int, krot: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference schedule: per group, shuffle all pairs with a seeded RNG and greedily take
    disjoint ones per layer, never reusing a pair. Returns pairs [krot, in] int16 and a bool mask
    [krot, in / 2] of padding pairs whose angle must stay 0."""
    rng = random.Random(seed)
    all_pairs = [(i, j) for i in range(group_size) for j in range(i + 1, group_size)]
    groups = []
    for _ in range(in_features // group_size):
        shuffled = list(all_pairs)
        rng.shuffle(shuffled)
        groups.append(_greedy_layers(shuffled, group_size, krot))
    raw = torch.tensor(groups, dtype=torch.int64).permute(1, 0, 2).reshape(krot, -1)  # [krot, in]
    frozen = (raw < 0).reshape(krot, -1, 2).any(-1)
    return torch.where(raw < 0, -1 - raw, raw).to(torch.int16), frozen


def schedule(kind: str, in_features: int, group_size: int, krot: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs [krot, in] int16 and the mask of pairs whose angle is pinned at 0."""
    if kind == "random":
        return random_greedy_pairs(in_features, group_size, krot, seed)
    per_group = round_robin_pairs(group_size, krot)
    pairs = per_group.repeat(1, in_features // group_size)
    return pairs, torch.zeros(krot, in_features // 2, dtype=torch.bool)


@dataclass(frozen=True)
class GatherPlan:
    """Index vectors for applying the layers as gathers: ``steps[k]`` takes the row after layer
    k-1 (in [i | j] order of layer k-1, or the original order for k = 0) to layer k's [i | j]
    order; ``final`` restores the channel order."""

    steps: tuple[torch.Tensor, ...]
    final: torch.Tensor


def _plan(pairs: torch.Tensor, group_size: int) -> GatherPlan:
    krot, n = pairs.shape
    offsets = torch.arange(n // group_size, device=pairs.device).repeat_interleave(group_size // 2) * group_size
    local = pairs.long().reshape(krot, -1, 2)
    orders = [torch.cat([local[r, :, 0] + offsets, local[r, :, 1] + offsets]) for r in range(krot)]
    steps, previous_inverse = [], None
    for order in orders:
        steps.append(order if previous_inverse is None else previous_inverse[order])
        previous_inverse = torch.argsort(order)
    return GatherPlan(tuple(steps), previous_inverse)


_plans: dict[tuple, GatherPlan] = {}


def plan_for(pairs: torch.Tensor, group_size: int) -> GatherPlan:
    # Keyed by content: every module of a shape shares one schedule, so one plan serves them all.
    key = (pairs.device, group_size, pairs.shape, pairs.cpu().numpy().tobytes())
    if key not in _plans:
        _plans[key] = _plan(pairs, group_size)
    return _plans[key]


def rotate(
    x: torch.Tensor, pairs: torch.Tensor, theta: torch.Tensor, group_size: int, inverse: bool = False
) -> torch.Tensor:
    """Apply the rotation (or its inverse) along the last dimension of ``x``; differentiable in
    ``x`` and ``theta``."""
    if pairs.shape[0] == 0:
        return x
    if inverse:
        return rotate(x, pairs.flip(0), -theta.flip(0), group_size)
    plan = plan_for(pairs, group_size)
    half = x.shape[-1] // 2
    cos, sin = torch.cos(theta).to(x.dtype), torch.sin(theta).to(x.dtype)
    for r, step in enumerate(plan.steps):
        y = x.index_select(-1, step)
        a, b = y[..., :half], y[..., half:]
        x = torch.cat([a * cos[r] + b * sin[r], b * cos[r] - a * sin[r]], dim=-1)
    return x.index_select(-1, plan.final)


def group_matrices(pairs: torch.Tensor, theta: torch.Tensor, group_size: int) -> torch.Tensor:
    """The rotation as dense per-group matrices M [groups, g, g], rotate(x)_group = M @ x_group.

    Built by rotating the identity (row k holds e_k in every group at once), so it costs krot
    passes over a [g, in] tensor; applying it to a [rows, in] matrix is then one batched matmul,
    far cheaper than krot gather passes when rows >> g (a weight matrix)."""
    n = pairs.shape[1]
    basis = torch.eye(group_size, dtype=theta.dtype, device=theta.device).repeat(1, n // group_size)
    return rotate(basis, pairs, theta, group_size).reshape(group_size, -1, group_size).permute(1, 2, 0)


def apply_group_matrices(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """rotate(x) along the last dimension of ``x`` [rows, in], given :func:`group_matrices`."""
    groups, g, _ = matrices.shape
    return torch.einsum("rgk,gjk->rgj", x.reshape(-1, groups, g), matrices).reshape(x.shape)
