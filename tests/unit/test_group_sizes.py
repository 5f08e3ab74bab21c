"""Per-width group sizes (`group_size_by_bits`): each width is quantized, priced, checkpointed and
exported in groups of its own size, and the allocation stays exact (costs in 1/lcm-bit units)."""

from __future__ import annotations

import itertools
import json
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, dequantize
from pipeline_helpers import LAYER_PREFIX, dequantized_model, logits_gap, make_spec, run, write_hf
from pydantic import ValidationError

from core.allocation import LayerCost, allocate_budget, budget_units, layer_cost
from core.export._common import LinearPlan
from core.export.hf import choose_strategy
from core.job_export import CheckpointWeights
from core.models import LoadedModel
from core.pipeline import pass_key
from core.quant.primitives import dequantize_weight
from core.scheme import QuantScheme, stored_bits
from core.spec import JobSpec

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]

MIXED = QuantScheme(32, group_size_by_bits=((8, 128),))


def test_each_width_is_priced_at_its_own_group_size():
    assert MIXED.group_size_at(4) == 32 and MIXED.group_size_at(8) == 128 and MIXED.group_size_at(16) == 32
    assert MIXED.stored_bits(4, (10, 576)) == 10 * (576 * 4 + 18 * 24)
    assert MIXED.stored_bits(8, (10, 576)) == 10 * (576 * 8 + 5 * 24)  # 576 = 4.5 groups of 128: 5 stored
    assert MIXED.stored_bits(16, (10, 576)) == 10 * 576 * 16
    assert MIXED.effective_bits(8) == 8 + 24 / 128 and MIXED.effective_bits(4) == 4 + 24 / 32
    assert MIXED.cost_unit == 128 and QuantScheme(32, group_size_by_bits=((8, 48),)).cost_unit == 96
    assert MIXED.group_sizes([4, 8, 16]) == [32, 128] and MIXED.group_sizes([16]) == []
    assert MIXED.smallest_group_size == 32 and QuantScheme(64).smallest_group_size == 64
    assert QuantScheme(64, group_size_by_bits=((4, 32),)).smallest_group_size == 32
    assert QuantScheme(64).cost_unit == 64
    assert MIXED.describe() == "group_size 32, 8 bits in groups of 128, asymmetric"
    # one spelling per grid: sorted, and a width at the default size is not listed
    assert QuantScheme(32, group_size_by_bits=((8, 128), (4, 32))) == MIXED
    assert QuantScheme(64, group_size_by_bits=((8, 64),)) == QuantScheme(64)
    with pytest.raises(ValueError, match="distinct widths below 16"):
        QuantScheme(32, group_size_by_bits=((8, 64), (8, 128)))
    with pytest.raises(ValueError, match="distinct widths below 16"):
        QuantScheme(32, group_size_by_bits=((16, 64),))
    with pytest.raises(ValueError, match="group_size"):
        QuantScheme(32, group_size_by_bits=((8, 0),))


def _layers(rng: random.Random, n: int) -> list[LayerCost]:
    shapes = [((64, 96),), ((96, 192), (32, 96)), ((48, 80),)]
    return [
        LayerCost(
            f"l{i}",
            sum(o * k for o, k in shapes[i % 3]),
            rng.uniform(0.1, 2.0),
            {2: rng.uniform(0.4, 0.9), 4: rng.uniform(0.05, 0.3), 8: rng.uniform(0.0, 0.02)},
            shapes[i % 3],
        )  # fmt: skip
        for i in range(n)
    ]


def test_the_knapsack_is_exact_with_mixed_group_sizes():
    """Against brute force: the cheapest-objective allocation whose exact stored bits meet the
    budget, over widths stored in groups of 32, 48 and 128 (80 and 96 inputs leave partial groups)."""
    rng = random.Random(0)
    scheme = QuantScheme(32, group_size_by_bits=((2, 48), (8, 128)))
    checked = 0
    for _ in range(12):
        layers = _layers(rng, rng.randint(2, 4))
        params = sum(l.params for l in layers)
        avg = round(rng.uniform(3.0, 8.5), 2)
        best = None
        for combo in itertools.product([2, 4, 8, 16], repeat=len(layers)):
            stored = sum(scheme.stored_bits(b, s) for l, b in zip(layers, combo) for s in l.shapes)
            if Fraction(stored, params) > Fraction(str(avg)):
                continue
            objective = sum(l.sensitivity * l.quant_error.get(b, 0.0) for l, b in zip(layers, combo))
            best = objective if best is None else min(best, objective)
        if best is None:
            continue
        got = allocate_budget(layers, avg, [2, 4, 8, 16], scheme)
        stored = sum(scheme.stored_bits(got.bits[l.name], s) for l in layers for s in l.shapes)
        assert Fraction(stored, params) <= Fraction(str(avg))
        assert got.effective_bits == float(Fraction(stored, params))
        assert got.objective == pytest.approx(best, rel=1e-12)
        assert sum(layer_cost(l, got.bits[l.name], scheme) for l in layers) <= budget_units(layers, avg, scheme)
        checked += 1
    assert checked >= 8


def test_an_allocation_that_spends_the_budget_exactly_fits():
    """No rounding in 1/lcm-bit units: three [64, 96] linears, 4 bits in groups of 32 (456 bits a
    row) and 8 bits in groups of 48 (816 a row); two at 8 and one at 4 cost exactly 7.25 bits."""
    layers = [LayerCost(f"l{i}", 64 * 96, 1.0 + i, {4: 0.2, 8: 0.01}, ((64, 96),)) for i in range(3)]
    scheme = QuantScheme(32, group_size_by_bits=((8, 48),))
    assert scheme.cost_unit == 96
    assert allocate_budget(layers, 7.25, [4, 8], scheme).bits == {"l0": 4, "l1": 8, "l2": 8}
    assert allocate_budget(layers, 7.2499, [4, 8], scheme).bits == {"l0": 4, "l1": 4, "l2": 8}
    # priced at one group size of 32, the same allocation would not fit
    assert allocate_budget(layers, 7.25, [4, 8], QuantScheme(32)).bits == {"l0": 4, "l1": 4, "l2": 8}


def test_spec_rules_and_pass_key(source):
    base = dict(model="m", method="uniform", bit_budget={"avg_bits": 5.0}, group_size=32)
    spec = JobSpec(**base, group_size_by_bits={"8": 128})
    assert spec.scheme == MIXED and spec.group_size_by_bits == {8: 128}
    with pytest.raises(ValidationError, match="group_size_by_bits names widths \\[5\\]"):
        JobSpec(**base, group_size_by_bits={"5": 64})
    with pytest.raises(ValidationError, match="group_size_by_bits names widths \\[16\\]"):
        JobSpec(**base, group_size_by_bits={"16": 64})
    with pytest.raises(ValidationError):
        JobSpec(**base, group_size_by_bits={"8": 4})
    with pytest.raises(ValidationError, match="needs group_size in \\[32, 64, 128\\], got 256"):
        JobSpec(**base, group_size_by_bits={"8": 256}, target_runtime="vllm")
    assert JobSpec(**base, group_size_by_bits={"8": 128}, target_runtime="vllm").scheme == MIXED
    with pytest.raises(ValidationError, match="multiple of 32, got 48"):
        JobSpec(**base, group_size_by_bits={"4": 48}, target_runtime="llama.cpp")

    def key(**extra) -> str:
        return pass_key(make_spec(**extra), [], [4, 8], source, "taq")

    assert key() == key(group_size_by_bits={"8": 32})  # the default size: the same grid, the same key
    assert key() != key(group_size_by_bits={"8": 64})


def test_strategy_checks_each_widths_group_size():
    plans = [
        LinearPlan(name="x", layer="l", bits=4, shape=(8, 96)),
        LinearPlan(name="y", layer="l", bits=8, shape=(8, 96)),
    ]
    symmetric = QuantScheme(32, symmetric=True)
    assert choose_strategy(plans, symmetric) == "group"
    # 64 does not divide 96: transformers' group layout cannot carry the 8-bit linear
    assert choose_strategy(plans, QuantScheme(32, True, group_size_by_bits=((8, 64),))) == "block"
    assert choose_strategy(plans, QuantScheme(32, True, group_size_by_bits=((8, 48),))) == "group"


def _check_widths(job, loaded: LoadedModel, sizes: dict[int, int], float_zero: bool):
    """The checkpointed codes of the shipped widths, each at its group size, and the allocation's
    effective bits recomputed from them."""
    [allocation] = job.outputs.allocations
    assert {4, 8} <= set(allocation.bits.values())
    bits = allocation.bit_map.linear_bits(loaded.layers)
    weights = dict(CheckpointWeights(job.store, LAYER_PREFIX, loaded.layers, bits))
    stored = params = 0
    for name, b in bits.items():
        shape = tuple(loaded.model.get_submodule(name).weight.shape)
        if b < 16:
            q = weights[name]
            assert (q.bits, q.group_size, q.float_zero) == (b, sizes[b], float_zero and b <= 5), name
        stored += stored_bits(b, sizes.get(b, 1), False, shape, float_zero)
        params += shape[0] * shape[1]
    assert allocation.effective_bits == pytest.approx(stored / params, abs=1e-12)
    return weights


def test_a_job_quantizes_checkpoints_and_exports_hf_at_each_widths_group_size(
    source, loaded: LoadedModel, tmp_path: Path
):
    spec = make_spec(group_size_by_bits={"8": 64}, bit_budget={"avg_bits": 6.0})
    job = run(spec, source)
    weights = _check_widths(job, loaded, {4: 32, 8: 64}, float_zero=False)
    config = json.loads(job.store.get_bytes("artifacts/hf/config.json"))["quantization_config"]
    structure = {name: g["weights"]["block_structure"] for name, g in config["config_groups"].items()}
    assert structure == {"int4": [1, 32], "int8": [1, 64]}
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(write_hf(job.store, "hf", tmp_path / "hf"), dtype=torch.float32)
    gap, scale = logits_gap(exported.eval(), dequantized_model(loaded, weights, fp16_rest=True), loaded.tokenizer)
    assert gap <= 1e-3 * scale


def test_4_bit_float_g32_and_8_bit_g64_export_to_gguf(source, loaded: LoadedModel, tmp_path: Path):
    """The llama.cpp menu: 4-bit Q4_1 blocks (float zero points, groups of 32, decoded exactly)
    next to 8-bit weights in groups of 64 (Q8_0)."""
    spec = make_spec(group_size_by_bits={"8": 64}, zero_point="float", bit_budget={"avg_bits": 6.5}, exports=["gguf"])
    job = run(spec, source)
    weights = _check_widths(job, loaded, {4: 32, 8: 64}, float_zero=True)
    path = tmp_path / "model.gguf"
    path.write_bytes(job.store.get_bytes("artifacts/model.gguf"))
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    exact = 0
    for name, q in weights.items():
        if not name.endswith("mlp.down_proj"):
            continue
        t = tensors[f"blk.{name.split('.')[2]}.ffn_down.weight"]
        assert t.tensor_type.name == {4: "Q4_1", 8: "Q8_0"}[q.bits]
        if q.bits == 4:
            decoded = torch.from_numpy(dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(q.shape)
            assert torch.equal(decoded, dequantize_weight(q))
            exact += 1
    assert exact
