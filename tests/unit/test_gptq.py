"""GPTQ (core/quant/gptq.py): output error vs RTN, equality with RTN for a diagonal Hessian,
padding of a last partial group, packing round trip, dead inputs, damp fallback, stacking of
linears that share an input, and the `quantizer` field of the spec."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from core.quant.gptq import gptq_quantize_weight, gptq_quantize_weights, inverse_hessian_factor
from core.quant.packing import PACKERS
from core.quant.primitives import dequantize_weight, quantization_error, quantize_weight
from core.spec import CalibrationRow, JobSpec, Quantizer

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]


def correlated_inputs(n: int, in_features: int, seed: int) -> torch.Tensor:
    """Tokens whose features are correlated and have unequal scales (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(in_features) + 2.0 * torch.randn(in_features, in_features, generator=g) / in_features**0.5
    scales = torch.rand(in_features, generator=g) * 2.0 + 0.1
    return (torch.randn(n, in_features, generator=g) @ mix) * scales


def random_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g) * 0.05


def output_error(x: torch.Tensor, w: torch.Tensor, q) -> float:
    """‖X Wᵀ − X Ŵᵀ‖² / ‖X Wᵀ‖²."""
    ref = x @ w.T
    return float((ref - x @ dequantize_weight(q).T).square().sum() / ref.square().sum())


def check_structure(q, ref) -> None:
    """Same layout, dtypes and padding rules as quantize_weight's result `ref`."""
    assert q.codes.dtype == torch.uint8 and q.codes.shape == ref.codes.shape
    assert q.scale.dtype == torch.float16 and q.scale.shape == ref.scale.shape
    assert (q.zero is None) == (ref.zero is None)
    if q.zero is not None:
        assert q.zero.dtype == torch.uint8 and q.zero.shape == ref.zero.shape
    assert (q.bits, q.group_size, q.symmetric, q.shape) == (ref.bits, ref.group_size, ref.symmetric, ref.shape)
    assert int(q.codes.max()) <= 2**q.bits - 1
    assert bool(torch.isfinite(q.scale.float()).all()) and bool((q.scale != 0).all())


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_lower_output_error_than_rtn_on_correlated_inputs(bits: int, symmetric: bool) -> None:
    x = correlated_inputs(2048, 256, seed=1)
    w = random_weight(48, 256, seed=2)
    h = x.T @ x / x.shape[0]
    rtn = quantize_weight(w, bits, 64, symmetric)
    gptq = gptq_quantize_weight(w, h, bits, 64, symmetric)
    check_structure(gptq, rtn)
    e_rtn, e_gptq = output_error(x, w, rtn), output_error(x, w, gptq)
    assert e_gptq <= 0.9 * e_rtn, (e_gptq, e_rtn)
    # the activation-weighted error of primitives agrees with the direct measurement
    assert quantization_error(w, gptq, h) == pytest.approx(e_gptq, rel=1e-3)


@pytest.mark.parametrize("bits", [3, 4])
def test_clip_search_combines_with_gptq(bits: int) -> None:
    x = correlated_inputs(2048, 256, seed=3)
    w = random_weight(48, 256, seed=4)
    h = x.T @ x / x.shape[0]
    rtn_clip = quantize_weight(w, bits, 64, False, clip_search=True)
    gptq_clip = gptq_quantize_weight(w, h, bits, 64, False, clip_search=True)
    check_structure(gptq_clip, rtn_clip)
    assert output_error(x, w, gptq_clip) <= 0.9 * output_error(x, w, rtn_clip)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("clip_search", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("group_size", [32, 100], ids=["g32", "g100-padded"])
def test_diagonal_hessian_is_exactly_rtn(bits: int, symmetric: bool, clip_search: bool, group_size: int) -> None:
    """No correlation between inputs -> no error is propagated -> RTN, code for code."""
    w = random_weight(16, 250, seed=5)
    w[3, :32] = 0.25  # a constant group
    w[5] = w[5].abs()  # all-positive groups
    scales = torch.rand(250, generator=torch.Generator().manual_seed(6)) + 0.5
    rtn = quantize_weight(w, bits, group_size, symmetric, clip_search=clip_search)
    for h in (torch.eye(250) * 3.7, torch.diag(scales)):
        q = gptq_quantize_weight(w, h, bits, group_size, symmetric, clip_search=clip_search)
        assert torch.equal(q.codes, rtn.codes) and torch.equal(q.scale, rtn.scale)
        assert (q.zero is None and rtn.zero is None) or torch.equal(q.zero, rtn.zero)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_non_dividing_group_padding_never_reaches_the_output(symmetric: bool) -> None:
    x = correlated_inputs(1024, 576, seed=7)
    w = random_weight(32, 576, seed=8)
    h = x.T @ x / x.shape[0]
    q = gptq_quantize_weight(w, h, 4, 128, symmetric)
    rtn = quantize_weight(w, 4, 128, symmetric)
    check_structure(q, rtn)
    assert q.codes.shape == (32, 640) and q.scale.shape == (32, 5)
    zero = q.zero_points()[:, -1:].expand(32, 64)
    assert torch.equal(q.codes[:, 576:], zero)  # padding = zero point -> dequantizes to 0
    full = ((q.codes.float().reshape(32, 5, 128) - q.zero_points().float().unsqueeze(-1))
            * q.scale.float().unsqueeze(-1)).reshape(32, 640)
    assert bool((full[:, 576:] == 0).all())
    assert dequantize_weight(q).shape == (32, 576)
    assert output_error(x, w, q) <= 0.9 * output_error(x, w, rtn)


@pytest.mark.parametrize("name", sorted(PACKERS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trips_through_packing(name: str, bits: int) -> None:
    x = correlated_inputs(512, 200, seed=9)
    w = random_weight(12, 200, seed=10)
    q = gptq_quantize_weight(w, x.T @ x / 512, bits, 64, False)
    packer = PACKERS[name]
    n = q.codes.shape[-1]
    assert torch.equal(packer.unpack(packer.pack(q.codes, bits), bits, n), q.codes)


def test_dead_inputs_and_all_dead_hessian() -> None:
    x = correlated_inputs(1024, 128, seed=11)
    x[:, [0, 5, 64, 127]] = 0.0  # inputs never active on the calibration tokens
    w = random_weight(24, 128, seed=12)
    h = x.T @ x / x.shape[0]
    q = gptq_quantize_weight(w, h, 4, 32, False)
    assert bool(torch.isfinite(dequantize_weight(q)).all())
    assert output_error(x, w, q) <= 0.9 * output_error(x, w, quantize_weight(w, 4, 32, False))
    # decoupled: a dead input's weight is rounded as it is (|error| ≤ ~0.63 step of its group)
    deq = dequantize_weight(q)
    for col in (0, 5, 64, 127):
        step = q.scale[:, col // 32].float().abs()
        assert bool(((deq[:, col] - w[:, col]).abs() <= 0.64 * step).all())
    # nothing was ever active: plain RTN
    zero_h = gptq_quantize_weight(w, torch.zeros(128, 128), 4, 32, False)
    assert torch.equal(zero_h.codes, quantize_weight(w, 4, 32, False).codes)


def test_deterministic() -> None:
    x = correlated_inputs(512, 192, seed=13)
    w = random_weight(20, 192, seed=14)
    h = x.T @ x / 512
    a = gptq_quantize_weight(w, h, 3, 64, False, clip_search=True)
    b = gptq_quantize_weight(w, h, 3, 64, False, clip_search=True)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


def test_block_size_does_not_change_the_result_much() -> None:
    """Lazy batching is an exact rewrite of the column sweep (up to float rounding)."""
    x = correlated_inputs(512, 256, seed=15)
    w = random_weight(16, 256, seed=16)
    h = x.T @ x / 512
    a = gptq_quantize_weight(w, h, 4, 32, False, block_size=32)
    b = gptq_quantize_weight(w, h, 4, 32, False, block_size=256)
    assert float((a.codes.int() - b.codes.int()).abs().gt(0).float().mean()) < 0.01
    assert output_error(x, w, a) == pytest.approx(output_error(x, w, b), rel=0.02)


def test_linears_sharing_an_input_in_one_sweep() -> None:
    x = correlated_inputs(512, 128, seed=17)
    h = x.T @ x / 512
    weights = {"q": random_weight(16, 128, seed=18), "k": random_weight(8, 128, seed=19)}
    together = gptq_quantize_weights(weights, h, 4, 32, False)
    assert list(together) == ["q", "k"]
    for name, w in weights.items():
        alone = gptq_quantize_weight(w, h, 4, 32, False)
        assert together[name].shape == tuple(w.shape)
        assert torch.equal(together[name].scale, alone.scale) and torch.equal(together[name].zero, alone.zero)
        assert torch.equal(together[name].codes, alone.codes)


def test_damp_fallback_and_bad_hessians() -> None:
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues -1 and 3
    upper = inverse_hessian_factor(indefinite)
    assert bool(torch.isfinite(upper).all()) and torch.equal(upper, torch.triu(upper))
    inv = upper.T @ upper
    damped = torch.linalg.inv(inv)  # = H + λI for the λ that worked
    lam = float(damped[0, 0] - 1.0)
    assert lam > 1.0 and torch.allclose(damped, indefinite.double() + lam * torch.eye(2, dtype=torch.float64))
    w = random_weight(4, 2, seed=20)
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize_weight(w, torch.eye(3), 4, 2, False)
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize_weight(w, torch.full((2, 2), float("nan")), 4, 2, False)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize_weight(w, torch.eye(2), 5, 2, False)


ROWS = [CalibrationRow(prompt="What is the capital of France?")]


def test_spec_quantizer_field() -> None:
    base = dict(model="m", method="uniform", bit_budget={"avg_bits": 4.5})
    assert JobSpec(**base).quantizer == Quantizer.rtn
    assert JobSpec(**base, quantizer="gptq", calibration=ROWS).quantizer == Quantizer.gptq
    assert JobSpec(**base, quantizer="gptq", calibration_dataset_id="ds_1", clip_search=True).clip_search
    with pytest.raises(ValidationError, match="gptq"):
        JobSpec(**base, quantizer="gptq")
    with pytest.raises(ValidationError, match="gptq"):  # a reused profile carries no activations
        JobSpec(**dict(base, method="taq"), quantizer="gptq", profile_from_job_id="job_1")
    assert JobSpec(**dict(base, method="taq"), quantizer="gptq", profile_from_job_id="job_1",
                   calibration=ROWS).profile_from_job_id == "job_1"
    with pytest.raises(ValidationError):
        JobSpec(**base, quantizer="awq", calibration=ROWS)
