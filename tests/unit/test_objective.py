"""The knapsack objective each method hands the allocator (issue: no double counting).

* error-style (`taq`): sensitivity × measured error, no prediction in the profile;
* damage-style (`taq_kl`, `taqo`): the damage measured at the probe width, scaled by
  e_l(b) / e_l(probe) (`core.scorers.common.damage_scaled`);
* `taq_grad`: its own predicted loss per width (tests/unit/test_taq_grad.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.allocation import allocate_budget, layer_costs_from_profile, objective_of
from core.models import resolve_model
from core.pipeline import JobInputs, run_job
from core.scheme import QuantScheme
from core.scorers.common import damage_scaled
from core.spec import CalibrationRow, JobSpec
from core.streaming.checkpoints import LayerRecord, MemoryStore
from core.types import Profile

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]

ROWS = [CalibrationRow(prompt=f"What is {i} times 3?", answers=[str(3 * i)]) for i in range(6)]


def record() -> LayerRecord:
    return LayerRecord(
        index=0,
        name="model.layers.0",
        pass_key="k",
        params={"q": 100, "mlp": 300},
        errors={"q": {4: 0.2, 8: 0.002, 16: 0.0}, "mlp": {4: 0.1, 8: 0.004, 16: 0.0}},
        widths=[4, 8],
    )


def test_damage_is_scaled_by_the_error_ratio_and_shared_by_weighted_error() -> None:
    predicted = damage_scaled(0.5, record(), 4, [4, 8])
    e4 = (100 * 0.2 + 300 * 0.1) / 400
    e8 = (100 * 0.002 + 300 * 0.004) / 400
    assert sum(p[4] for p in predicted.values()) == pytest.approx(0.5)  # the damage at the probe width
    assert sum(p[8] for p in predicted.values()) == pytest.approx(0.5 * e8 / e4)
    assert predicted["q"][4] / predicted["mlp"][4] == pytest.approx((100 * 0.2) / (300 * 0.1))
    assert damage_scaled(0.5, record(), 16, [4, 8]) == {}
    zero = LayerRecord(0, "l", "k", {"q": 10}, {"q": {4: 0.0, 8: 0.0}}, [4, 8])
    assert damage_scaled(0.5, zero, 4, [4, 8]) == {"q": {4: 0.0, 8: 0.0}}


def profile_of(tiny_model_root: Path, method: str) -> Profile:
    spec = JobSpec(
        model="tiny-llama",
        method=method,
        calibration=ROWS,
        bit_budget={"avg_bits": 6.0},
        bit_choices=[4, 8, 16],
        group_size=32,
        max_tokens=64,
        seed=0,
        exports=[],
    )
    source = resolve_model("tiny-llama", [tiny_model_root], {})
    return run_job(JobInputs(spec=spec, source=source, rows=ROWS), MemoryStore()).profile.without_bits()


def test_error_style_taq_weighs_the_error_and_predicts_nothing(tiny_model_root: Path) -> None:
    profile = profile_of(tiny_model_root, "taq")
    assert all(not layer.predicted_loss for layer in profile.layers)
    bits = allocate_budget(profile, 6.0, [4, 8, 16], QuantScheme(32)).bits
    costs = layer_costs_from_profile(profile)
    assert objective_of(costs, bits) == pytest.approx(
        sum(l.sensitivity * l.quant_error[bits[l.name]] for l in profile.layers)
    )


@pytest.mark.parametrize("method", ["taq_kl", "taqo"])
def test_damage_style_methods_predict_their_damage_scaled_by_the_error(tiny_model_root: Path, method: str) -> None:
    profile = profile_of(tiny_model_root, method)
    for layer in profile.layers:
        # the prediction at the probe width (4) is the measured damage itself
        assert layer.predicted_loss[4] == pytest.approx(layer.sensitivity)
        assert layer.predicted_loss[8] == pytest.approx(layer.sensitivity * layer.quant_error[8] / layer.quant_error[4])
        assert sum(l.predicted_loss[8] for l in layer.linears) == pytest.approx(layer.predicted_loss[8])
    bits = allocate_budget(profile, 6.0, [4, 8, 16], QuantScheme(32)).bits
    assert objective_of(layer_costs_from_profile(profile), bits) == pytest.approx(
        sum(l.predicted_loss.get(bits[l.name], 0.0) for l in profile.layers)
    )
