"""KVQuant's offline calibration: per-channel key ranges and per-layer non-uniform levels.

:func:`collect_kv_activations` runs calibration batches through the model with a recording cache
and backpropagates the language-model loss, keeping each layer's keys (after RoPE and, undone with
the spec's rotary module, before it), values, and the gradient of the loss with respect to each.
:func:`calibrate_kv` turns them into a :class:`KVCalibration` for one scheme, which
:func:`treeq.runtime.kv_schemes.kv_cache_for` consumes:

* per-channel key ranges: per kv head and channel, the calibration keys' min and max, or with
  outliers the share/2 and 1 - share/2 quantiles, so that share of entries falls outside;
* non-uniform levels, one table for keys and one for values per layer: 1-D k-means on the
  calibration entries normalized as the cache normalizes them (outliers left out), each entry
  weighted by its **Fisher information**, the squared gradient of the loss with respect to it (the
  sensitivity KVQuant uses), started from the uniform levels. Pre-RoPE keys' gradients are the
  post-RoPE ones rotated back (RoPE is orthogonal).

The first ``sink_tokens`` positions of each sequence are left out, as the cache keeps them in
full precision. Collecting once serves every scheme (the bench calibrates its ablation rows from
one collection).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .. import data
from ..errors import TreeqError
from ..models import spec_for
from ..schemes import KVCacheScheme
from ..user_input import tokens_fit
from .kv_cache import FULL_PRECISION, key_rotation
from .kvquant import ChannelRange, KVQuantKV, check_packable_heads, uniform_levels

SENSITIVITY = "Fisher information: each entry's squared gradient of the LM loss"
KMEANS_ITERATIONS = 40


@dataclass
class LayerActivations:
    """One layer's calibration states [sequences, kv_heads, tokens, head_dim] fp32 and their gradients."""

    keys: torch.Tensor
    pre_rope_keys: torch.Tensor | None
    values: torch.Tensor
    key_grads: torch.Tensor
    pre_rope_key_grads: torch.Tensor | None
    value_grads: torch.Tensor


@dataclass
class LayerCalibration:
    keys: ChannelRange | None  # None: keys per token (or kept in 16 bits)
    key_levels: torch.Tensor | None  # None where that half is kept in 16 bits
    value_levels: torch.Tensor | None


@dataclass
class KVCalibration:
    """What a KVQuant cache needs from calibration, per layer, and the scheme it was made for."""

    scheme: KVCacheScheme
    layers: list[LayerCalibration]
    sensitivity: str = SENSITIVITY


class _Recorder(DynamicLayer):
    """Hands keys and values back unchanged and keeps them, their gradients retained."""

    def update(self, key_states, value_states, *args, **kwargs):
        key_states.retain_grad()
        value_states.retain_grad()
        self.seen = (key_states, value_states)
        return key_states, value_states


def collect_kv_activations(model, batches: list[torch.Tensor]) -> list[LayerActivations]:
    """Each layer's keys, values and loss gradients over ``batches`` (token ids [n, seqlen])."""
    config = model.config.get_text_config()
    spec = spec_for(model.config)
    rotation = key_rotation(model, spec) if spec.attention is not None and spec.attention.rotary else None
    per_layer: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in range(config.num_hidden_layers)]
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # gradients of the activations only
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for ids in batches:
                ids = ids.to(device)
                cache = Cache(layers=[_Recorder() for _ in range(config.num_hidden_layers)])
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
                model(inputs_embeds=embeds, cache=cache, use_cache=True, labels=ids).loss.backward()
                for layer, recorder in zip(per_layer, cache.layers):
                    k, v = recorder.seen
                    layer.append((k.detach().float(), k.grad.float(), v.detach().float(), v.grad.float()))
    finally:
        for p in trainable:
            p.requires_grad_(True)
    out = []
    for layer in per_layer:
        keys, key_grads, values, value_grads = (torch.cat(t) for t in zip(*layer))
        pre, pre_grads = (None, None) if rotation is None else (rotation.unrotate(t, 0) for t in (keys, key_grads))
        out.append(LayerActivations(keys, pre, values, key_grads, pre_grads, value_grads))
    return out


def weighted_kmeans(
    x: torch.Tensor, weights: torch.Tensor, k: int, iterations: int = KMEANS_ITERATIONS
) -> torch.Tensor:
    """k ascending centroids in [-1, 1] of the 1-D points ``x`` minimizing sum(w (x - c)^2), Lloyd's
    iterations from the evenly spaced levels (each lowers the objective, so the result is no worse
    than uniform levels); a centroid that loses all its points stays where it was."""
    centroids = torch.linspace(-1, 1, k)
    for _ in range(iterations):
        nearest = torch.bucketize(x, (centroids[1:] + centroids[:-1]) / 2)
        mass = torch.zeros(k).index_add_(0, nearest, weights)
        moment = torch.zeros(k).index_add_(0, nearest, weights * x)
        centroids = torch.where(mass > 0, moment / mass.clamp(min=torch.finfo(torch.float32).tiny), centroids)
        centroids = centroids.sort().values
    return centroids


def _channel_range(keys: torch.Tensor, share: float) -> ChannelRange:
    """Per kv head and channel over every sequence and token: min/max, or the share's quantiles."""
    per_channel = keys.transpose(0, 1).flatten(1, 2)  # [heads, entries, head_dim]
    ordered = per_channel.sort(dim=1).values
    last = ordered.shape[1] - 1
    lo, hi = ordered[:, round(share / 2 * last)], ordered[:, round((1 - share / 2) * last)]
    return ChannelRange((hi + lo) / 2, ((hi - lo) / 2).clamp(min=torch.finfo(torch.float32).tiny))


def _levels(quantizer: KVQuantKV, states: torch.Tensor, grads: torch.Tensor, scheme: KVCacheScheme) -> torch.Tensor:
    """The levels ``quantizer`` (built on uniform levels) should use for these states."""
    if scheme.levels == "uniform":
        return quantizer.levels
    normalized, kept = quantizer.normalized(states)
    return weighted_kmeans(normalized[kept], grads[kept].square(), quantizer.levels.numel())


def calibrate_layer(acts: LayerActivations, scheme: KVCacheScheme) -> LayerCalibration:
    sink, share = scheme.sink_tokens, scheme.outliers
    if scheme.pre_rope_keys and acts.pre_rope_keys is None:
        raise TreeqError("pre_rope_keys=True but the model's spec names no rotary module; set pre_rope_keys=False")
    pre = scheme.pre_rope_keys
    keys, key_grads = (acts.pre_rope_keys, acts.pre_rope_key_grads) if pre else (acts.keys, acts.key_grads)
    keys, key_grads, values, value_grads = (t[:, :, sink:] for t in (keys, key_grads, acts.values, acts.value_grads))
    channels, key_levels, value_levels = None, None, None
    head_dim = keys.shape[-1]
    if scheme.key_bits != FULL_PRECISION:
        per_channel = scheme.key_granularity == "per-channel"
        group = None if per_channel else scheme.group_size
        check_packable_heads(scheme.key_bits, head_dim, group)
        channels = _channel_range(keys, share) if per_channel else None
        quantizer = KVQuantKV(scheme.key_bits, uniform_levels(scheme.key_bits), group, channels, share)
        key_levels = _levels(quantizer, keys, key_grads, scheme)
    if scheme.value_bits != FULL_PRECISION:
        check_packable_heads(scheme.value_bits, head_dim, scheme.group_size)
        quantizer = KVQuantKV(scheme.value_bits, uniform_levels(scheme.value_bits), scheme.group_size, None, share)
        value_levels = _levels(quantizer, values, value_grads, scheme)
    return LayerCalibration(channels, key_levels, value_levels)


def calibrate_kv(activations: list[LayerActivations], scheme: KVCacheScheme) -> KVCalibration:
    """The calibration a ``kvquant`` scheme's cache needs, from :func:`collect_kv_activations`."""
    if scheme.method != "kvquant":
        raise TreeqError(f"method {scheme.method!r} takes no calibration; only kvquant does")
    return KVCalibration(scheme, [calibrate_layer(acts, scheme) for acts in activations])


# What `treeq eval` and `treeq generate` calibrate on when a scheme needs it: KVQuant's paper uses
# 16 sequences; 512 tokens each keeps the backward pass of a small model within a minute on a CPU.
CALIBRATION_SAMPLES, CALIBRATION_SEQLEN = 16, 512


def needs_calibration(scheme: KVCacheScheme) -> bool:
    """KVQuant's per-channel key ranges and non-uniform levels come from calibration text."""
    return scheme.method == "kvquant" and (scheme.key_granularity == "per-channel" or scheme.levels == "nonuniform")


def calibration_windows(tokenizer, text: str = "wiki-train") -> list[torch.Tensor]:
    """16 windows of 512 tokens of ``text`` (a built-in name or a file), one per batch."""
    return data.calibration_batches(tokenizer, data.read_text(text), CALIBRATION_SAMPLES, CALIBRATION_SEQLEN, 1)


def calibrate_on_text(model, tokenizer, scheme: KVCacheScheme, text: str = "wiki-train") -> KVCalibration | None:
    """:func:`calibrate_kv` on :func:`calibration_windows` of ``text``; None for a scheme that needs
    no calibration."""
    if not needs_calibration(scheme):
        return None
    windows = calibration_windows(tokenizer, text)
    tokens_fit(model, windows)
    return calibrate_kv(collect_kv_activations(model, windows), scheme)
