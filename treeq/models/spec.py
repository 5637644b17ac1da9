"""The declarative description of an architecture that the looper walks."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

EACH_EXPERT = "*"


class Subset(BaseModel):
    """Linears quantized together. They read the same input, produced by ``fed_by``.

    ``fed_by`` names the op (a norm or the previous linear) whose output is this subset's input,
    so scaling methods can fold per-channel scales into it.

    A module path with a ``*`` segment (``mlp.experts.*.gate_proj``) names that projection of every
    routed expert of the spec's :class:`ExpertGroup`; each expert's modules then share the input of
    the tokens routed to that expert, not one input for the whole subset.

    ``optional`` subsets apply to the layers that have their modules (MoE models mixing dense and
    sparse layers list both kinds of MLP).
    """

    model_config = ConfigDict(frozen=True)

    name: str
    modules: tuple[str, ...] = Field(min_length=1)
    fed_by: str
    optional: bool = False

    @property
    def per_expert(self) -> bool:
        return EACH_EXPERT in self.modules[0].split(".")


class ExpertGroup(BaseModel):
    """Routed experts that transformers stores fused as 3-D parameters in one module.

    ``gate_up`` is [experts, 2 * intermediate, hidden] with the gate rows first, ``down`` is
    [experts, hidden, intermediate]. For calibration and in checkpoints each expert becomes its
    own three linears, named ``names`` (gate, up, down) under ``<path>.<expert index>``.
    ``top_k`` is the router attribute holding how many experts each token is sent to.
    """

    model_config = ConfigDict(frozen=True)

    path: str = "mlp.experts"
    router: str = "mlp.gate"
    top_k: str = "top_k"
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def subsets(self, fed_by: str) -> tuple[Subset, Subset]:
        """The experts' two subsets in execution order: gate and up (fed by ``fed_by``), then down.
        Optional, so layers with a dense MLP instead skip them."""
        gate, up, down = (f"{self.path}.{EACH_EXPERT}.{n}" for n in self.names)
        return (
            Subset(name="experts.gate_up", modules=(gate, up), fed_by=fed_by, optional=True),
            Subset(name="experts.down", modules=(down,), fed_by=up, optional=True),
        )


class AttentionBlock(BaseModel):
    """Where a layer's attention is, for the parts that act on it rather than on its linears: a
    KV-cache quantizer (keys quantized before RoPE need the rotary module) and activation statistics
    of keys and values. Paths are relative to a decoder layer, except ``rotary`` (relative to the
    model); the head counts are attributes of the model's config."""

    model_config = ConfigDict(frozen=True)

    path: str = "self_attn"
    # None where keys and values are not one projection's output each (DeepSeek's latent attention).
    k_proj: str | None = "k_proj"
    v_proj: str | None = "v_proj"
    rotary: str | None = "model.rotary_emb"
    num_heads: str = "num_attention_heads"
    num_kv_heads: str = "num_key_value_heads"
    head_dim: str = "head_dim"


class TreeSpec(BaseModel):
    """Where a model's decoder layers are, what surrounds them, and each layer's subsets in order.

    ``keep_fp`` lists linears left in full precision on purpose (e.g. a one-output gate that no
    grid packs), so the spec check does not report them as uncovered.

    ``checkpoint_names`` pairs a module path as transformers 5 names it in memory with the path the
    architecture's original checkpoints use (transformers' own conversion_mapping.py renames the
    latter into the former on load), both relative to a decoder layer, ``*`` standing for an expert
    index; the first pair whose path leads a name applies. Checkpoints are written under the
    original names, which other engines (GPTQModel, vLLM) look for.
    """

    model_config = ConfigDict(frozen=True)

    model_types: tuple[str, ...] = Field(min_length=1)
    layers: str = "model.layers"
    before: tuple[str, ...] = ("model.embed_tokens", "model.rotary_emb")
    after: tuple[str, ...] = ("model.norm", "lm_head")
    subsets: tuple[Subset, ...] = Field(min_length=1)
    experts: ExpertGroup | None = None
    keep_fp: tuple[str, ...] = ()
    checkpoint_names: tuple[tuple[str, str], ...] = ()
    # Norms compute x_normed * (offset + weight); Gemma's use offset 1. Scale folding needs to know.
    norm_weight_offset: float = 0.0
    attention: AttentionBlock | None = AttentionBlock()

    @model_validator(mode="after")
    def _each_module_once(self) -> "TreeSpec":
        seen: set[str] = set()
        for s in self.subsets:
            for m in s.modules:
                if m in seen:
                    raise ValueError(f"module {m!r} appears in more than one subset")
                seen.add(m)
        return self

    @model_validator(mode="after")
    def _renames_keep_expert_indices(self) -> "TreeSpec":
        for memory, stored in self.checkpoint_names:
            if memory.split(".").count(EACH_EXPERT) != stored.split(".").count(EACH_EXPERT):
                raise ValueError(f"checkpoint_names {memory!r} -> {stored!r}: both must hold as many '*' segments")
        return self

    @model_validator(mode="after")
    def _expert_modules_name_the_group(self) -> "TreeSpec":
        for s in self.subsets:
            if not any(EACH_EXPERT in m.split(".") for m in s.modules):
                continue
            if self.experts is None:
                raise ValueError(f"subset {s.name!r} names per-expert modules but the spec has no experts group")
            allowed = {f"{self.experts.path}.{EACH_EXPERT}.{n}" for n in self.experts.names}
            if not set(s.modules) <= allowed:
                raise ValueError(f"subset {s.name!r}: per-expert modules must be among {sorted(allowed)}")
        return self
