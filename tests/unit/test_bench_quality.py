"""bench/: the equal-bits peer configs, the tables' merge rules and the plot series."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.bench_quality import parse_method, with_continuation  # noqa: E402
from bench.peers import UniformConfig, config_for_budget, rtn_dequantized  # noqa: E402
from bench.quality_tables import comparison_table, comparisons, verdict_summary  # noqa: E402
from core.quant.primitives import dequantize_weight, quantize_weight  # noqa: E402
from core.spec import CalibrationRow  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "budget, group",
    [(4.1875, 128), (4.3, 128), (4.375, 64), (4.5, 64), (4.99, 32), (5.0, 32), (5.49, 32), (6.0, 16), (9.0, 16)],
)
def test_peer_spends_the_budget_with_the_smallest_fitting_group(budget: float, group: int) -> None:
    config = config_for_budget(budget)
    assert config == UniformConfig(4, group)
    assert config.effective_bits <= budget


def test_no_peer_config_below_group_128() -> None:
    assert config_for_budget(4.18) is None


def test_rtn_peer_is_our_round_to_nearest() -> None:
    w = torch.randn(16, 576, generator=torch.Generator().manual_seed(0))
    expected = dequantize_weight(quantize_weight(w, 4, 128, symmetric=False), dtype=torch.float32)
    assert torch.equal(rtn_dequantized(w, UniformConfig(4, 128)), expected)


def _row(label: str, kind: str, budget: float | None, bits: float, nll: list[float], contains: list[float]) -> dict:
    return {
        "suite": "capitals",
        "label": label,
        "kind": kind,
        "budget": budget,
        "effective_bits": bits,
        "items": {"gold_nll": nll, "contains": contains},
    }


def test_every_method_meets_every_control_of_its_budget() -> None:
    n = 40
    rows = [
        _row("full precision", "full precision", None, 5.0, [1.0] * n, [1.0] * n),
        _row("taq", "method", 5.0, 4.9, [2.0] * n, [1.0] * 30 + [0.0] * 10),
        _row("uniform", "control", 5.0, 4.9, [2.5] * n, [1.0] * 20 + [0.0] * 20),
        _row("random", "control", 5.0, 4.8, [2.0] * n, [1.0] * 30 + [0.0] * 10),
        _row("uniform", "control", 6.0, 5.9, [1.5] * n, [1.0] * n),
    ]
    compared = comparisons(rows)
    assert [(c["variant"], c["baseline"], c["budget"], c["metric"]) for c in compared] == [
        ("taq", "uniform", 5.0, "gold_nll"),
        ("taq", "uniform", 5.0, "contains"),
        ("taq", "random", 5.0, "gold_nll"),
        ("taq", "random", 5.0, "contains"),
    ]
    verdicts = [c["verdict"] for c in compared]
    # lower NLL and more contains than uniform at equal bits; identical to random, which has fewer bits
    assert verdicts == ["beats", "beats", "no_difference", "no_difference"]
    assert compared[0]["difference"]["mean"] == pytest.approx(-0.5)
    assert "| taq (4.900) | uniform (4.900) | gold_nll (lower is better) |" in comparison_table(compared)
    assert "gold_nll: 2 comparisons — beats 1" in verdict_summary(compared)


def test_a_method_meets_the_peers_of_its_budget() -> None:
    """A peer (HQQ, RTN at matched bits) is a control with gold NLL items of its own; a peer at
    fewer bits that the method beats gives "beats_with_more_bits" rather than "beats"."""
    n = 40
    rows = [
        _row("taq_grad", "method", 5.0, 4.98, [2.0] * n, [1.0] * n),
        _row("hqq g32", "peer", 5.0, 4.75, [2.5] * n, [1.0] * n),
        _row("hqq g16", "peer", 6.0, 5.5, [1.0] * n, [1.0] * n),
    ]
    compared = [c for c in comparisons(rows) if c["metric"] == "gold_nll"]
    assert [(c["variant"], c["baseline"], c["verdict"]) for c in compared] == [
        ("taq_grad", "hqq g32", "beats_with_more_bits")
    ]


def test_a_seq_row_is_also_compared_with_its_fp_twin() -> None:
    n = 40
    rows = [
        _row("taq_grad+gptq", "method", 5.0, 4.9, [2.0] * n, [1.0] * n),
        _row("taq_grad+gptq+seq", "method", 5.0, 4.9, [1.8] * n, [1.0] * n),
        _row("uniform+gptq", "control", 5.0, 4.9, [2.5] * n, [1.0] * n),
    ]
    pairs = {(c["variant"], c["baseline"]) for c in comparisons(rows) if c["metric"] == "gold_nll"}
    # the fp row is not compared with the seq row (only seq rows look for their twin)
    assert pairs == {
        ("taq_grad+gptq", "uniform+gptq"),
        ("taq_grad+gptq+seq", "uniform+gptq"),
        ("taq_grad+gptq+seq", "taq_grad+gptq"),
    }
    seq = parse_method("taq_grad+gptq+seq")
    assert seq.scoring_options == {"quantizer": "gptq", "calibration_inputs": "quantized"}


def test_a_float_zero_row_is_also_compared_with_its_integer_twin() -> None:
    n = 40
    rows = [
        _row("uniform", "method", 5.0, 4.9, [2.0] * n, [1.0] * n),
        _row("uniform+fz", "method", 5.0, 5.0, [1.8] * n, [1.0] * n),
        _row("error_only", "control", 5.0, 4.9, [2.5] * n, [1.0] * n),
    ]
    pairs = {(c["variant"], c["baseline"]) for c in comparisons(rows) if c["metric"] == "gold_nll"}
    assert ("uniform+fz", "uniform") in pairs and ("uniform", "uniform+fz") not in pairs
    assert parse_method("taq+fz").scoring_options == {"zero_point": "float"}


def test_a_per_width_group_size_row_is_compared_with_its_one_size_twin() -> None:
    n = 40
    rows = [
        _row("taq_grad+fz", "method", 5.0, 5.0, [2.0] * n, [1.0] * n),
        _row("taq_grad+fz+g8w128", "method", 5.0, 5.0, [1.9] * n, [1.0] * n),
    ]
    pairs = {(c["variant"], c["baseline"]) for c in comparisons(rows) if c["metric"] == "gold_nll"}
    assert pairs == {("taq_grad+fz+g8w128", "taq_grad+fz")}
    # a control allocated on the per-width grid is compared only with the methods on that grid
    rows += [
        _row("uniform+fz", "control", 5.0, 5.0, [2.1] * n, [1.0] * n),
        _row("uniform+fz+g8w128", "control", 5.0, 5.0, [2.2] * n, [1.0] * n),
    ]
    pairs = {(c["variant"], c["baseline"]) for c in comparisons(rows) if c["metric"] == "gold_nll"}
    assert pairs == {
        ("taq_grad+fz+g8w128", "taq_grad+fz"),
        ("taq_grad+fz", "uniform+fz"),
        ("taq_grad+fz+g8w128", "uniform+fz+g8w128"),
    }
    variant = parse_method("taq_grad+fz+g8w128")
    assert hash(variant) == hash(parse_method("taq_grad+g8w128+fz"))  # a pass key, whatever the order
    assert variant.scoring_options == {"zero_point": "float", "group_size_by_bits": ((8, 128),)}


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
    rows = [
        CalibrationRow(prompt="Capital of Peru?", answers=["Lima", "Lima, Peru"]),
        CalibrationRow(messages=[{"role": "user", "content": "2 + 2?"}], answers=["4"]),
    ]
    assert with_continuation(None, rows, "none") == rows
    out = with_continuation(None, rows, "gold")
    assert [[(m.role, m.content) for m in r.messages] for r in out] == [
        [("user", "Capital of Peru?"), ("assistant", "Lima")],
        [("user", "2 + 2?"), ("assistant", "4")],
    ]
    assert [r.answers for r in out] == [r.answers for r in rows]
