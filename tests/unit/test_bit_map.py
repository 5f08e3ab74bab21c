"""The one bit-map type: widths per layer or per linear, resolved per linear in one place; the
allocation's rule and unit as enums through JSON; the versioned profile / bitmap JSON."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from core.errors import ExportError, InvalidSpec
from core.export._common import plan_linears
from core.modules import decoder_layers, named_linears
from core.spec import ALLOWED_BITS, AllocationRule, AllocationUnit, Method
from core.types import (
    JSON_VERSION,
    KEEP_BITS,
    QUANTIZED_BITS,
    BitAllocation,
    BitMap,
    Profile,
    check_version,
)

pytestmark = pytest.mark.unit

LAYERS = [
    SimpleNamespace(name="model.layers.0", linears=["model.layers.0.q", "model.layers.0.k"]),
    SimpleNamespace(name="model.layers.1", linears=["model.layers.1.q", "model.layers.1.k"]),
]


def test_quantized_widths_are_the_menu_without_keep() -> None:
    assert KEEP_BITS in ALLOWED_BITS
    assert set(QUANTIZED_BITS) == set(ALLOWED_BITS) - {KEEP_BITS} and QUANTIZED_BITS == (2, 3, 4, 5, 6, 7, 8)


def test_per_layer_map_gives_each_linear_its_layers_width() -> None:
    bit_map = BitMap({"model.layers.0": 4, "model.layers.1": 16})
    assert bit_map.manifest_key == "bits_by_layer"
    assert bit_map.linear_bits(LAYERS) == {
        "model.layers.0.q": 4,
        "model.layers.0.k": 4,
        "model.layers.1.q": 16,
        "model.layers.1.k": 16,
    }
    # a linear's own name is not looked up in a per-layer map
    assert BitMap({"model.layers.0.q": 8}).get("model.layers.0.q", "model.layers.0") is None


def test_per_linear_map_and_missing_units() -> None:
    bits = {"model.layers.0.q": 4, "model.layers.0.k": 8, "model.layers.1.q": 4, "model.layers.1.k": 16}
    bit_map = BitMap(bits, AllocationUnit.linear)
    assert bit_map.manifest_key == "bits_by_linear" and bit_map.linear_bits(LAYERS) == bits
    with pytest.raises(InvalidSpec, match="model.layers.1.k"):
        BitMap({k: v for k, v in bits.items() if k != "model.layers.1.k"}, AllocationUnit.linear).linear_bits(LAYERS)
    with pytest.raises(InvalidSpec, match=r"\['model.layers.1'\]"):
        BitMap({"model.layers.0": 4}).linear_bits(LAYERS)


def test_allocation_json_round_trip_keeps_the_enums() -> None:
    allocation = BitAllocation(
        bits={"model.layers.0": 4}, effective_bits=4.2, budget=5.0, rule="budget", solver="dp", unit="layer"
    )
    assert allocation.rule is AllocationRule.budget and allocation.unit is AllocationUnit.layer
    data = json.loads(json.dumps(allocation.to_dict()))
    assert data["rule"] == "budget" and data["unit"] == "layer"
    assert BitAllocation.from_dict(data) == allocation
    uniform = BitAllocation(bits={}, effective_bits=4.0, budget=None, rule="uniform")
    assert uniform.rule is Method.uniform
    with pytest.raises(ValueError):
        BitAllocation(bits={}, effective_bits=4.0, budget=None, rule="taq")
    assert allocation.bit_map.get("model.layers.1.q", "model.layers.1") is None
    assert allocation.bit_map.get("model.layers.0.q", "model.layers.0") == 4


def test_profile_json_carries_a_version_and_newer_ones_are_refused() -> None:
    profile = Profile(model="m", method="taq", layers=[])
    data = profile.to_dict()
    assert data["version"] == JSON_VERSION and Profile.from_dict(data) == profile
    assert Profile.from_dict({k: v for k, v in data.items() if k != "version"}) == profile  # written before versions
    with pytest.raises(InvalidSpec, match="newer"):
        Profile.from_dict({**data, "version": JSON_VERSION + 1})
    with pytest.raises(InvalidSpec):
        check_version({"version": "1"}, "bitmap.json")


def test_exporter_plan_follows_the_maps_unit(tiny) -> None:
    model, _ = tiny
    layer_names = [name for name, _ in decoder_layers(model)]
    linear_names = [name for layer in layer_names for name in named_linears(model, layer)]
    # a map of linears read as a map of layers names things the model does not have
    with pytest.raises(ExportError, match="layers the model does not have"):
        plan_linears(model, {}, BitMap(dict.fromkeys(linear_names, 16)))
    per_linear = plan_linears(model, {}, BitMap(dict.fromkeys(linear_names, 16), AllocationUnit.linear))
    per_layer = plan_linears(model, {}, BitMap(dict.fromkeys(layer_names, 16)))
    assert [(p.name, p.bits) for p in per_linear] == [(p.name, p.bits) for p in per_layer]
