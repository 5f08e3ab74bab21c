"""bench/: the equal-bits peer configs, the tables' merge rules and the plot series."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.bench_quality import parse_method, series_name, with_continuation  # noqa: E402
from core.spec import CalibrationRow  # noqa: E402
from bench.peers import UniformConfig, config_for_budget, rtn_dequantized  # noqa: E402
from bench.report_quality import merge, unique  # noqa: E402
from core.quant.primitives import dequantize_weight, quantize_weight  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("budget, group", [(4.25, 128), (4.3, 128), (4.5, 64), (4.99, 64), (5.0, 32),
                                           (6.0, 16), (9.0, 16)])
def test_peer_spends_the_budget_with_the_smallest_fitting_group(budget: float, group: int) -> None:
    config = config_for_budget(budget)
    assert config == UniformConfig(4, group)
    assert config.effective_bits <= budget


def test_no_peer_config_below_group_128() -> None:
    assert config_for_budget(4.2) is None


def test_rtn_peer_is_our_round_to_nearest() -> None:
    w = torch.randn(16, 576, generator=torch.Generator().manual_seed(0))
    expected = dequantize_weight(quantize_weight(w, 4, 128, symmetric=False), dtype=torch.float32)
    assert torch.equal(rtn_dequantized(w, UniformConfig(4, 128)), expected)


def _row(suite: str, method: str, eff: float, budget: float | None, score: float) -> dict:
    return {"suite": suite, "method": method, "effective_bits": eff, "avg_bits": budget,
            "contains": {"mean": score}, "retained": score}


def test_merge_keeps_one_full_precision_row_per_suite_and_groups_suites(tmp_path: Path) -> None:
    a = [_row("capitals", "full precision", 16.0, None, 0.3), _row("capitals", "uniform", 4.25, 4.25, 0.2),
         _row("arithmetic", "full precision", 16.0, None, 0.4)]
    b = [_row("capitals", "full precision", 16.0, None, 0.3), _row("capitals", "taq+gptq", 4.9, 5.0, 0.25)]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    rows = merge([tmp_path / "a.json", tmp_path / "b.json"])
    assert [(r["suite"], r["method"]) for r in rows] == [
        ("capitals", "full precision"), ("capitals", "uniform"), ("capitals", "taq+gptq"),
        ("arithmetic", "full precision")]


def test_unique_drops_budgets_that_repeat_an_allocation() -> None:
    rows = [_row("capitals", "uniform", 4.25, 4.25, 0.2), _row("capitals", "uniform", 4.25, 4.5, 0.2),
            _row("capitals", "taq", 4.25, 4.25, 0.2), _row("capitals", "taq", 4.383, 4.5, 0.21)]
    assert [(r["method"], r["avg_bits"]) for r in unique(rows)] == [
        ("uniform", 4.25), ("taq", 4.25), ("taq", 4.5)]


def test_peer_rows_form_one_plot_series() -> None:
    assert series_name("hqq g64") == "hqq"
    assert series_name("rtn_matched g128") == "rtn_matched"
    assert series_name("taq+gptq (profile from arithmetic)") == "taq+gptq (profile from arithmetic)"
    assert series_name("taq") == "taq"


def test_method_modifiers_set_spec_fields_and_profile_keys() -> None:
    plain, full = parse_method("taq"), parse_method("taq_kl+linear+gptq+clip")
    assert plain.method == "taq" and plain.options == () and plain.scoring_options == {}
    assert full.method == "taq_kl"
    assert dict(full.options) == {"allocation_unit": "linear", "quantizer": "gptq", "clip_search": True}
    # the allocation unit does not change the profile; the quantizer and clip search do
    assert full.scoring_options == {"quantizer": "gptq", "clip_search": True}
    assert parse_method("taq+gptq+linear") == parse_method("taq+linear+gptq")
    with pytest.raises(SystemExit, match="unknown modifier"):
        parse_method("taq+awq")


def test_gold_continuation_appends_the_first_answer_as_an_assistant_turn() -> None:
    rows = [CalibrationRow(prompt="Capital of Peru?", answers=["Lima", "Lima, Peru"]),
            CalibrationRow(messages=[{"role": "user", "content": "2 + 2?"}], answers=["4"])]
    assert with_continuation(None, rows, "none") == rows
    out = with_continuation(None, rows, "gold")
    assert [[(m.role, m.content) for m in r.messages] for r in out] == [
        [("user", "Capital of Peru?"), ("assistant", "Lima")], [("user", "2 + 2?"), ("assistant", "4")]]
    assert [r.answers for r in out] == [r.answers for r in rows]
