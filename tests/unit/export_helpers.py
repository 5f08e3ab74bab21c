"""Shared by the export and manifest tests: the tiny model, a mixed bit map quantized layer by
layer (every linear of a layer at its width), and a spec that matches it."""

from __future__ import annotations

from core.modules import decoder_layers, named_linears
from core.quant.primitives import quantize_weight
from core.spec import JobSpec
from core.types import BitMap

#: tiny llama has 4 layers: a mixed map with every width class the export must handle
MIXED = (4, 8, 16, 4)


def make_spec(group_size: int, symmetric: bool, **overrides) -> JobSpec:
    fields = dict(
        model="tiny-llama",
        method="uniform",
        bit_budget={"avg_bits": 8.0},
        group_size=group_size,
        symmetric=symmetric,
        bit_choices=[2, 3, 4, 5, 6, 7, 8, 16],
    )
    fields.update(overrides)
    return JobSpec(**fields)


def quantize_model(model, widths, group_size: int, symmetric: bool):
    """(the per-layer BitMap of `widths`, the weights quantized at them)"""
    bits = {name: b for (name, _), b in zip(decoder_layers(model), widths)}
    weights = {}
    for layer, b in bits.items():
        if b < 16:
            for name, linear in named_linears(model, layer).items():
                weights[name] = quantize_weight(linear.weight.detach(), b, group_size, symmetric)
    return BitMap(bits), weights
