"""GPTQ (core/quant/gptq.py): output error vs RTN, equality with RTN for a diagonal Hessian,
padding of a last partial group, packing round trip, dead inputs, damp fallback, stacking of
linears that share an input, and the `quantizer` field of the spec."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from core.quant.gptq import (
    gptq_quantize_weight,
    gptq_quantize_weights,
    gptq_quantize_widths,
    inverse_hessian_factor,
)
from core.quant.metrics import quantization_error
from core.quant.packing import PACKERS
from core.quant.primitives import dequantize_weight, quantize_weight
from core.scheme import QuantScheme
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


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
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
    full = (
        (q.codes.float().reshape(32, 5, 128) - q.zero_points().float().unsqueeze(-1)) * q.scale.float().unsqueeze(-1)
    ).reshape(32, 640)
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
        gptq_quantize_weight(w, torch.eye(2), 9, 2, False)


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
    assert (
        JobSpec(
            **dict(base, method="taq"), quantizer="gptq", profile_from_job_id="job_1", calibration=ROWS
        ).profile_from_job_id
        == "job_1"
    )
    with pytest.raises(ValidationError):
        JobSpec(**base, quantizer="awq", calibration=ROWS)


# ---- the in-place factorisation (memory) -------------------------------------------------------
def textbook_factor(h: torch.Tensor, damp: float = 0.01, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The textbook chain (Cholesky, cholesky_inverse, Cholesky again; three [in, in] matrices at
    its peak): the reference the in-place, reversed-order factorisation must equal to rounding."""
    h = h.to(dtype, copy=True)
    h.add_(h.T.clone()).div_(2)
    diag = torch.diagonal(h)
    dead = diag <= 0
    live_mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    diag[dead] = live_mean
    for attempt in range(7):
        lam = damp * 10.0**attempt * live_mean
        diag.add_(lam)
        chol, info = torch.linalg.cholesky_ex(h)
        diag.sub_(lam)
        if int(info) == 0 and float(torch.diagonal(chol).square().min()) >= 0.5 * lam:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            assert int(info) == 0
            return upper
    raise AssertionError("not factored")


def rss_high_water_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_in_place_factor_equals_the_textbook_one(dtype: torch.dtype) -> None:
    """The textbook chain's U to rounding (it is unique), upper triangular, column-major, and the
    very same numbers whichever way H is handed over; with a builder (or `overwrite`) the factor
    lives in the very matrix the builder returned."""
    x = correlated_inputs(600, 2200, seed=21)  # 2200 inputs: several symmetrisation blocks
    x[:, [7, 1500]] = 0.0  # dead inputs
    h = x.T @ x / 600
    h[3, 9] += 1e-3  # not exactly symmetric, as a blocked XᵀX may be
    ref = textbook_factor(h, dtype=dtype)
    first = inverse_hessian_factor(h, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    assert float((first.double() - ref.double()).abs().max()) <= tol * float(ref.abs().max())
    assert torch.equal(first, torch.triu(first))
    built: list[int] = []

    def build() -> torch.Tensor:
        fresh = h.clone()
        built.append(fresh.data_ptr())
        return fresh

    kept = h.clone()
    for upper in (
        inverse_hessian_factor(h, dtype=dtype),
        inverse_hessian_factor(build, dtype=dtype),
        inverse_hessian_factor(h.clone(), dtype=dtype, overwrite=True),
    ):
        assert torch.equal(upper, first) and upper.stride() == ref.stride() and upper.dtype == dtype
    assert torch.equal(h, kept)  # a tensor without overwrite is left alone
    if dtype == torch.float32:  # no conversion: the builder's matrix became the factor
        assert len(built) == 1 and inverse_hessian_factor(build, dtype=dtype).data_ptr() == built[-1]


@pytest.mark.parametrize("n", [1, 5, 97, 300])
def test_triangular_inverse_in_place_by_halves_and_panels(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Small leaves and panels, odd sizes: every split and panel boundary of the in-place inverse."""
    from core.quant import factor

    monkeypatch.setattr(factor, "_LEAF", 8)
    monkeypatch.setattr(factor, "_PANEL", 7)
    g = torch.Generator().manual_seed(26)
    lower = torch.randn(n, n, generator=g, dtype=torch.float64).tril_(-1) * 0.1
    lower += torch.diag(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
    work = lower.mT.clone(memory_format=torch.contiguous_format).mT  # column-major, as the factor hands it over
    factor._invert_lower_(work)
    assert torch.equal(work, torch.tril(work))
    assert torch.allclose(work, torch.linalg.inv(lower), rtol=0, atol=1e-10)


def test_damp_retries_rebuild_the_hessian() -> None:
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    calls = []

    def build() -> torch.Tensor:
        calls.append(1)
        return indefinite.clone()

    ref = inverse_hessian_factor(indefinite)  # a copy per attempt
    assert torch.equal(inverse_hessian_factor(build), ref) and len(calls) > 2
    with pytest.raises(ValueError, match="overwritten"):  # H itself was factored: nothing to retry with
        inverse_hessian_factor(indefinite.double().clone(), overwrite=True)
    # overwrite with a conversion leaves the caller's H intact, so retries still work
    assert torch.equal(inverse_hessian_factor(indefinite.clone(), overwrite=True), ref)
    with pytest.raises(ValueError, match="None"):
        inverse_hessian_factor(lambda: None)


@pytest.mark.skipif(rss_high_water_bytes() is None, reason="needs /proc/self/status (Linux)")
def test_factorisation_holds_one_matrix() -> None:
    """The builder's H is the only [in, in] matrix: the process's RSS high-water mark grows by
    one matrix plus small temporaries the allocator keeps (1.1-1.5 matrices measured), where the
    out-of-place chain (H, L, (LLᵀ)⁻¹, U) held three at once (4.3 measured)."""
    n = 3072  # 37.7 MB float32: above glibc's largest mmap threshold, so freed memory leaves RSS
    x = correlated_inputs(256, n, seed=22)
    matrix = n * n * 4
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the RSS high-water mark")
    base = rss_high_water_bytes()
    upper = inverse_hessian_factor(lambda: (x.T @ x).div_(256), dtype=torch.float32)
    grown = rss_high_water_bytes() - base
    assert upper.shape == (n, n)
    assert grown < 2 * matrix, grown / matrix


def test_layer_gptq_codes_equal_the_factor_of_the_hessian() -> None:
    """quantize_layer factors H in place from the recorded inputs; its codes are those of the
    factor of the same H handed over as a tensor (every width in one sweep), for a group of
    linears sharing an input and a single one."""
    from torch import nn

    from core.quant.layer import LayerInputs, quantize_layer

    g = torch.Generator().manual_seed(23)
    linears = {
        "gate": nn.Linear(192, 40, bias=False),
        "up": nn.Linear(192, 24, bias=False),
        "down": nn.Linear(40, 192, bias=False),
    }
    weights = {n: torch.randn(m.out_features, m.in_features, generator=g) * 0.05 for n, m in linears.items()}
    for n_tokens in (0, 10**6):  # raw rows, summed XᵀX
        inputs = LayerInputs(linears, n_tokens)
        x, y = correlated_inputs(300, 192, seed=24)[None], correlated_inputs(300, 40, seed=25)[None]
        with inputs.recording(), torch.no_grad():
            inputs.set_batch(None)
            linears["gate"](x), linears["up"](x), linears["down"](y)
        got = quantize_layer(weights, inputs, [3, 4, 16], scheme=QuantScheme(64, False), gptq=True, clip_search=True)
        for lead, names in (("gate", ["gate", "up"]), ("down", ["down"])):
            upper = inverse_hessian_factor(inputs.hessian(lead))
            swept = gptq_quantize_widths(
                {n: weights[n] for n in names}, None, [3, 4], 64, False, clip_search=True, upper=upper
            ).codes
            for bits in (3, 4):
                want = swept[bits]
                for name in names:
                    assert torch.equal(got.codes[bits][name].codes, want[name].codes)
                    assert torch.equal(got.codes[bits][name].scale, want[name].scale)
                    assert torch.equal(got.codes[bits][name].zero, want[name].zero)
