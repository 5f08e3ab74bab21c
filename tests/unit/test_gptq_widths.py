"""Every width of a GPTQ job in one column sweep (core/quant/gptq.py `gptq_quantize_widths`): each
width's rows are quantized as in a sweep of their own, RTN code for code when H is diagonal, and
quantize_layer sweeps the widths of one group size together."""

from __future__ import annotations

import pytest
import torch

from core.quant.gptq import gptq_quantize_weights, gptq_quantize_widths, inverse_hessian_factor
from core.quant.primitives import dequantize_weight, quantize_weight
from core.scheme import QuantScheme

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]


def correlated(n: int, features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(features) + 2.0 * torch.randn(features, features, generator=g) / features**0.5
    return (torch.randn(n, features, generator=g) @ mix) * (torch.rand(features, generator=g) * 2 + 0.1)


def weights(seed: int, rows: tuple[int, ...], features: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {f"w{i}": torch.randn(r, features, generator=g) * 0.05 for i, r in enumerate(rows)}
    out["w0"][2, :32] = 0.25  # a constant group
    out["w0"][4] = out["w0"][4].abs()  # all-positive groups
    return out


@pytest.mark.parametrize(
    ("symmetric", "float_zero"), [(False, False), (True, False), (False, True)], ids=["asym", "sym", "float-zero"]
)
@pytest.mark.parametrize("group_size", [32, 100], ids=["g32", "g100-padded"])
def test_diagonal_hessian_gives_rtn_at_every_width(symmetric: bool, float_zero: bool, group_size: int) -> None:
    """No error is propagated with a diagonal H, so each width is RTN code for code, whatever the
    widths beside it in the sweep (float zero points at 3-4 bits next to integer ones at 8)."""
    ws = weights(1, (12, 7), 250)
    h = torch.diag(torch.rand(250, generator=torch.Generator().manual_seed(2)) + 0.5)
    got = gptq_quantize_widths(ws, h, [8, 3, 4], group_size, symmetric, clip_search=True, float_zero=float_zero).codes
    assert sorted(got) == [3, 4, 8]
    for bits, quantized in got.items():
        for name, w in ws.items():
            rtn = quantize_weight(w, bits, group_size, symmetric, clip_search=True, float_zero=float_zero)
            q = quantized[name]
            assert torch.equal(q.codes, rtn.codes) and torch.equal(q.scale, rtn.scale)
            assert (q.zero is None) == (rtn.zero is None) and (q.zero is None or torch.equal(q.zero, rtn.zero))
            assert (q.offset is None) == (rtn.offset is None)
            assert q.offset is None or torch.equal(q.offset, rtn.offset)


@pytest.mark.parametrize("float_zero", [False, True], ids=["int-zero", "float-zero"])
def test_one_sweep_equals_a_sweep_per_width(float_zero: bool) -> None:
    """On a correlated H the joint sweep gives each width the codes of its own sweep: the per-column
    steps are the same arithmetic, and only the block update's matrix product may round differently
    (its BLAS blocking depends on the number of columns), so at most a few codes may flip."""
    ws = weights(3, (40, 24), 192)
    x = correlated(400, 192, seed=4)
    upper = inverse_hessian_factor(x.T @ x / 400)
    together = gptq_quantize_widths(ws, None, [4, 8, 3], 64, False, upper=upper, float_zero=float_zero).codes
    for bits in (3, 4, 8):
        alone = gptq_quantize_weights(ws, None, bits, 64, False, upper=upper, float_zero=float_zero)
        for name, w in ws.items():
            flips = (together[bits][name].codes != alone[name].codes).float().mean().item()
            assert flips < 0.01, (bits, name, flips)
            ref = x @ w.T
            err = [
                float((ref - x @ dequantize_weight(q[name]).T).square().sum() / ref.square().sum())
                for q in (together[bits], alone)
            ]
            assert err[0] == pytest.approx(err[1], rel=0.02)


def test_widths_are_checked() -> None:
    ws = weights(5, (8,), 64)
    with pytest.raises(ValueError, match="widths is empty"):
        gptq_quantize_widths(ws, torch.eye(64), [], 32, False)
    with pytest.raises(ValueError):
        gptq_quantize_widths(ws, torch.eye(64), [4, 17], 32, False)
    assert gptq_quantize_widths({}, None, [4, 8], 32, False).codes == {4: {}, 8: {}}


@pytest.mark.parametrize(
    ("symmetric", "float_zero"), [(False, False), (True, False), (False, True)], ids=["asym", "sym", "float-zero"]
)
@pytest.mark.parametrize("group_size", [32, 100], ids=["g32", "g100-padded"])
def test_sweep_leaves_the_dequantized_weights(symmetric: bool, float_zero: bool, group_size: int) -> None:
    """After the sweep its working matrix holds every width's Ŵ, bit for bit what dequantize_weight
    makes of the returned codes (quantize_layer measures errors from it), including constant and
    all-positive groups and a padded last group."""
    ws = weights(9, (12, 7), 250)
    x = correlated(300, 250, seed=10)
    swept = gptq_quantize_widths(
        ws, x.T @ x / 300, [8, 3, 4], group_size, symmetric, clip_search=True, float_zero=float_zero
    )
    for bits in (3, 4, 8):
        for name, w in ws.items():
            view = swept.dequantized(bits, name)
            assert view.shape == w.shape
            assert torch.equal(view, dequantize_weight(swept.codes[bits][name], torch.float32))


def test_layer_sweeps_widths_together_where_memory_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    """quantize_layer with per-width group sizes ({8: 128} on a g32 grid): gate/up's widths on g32
    share one sweep and 8 bits gets its own, because down_proj's factor sets the layer's peak and a
    joint gate/up sweep stays below it; down_proj's own joint sweep would raise the peak (the
    preflight counts one width per sweep), so its widths are swept one at a time. Every result is
    the real sweep's on the factor of the recorded H."""
    from torch import nn

    import core.quant.gptq as gptq
    from core.memory import gptq_group_bytes
    from core.quant.layer import LayerInputs, quantize_layer

    linears = {
        "gate": nn.Linear(256, 24, bias=False),
        "up": nn.Linear(256, 16, bias=False),
        "down": nn.Linear(1024, 64, bias=False),
    }
    g = torch.Generator().manual_seed(6)
    ws = {n: torch.randn(m.out_features, m.in_features, generator=g) * 0.05 for n, m in linears.items()}
    inputs = LayerInputs(linears, 0)
    with inputs.recording(), torch.no_grad():
        inputs.set_batch(None)
        x = correlated(300, 256, seed=7)[None]
        linears["gate"](x), linears["up"](x), linears["down"](correlated(300, 1024, seed=8)[None])
    peak = gptq_group_bytes(1024, 64)
    assert gptq_group_bytes(256, 40, widths=2) <= peak < gptq_group_bytes(1024, 64, widths=2)
    calls: list[tuple[tuple[str, ...], tuple[int, ...]]] = []
    real = gptq.gptq_quantize_widths

    def recording(weights, hessian, widths, *args, **kwargs):  # the real sweep, its calls listed
        calls.append((tuple(weights), tuple(widths)))
        return real(weights, hessian, widths, *args, **kwargs)

    monkeypatch.setattr(gptq, "gptq_quantize_widths", recording)
    scheme = QuantScheme(32, False, False, ((8, 128),))
    got = quantize_layer(ws, inputs, [3, 4, 8, 16], scheme=scheme, gptq=True, clip_search=False)
    assert sorted(calls) == [
        (("down",), (3,)),
        (("down",), (4,)),
        (("down",), (8,)),
        (("gate", "up"), (3, 4)),
        (("gate", "up"), (8,)),
    ]
    gate_up = {n: ws[n] for n in ("gate", "up")}
    upper = inverse_hessian_factor(inputs.hessian("gate"))
    g32 = real(gate_up, None, [3, 4], 32, False, upper=upper).codes
    g128 = real(gate_up, None, [8], 128, False, upper=upper).codes
    down_upper = inverse_hessian_factor(inputs.hessian("down"))
    for bits, want in ((3, g32[3]), (4, g32[4]), (8, g128[8])):
        for name in gate_up:
            assert got.codes[bits][name].group_size == want[name].group_size
            assert torch.equal(got.codes[bits][name].codes, want[name].codes)
        alone = gptq_quantize_weights(
            {"down": ws["down"]}, None, bits, 128 if bits == 8 else 32, False, upper=down_upper
        )
        assert torch.equal(got.codes[bits]["down"].codes, alone["down"].codes)
    assert got.errors["gate"][3] > got.errors["gate"][4] > got.errors["gate"][8] > 0
    # each error (measured from the sweep's Ŵ, gate/up's reference outputs kept across their two
    # sweeps, down_proj's computed per sweep) is ‖X ΔWᵀ‖² / ‖X Wᵀ‖² of the returned codes
    for name, w in ws.items():
        x = inputs.x(name).double()
        for bits in (3, 4, 8):
            delta = w.double() - dequantize_weight(got.codes[bits][name]).double()
            want = float((x @ delta.T).square().sum() / (x @ w.double().T).square().sum())
            assert got.errors[name][bits] == pytest.approx(want, rel=1e-5)
