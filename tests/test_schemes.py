"""Scheme models: what they accept, what they refuse (naming the field), and how overrides resolve."""

import pydantic
import pytest

from treeq import QuantConfig, TreeqError
from treeq.schemes import ActivationScheme, KVCacheScheme, ModuleOverride, WeightScheme, scheme_for

BASE = WeightScheme(bits=4, group_size=64)
RECIPE = (
    ModuleOverride(pattern=r".*self_attn\.", bits=8),
    ModuleOverride(pattern=r"model\.layers\.0\.", skip=True),  # after the attention rule: it wins there
    ModuleOverride(pattern=r".*down_proj", group_size=32, sym=False),
)


@pytest.mark.parametrize(
    "module,expected",
    [
        ("model.layers.3.self_attn.q_proj", BASE.model_copy(update={"bits": 8})),
        ("model.layers.0.self_attn.q_proj", BASE.model_copy(update={"bits": 8})),  # first match wins
        ("model.layers.0.mlp.up_proj", None),
        ("model.layers.2.mlp.down_proj", BASE.model_copy(update={"group_size": 32, "sym": False})),
        ("model.layers.2.mlp.up_proj", BASE),
        ("lm.model.layers.0.mlp.up_proj", BASE),  # re.match is anchored at the start, as GPTQModel's dynamic is
    ],
)
def test_first_matching_override_decides_the_scheme(module, expected):
    assert scheme_for(module, BASE, RECIPE) == expected


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: WeightScheme(bits=5), "bits"),
        (lambda: WeightScheme(grid="fp8-int4", bits=3), "grid 'fp8-int4' needs bits in [4]"),
        (lambda: WeightScheme(group_size=0), "group_size must be -1"),
        (lambda: ActivationScheme(granularity="per-group"), "group_size is required with granularity 'per-group'"),
        (lambda: ActivationScheme(dynamic=False), "cannot be per-token"),
        (lambda: KVCacheScheme(key_granularity="per-head"), "key_granularity"),
        (lambda: ModuleOverride(pattern="(", bits=8), "not a regular expression"),
        (lambda: ModuleOverride(pattern="x"), "sets skip=True or at least one of"),
        (lambda: ModuleOverride(pattern="x", skip=True, bits=8), "a skipped module keeps full precision"),
    ],
)
def test_impossible_schemes_are_refused_naming_the_field(build, message):
    with pytest.raises(pydantic.ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build()


def test_an_override_that_makes_an_impossible_scheme_is_refused_when_applied():
    fp8 = WeightScheme(grid="fp8-int4", sym=True)
    with pytest.raises(pydantic.ValidationError, match="needs bits in"):
        scheme_for("model.layers.1.mlp.up_proj", fp8, (ModuleOverride(pattern=".*mlp", bits=8),))


@pytest.mark.parametrize(
    "settings,field,known",
    [
        (dict(weights={"bitz": 4}), "weights.bitz", "group_size"),
        (dict(calibration={"seqln": 64}), "calibration.seqln", "seqlen"),
        (dict(overrides=[{"pattern": "x", "bitz": 8}]), "overrides.0.bitz", "pattern"),
        (dict(kv_cache={"method": "minmax", "keybits": 2}), "kv_cache.keybits", "key_bits"),
        (dict(method="gptq", options={"dampp": 0.1}), "options.dampp", "damp_percent"),
        (dict(nosuch=1), "nosuch", "weights"),
    ],
)
def test_an_unknown_setting_is_refused_with_the_settings_that_exist_there(settings, field, known):
    """Was pydantic's "Extra inputs are not permitted", which names none of them."""
    with pytest.raises(TreeqError) as raised:
        QuantConfig.build(**settings)
    message = str(raised.value)
    assert f"{field}: no such setting; the settings there are " in message and known in message, message
    assert "\n" not in message
