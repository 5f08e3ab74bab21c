"""allocation_unit "linear": fused groups, units that reproduce the per-layer objective, an optimum
never worse than per-layer, bits per linear through run_job's layer pass and both exports, and the
errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from pipeline_helpers import LAYER_PREFIX, dequantized_model, logits_gap, make_spec, run, write_hf
from pydantic import ValidationError

from core.allocation import allocate_budget, expand_units, layer_costs_from_profile, linear_units
from core.errors import InvalidSpec
from core.job_export import CheckpointWeights
from core.models import LoadedModel
from core.modules import fused_linear_groups
from core.pipeline import allocate_stage
from core.plot import plot_profile, profile_effective_bits
from core.scheme import QuantScheme
from core.spec import CalibrationRow, JobSpec
from core.types import LayerProfile, LinearProfile, Profile

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]

LEAVES = {
    "self_attn.q_proj": 576 * 576,
    "self_attn.k_proj": 576 * 192,
    "self_attn.v_proj": 576 * 192,
    "self_attn.o_proj": 576 * 576,
    "mlp.gate_proj": 576 * 1536,
    "mlp.up_proj": 576 * 1536,
    "mlp.down_proj": 576 * 1536,
}


def synthetic_profile(layers: int = 6, seed: int = 0) -> Profile:
    """A SmolLM2-shaped profile with random sensitivities and per-linear errors (e(4) > e(8) > 0)."""
    rng = random.Random(seed)
    out = []
    for i in range(layers):
        linears = []
        for leaf, n in LEAVES.items():
            e4 = rng.uniform(0.001, 0.05)
            linears.append(
                LinearProfile(f"model.layers.{i}.{leaf}", n, {4: e4, 8: e4 / rng.uniform(150, 300), 16: 0.0})
            )
        params = sum(l.params for l in linears)
        error = {b: sum(l.params * l.quant_error[b] for l in linears) / params for b in (4, 8, 16)}
        out.append(
            LayerProfile(
                index=i,
                name=f"model.layers.{i}",
                params=params,
                scores={},
                importance=0.0,
                sensitivity=rng.uniform(0.2, 3.0),
                quant_error=error,
                linears=linears,
            )
        )
    return Profile(model="synthetic", method="taq", layers=out)


def test_fused_groups_follow_the_runtimes_fused_matrices() -> None:
    names = [f"model.layers.0.{leaf}" for leaf in LEAVES] + [f"model.layers.1.{leaf}" for leaf in LEAVES]
    groups = fused_linear_groups(names)
    assert groups[:4] == [
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"],
        ["model.layers.0.self_attn.o_proj"],
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
        ["model.layers.0.mlp.down_proj"],
    ]
    assert len(groups) == 8 and sorted(n for g in groups for n in g) == sorted(names)


def test_units_reproduce_the_per_layer_objective_and_the_optimum_is_never_worse() -> None:
    profile = synthetic_profile()
    units = linear_units(profile)
    assert len(units) == 4 * len(profile.layers)
    for budget in (4.5, 5.0, 6.0, 8.0):
        per_layer = allocate_budget(profile, budget, [4, 8, 16], QuantScheme(128))
        per_linear = expand_units(allocate_budget([u.cost for u in units], budget, [4, 8, 16], QuantScheme(128)), units)
        assert per_linear.unit == "linear" and per_linear.effective_bits <= budget
        # the per-layer allocation, written per unit, has exactly the per-layer objective
        as_units = {u.cost.name: per_layer.bits[u.cost.name.rsplit(".", 2)[0]] for u in units}
        objective = sum(u.cost.sensitivity * (u.cost.quant_error[as_units[u.cost.name]]) for u in units)
        assert objective == pytest.approx(per_layer.objective, rel=1e-12)
        assert per_linear.objective <= per_layer.objective * (1 + 1e-12)
        # fused shards share one width
        for i in range(len(profile.layers)):
            qkv = {per_linear.bits[f"model.layers.{i}.self_attn.{p}_proj"] for p in "qkv"}
            gate_up = {per_linear.bits[f"model.layers.{i}.mlp.{p}_proj"] for p in ("gate", "up")}
            assert len(qkv) == 1 and len(gate_up) == 1
    # somewhere in the sweep, per-linear finds a strictly better optimum on this random profile
    better = [
        b
        for b in (4.5, 5.0, 6.0)
        if expand_units(allocate_budget([u.cost for u in units], b, [4, 8, 16], QuantScheme(128)), units).objective
        < allocate_budget(profile, b, [4, 8, 16], QuantScheme(128)).objective * (1 - 1e-9)
    ]
    assert better


def test_profile_without_linear_errors_is_an_actionable_error() -> None:
    profile = synthetic_profile(layers=2)
    old = Profile(
        model=profile.model,
        method=profile.method,
        layers=[LayerProfile(**{**l.__dict__, "linears": []}) for l in profile.layers],
    )
    assert layer_costs_from_profile(old)  # per-layer allocation still works on it
    with pytest.raises(InvalidSpec, match="score again"):
        linear_units(old)


def test_paper_rule_refuses_per_linear_allocation() -> None:
    with pytest.raises(ValidationError, match="whole layers"):
        JobSpec(
            model="m",
            method="taq",
            calibration=[CalibrationRow(prompt="x")],
            allocation="paper",
            allocation_unit="linear",
        )


def test_profile_round_trip_and_bits_per_linear() -> None:
    profile = synthetic_profile(layers=3)
    spec = JobSpec(
        model="m",
        method="taq",
        calibration=[CalibrationRow(prompt="x")],
        bit_budget={"avg_bits": 5.0},
        allocation_unit="linear",
    )
    [allocation] = allocate_stage(spec, profile)
    assert allocation.unit == "linear" and set(allocation.bits) == {l.name for x in profile.layers for l in x.linears}
    with_bits = profile.with_bits(allocation.bit_map)
    assert Profile.from_dict(with_bits.to_dict()) == with_bits
    for layer in with_bits.layers:
        widths = {l.bits for l in layer.linears}
        assert layer.bits == (widths.pop() if len(widths) == 1 else None)
        assert layer.mean_bits == pytest.approx(sum(l.bits * l.params for l in layer.linears) / layer.params)
    # effective bits from the profile's per-linear bits equal the allocator's
    assert profile_effective_bits(with_bits, QuantScheme(128)) == pytest.approx(allocation.effective_bits)
    assert plot_profile(with_bits, scheme=QuantScheme(128)).startswith(b"\x89PNG")
    assert allocation.bit_map.manifest_key == "bits_by_linear"


ROWS = [CalibrationRow(prompt=f"Item {i}: what is {i} times {i + 3}? Answer briefly.") for i in range(8)]


GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_run_job_quantizes_and_exports_each_linear_at_its_bits(
    source, loaded: LoadedModel, tmp_path: Path, quantizer: str
) -> None:
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    spec = make_spec(
        calibration=ROWS,
        bit_budget={"avg_bits": 5.5},
        max_tokens=32,
        allocation_unit="linear",
        quantizer=quantizer,
        exports=["hf", "gguf"],
    )
    result = run(spec, source, rows=ROWS)
    [allocation] = result.outputs.allocations
    bits = allocation.bit_map.linear_bits(loaded.layers)
    assert allocation.unit == "linear" and allocation.effective_bits <= 5.5
    assert set(allocation.bits) == set(bits)  # keyed by linear
    # a real per-linear choice: some layer mixes widths
    assert any(len({bits[n] for n in ref.linears}) > 1 for ref in loaded.layers), bits
    for group in fused_linear_groups(list(bits)):  # fused shards share one width
        assert len({bits[n] for n in group}) == 1, group
    weights = CheckpointWeights(result.store, LAYER_PREFIX, loaded.layers, bits)
    assert {n for n, b in bits.items() if b < 16} == set(weights)
    for name, q in weights.items():
        assert q.bits == bits[name]
    profile = result.outputs.profile
    assert any(l.bits is None and l.mean_bits is not None for l in profile.layers)
    assert [(lin.name, lin.bits) for layer in profile.layers for lin in layer.linears] == [
        (lin.name, bits[lin.name]) for layer in profile.layers for lin in layer.linears
    ]
    # on the job's own measured profile the per-linear optimum is never worse than per-layer
    [per_layer] = allocate_stage(spec.model_copy(update={"allocation_unit": "layer"}), profile.without_bits())
    assert allocation.objective <= per_layer.objective * (1 + 1e-12)
    assert json.loads(result.store.get_bytes("artifacts/bitmap.json"))["budgets"][0]["unit"] == "linear"

    exported = AutoModelForCausalLM.from_pretrained(
        write_hf(result.store, "hf", tmp_path / "hf"), dtype=torch.float32
    ).eval()
    gap, scale = logits_gap(exported, dequantized_model(loaded, dict(weights), fp16_rest=True), loaded.tokenizer)
    assert gap <= 1e-3 * scale

    path = tmp_path / "m.gguf"
    path.write_bytes(result.store.get_bytes("artifacts/model.gguf"))
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    for name, b in bits.items():
        layer, leaf = name.split(".")[2], name.rsplit(".", 1)[1]
        expected = {4: ("Q4_0", "Q4_1"), 8: ("Q8_0",), 16: ("F16",)}[b]
        assert types[f"blk.{layer}.{GGUF_NAMES[leaf]}.weight"] in expected, (name, b)
