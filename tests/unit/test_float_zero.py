"""Float zero points (`zero_point: "float"`): w = scale · code + offset with fp16 scale and offset,
for asymmetric widths up to 5 bits, exported to GGUF's Q4_1 / Q5_1 blocks 1:1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, dequantize
from pipeline_helpers import make_spec, run

from core.allocation import LayerCost, allocate_budget
from core.export.ggml_blocks import encode_quantized
from core.quant.gptq import gptq_quantize_weight
from core.quant.metrics import sqnr_db
from core.quant.primitives import dequantize_weight, quantize_weight
from core.scheme import QuantScheme, effective_bits, stored_bits
from core.spec import JobSpec
from core.streaming.checkpoints import _decode, _encode

pytestmark = pytest.mark.unit


def gaussian(rows: int, cols: int, seed: int, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05 + mean


def q4_1_source(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Weights that were themselves stored as Q4_1 blocks of 32 (fp16 d and m, every block using
    levels 0 and 15), as SmolLM2's packaged GGUF is."""
    gen = torch.Generator().manual_seed(seed)
    nb = cols // 32
    levels = torch.randint(0, 16, (rows, nb, 32), generator=gen)
    levels[..., 0], levels[..., 1] = 0, 15
    d = (torch.rand(rows, nb, 1, generator=gen) * 0.01 + 0.001).half().float()
    m = (-torch.rand(rows, nb, 1, generator=gen) * 0.08).half().float()
    return (levels * d + m).reshape(rows, cols)


def test_a_q4_1_source_is_reproduced_exactly_only_with_float_zero_points():
    w = q4_1_source(48, 256, 0)
    floating = quantize_weight(w, 4, 32, symmetric=False, float_zero=True)
    assert floating.zero is None and floating.offset is not None and floating.offset.dtype == torch.float16
    assert torch.equal(dequantize_weight(floating), w)
    integer = dequantize_weight(quantize_weight(w, 4, 32, symmetric=False))
    assert not torch.equal(integer, w)  # the zero point on the code grid cannot hit m


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_float_offsets_beat_integer_zero_points_on_one_signed_groups(bits):
    w = gaussian(64, 256, bits, mean=0.2)  # every group positive: an integer zero point wastes levels
    floating = sqnr_db(w, dequantize_weight(quantize_weight(w, bits, 64, False, float_zero=True)))
    integer = sqnr_db(w, dequantize_weight(quantize_weight(w, bits, 64, False)))
    assert floating > integer + 2.0  # measured +2.6 to +2.7 dB at 2-5 bits
    centred = gaussian(64, 256, bits)  # the zero point's rounding alone: +0.11 to +0.17 dB
    assert (
        sqnr_db(centred, dequantize_weight(quantize_weight(centred, bits, 64, False, float_zero=True)))
        > sqnr_db(centred, dequantize_weight(quantize_weight(centred, bits, 64, False))) + 0.05
    )


def test_wider_widths_and_symmetric_grids_keep_their_zero_points():
    w = gaussian(16, 128, 1)
    for bits in (6, 7, 8):
        q = quantize_weight(w, bits, 32, False, float_zero=True)
        assert q.offset is None and q.zero is not None
        assert torch.equal(q.codes, quantize_weight(w, bits, 32, False).codes)
    sym = quantize_weight(w, 4, 32, True, float_zero=True)
    assert sym.offset is None and sym.zero is None and sym.symmetric


def test_constant_groups_and_padding():
    w = torch.full((3, 80), 0.375)  # 80 inputs in groups of 32: a padded last group
    w[1] = -2.5
    q = quantize_weight(w, 4, 32, False, float_zero=True)
    assert torch.equal(dequantize_weight(q), w)
    assert q.codes.shape == (3, 96) and int(q.codes[:, 80:].max()) == 0


def test_clip_search_never_loses():
    w = gaussian(32, 256, 5)
    w[:, ::37] *= 8  # outliers, where shrinking the range pays
    plain = sqnr_db(w, dequantize_weight(quantize_weight(w, 3, 64, False, float_zero=True)))
    searched = sqnr_db(w, dequantize_weight(quantize_weight(w, 3, 64, False, clip_search=True, float_zero=True)))
    assert searched > plain


def test_gptq_with_a_diagonal_hessian_is_round_to_nearest_and_lowers_output_error():
    w = gaussian(24, 128, 2, mean=0.05)
    for clip in (False, True):
        rtn = quantize_weight(w, 4, 32, False, clip_search=clip, float_zero=True)
        gptq = gptq_quantize_weight(w, torch.eye(128) * 3.0, 4, 32, False, clip_search=clip, float_zero=True)
        assert torch.equal(gptq.codes, rtn.codes) and torch.equal(gptq.scale, rtn.scale)
        assert gptq.offset is not None and rtn.offset is not None and torch.equal(gptq.offset, rtn.offset)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(512, 128, generator=gen) @ (torch.eye(128) + 0.3 * torch.randn(128, 128, generator=gen))
    h = x.T @ x / 512

    def output_error(q):
        return float(((x @ (w - dequantize_weight(q)).T) ** 2).sum())

    gptq = gptq_quantize_weight(w, h, 4, 32, False, float_zero=True)
    assert gptq.offset is not None
    assert output_error(gptq) < 0.8 * output_error(quantize_weight(w, 4, 32, False, float_zero=True))


def test_cost_counts_an_fp16_offset_per_group():
    assert effective_bits(4, 32, False, float_zero=True) == 5.0  # Q4_1: 20 bytes per 32 weights
    assert effective_bits(5, 32, False, float_zero=True) == 6.0  # Q5_1: 24 bytes per 32
    assert effective_bits(4, 32, False) == 4.75  # an int8 zero point
    assert effective_bits(8, 32, False, float_zero=True) == effective_bits(8, 32, False)  # 8 bits stay integer
    assert stored_bits(4, 128, False, (10, 576), float_zero=True) == 10 * (576 * 4 + 5 * 32)
    layers = [LayerCost(name=f"l{i}", params=4096, sensitivity=1.0, quant_error={4: 1.0, 8: 0.1}) for i in range(4)]
    integer = allocate_budget(layers, 6.0, [4, 8], QuantScheme(32))
    floating = allocate_budget(layers, 6.0, [4, 8], QuantScheme(32, float_zero=True))
    assert floating.effective_bits > integer.effective_bits or sorted(floating.bits.values()) != sorted(
        integer.bits.values()
    )
    assert floating.effective_bits <= 6.0


def ggml_dequant(encoded) -> torch.Tensor:
    return torch.from_numpy(dequantize(encoded.data, GGMLQuantizationType[encoded.qtype]).astype(np.float32))


@pytest.mark.parametrize("bits, qtype", [(2, "Q4_1"), (3, "Q4_1"), (4, "Q4_1"), (5, "Q5_1")])
@pytest.mark.parametrize("group_size", [32, 128])
def test_gguf_blocks_carry_float_zero_points_exactly(bits, qtype, group_size):
    q = quantize_weight(gaussian(32, 256, bits, mean=0.03), bits, group_size, False, float_zero=True)
    encoded = encode_quantized(q)
    assert encoded.qtype == qtype and encoded.exact_blocks == encoded.total_blocks
    torch.testing.assert_close(ggml_dequant(encoded), dequantize_weight(q), rtol=0, atol=0)


def test_checkpoints_round_trip_the_offsets():
    weights = {
        "a": quantize_weight(gaussian(8, 64, 0), 4, 32, False, float_zero=True),
        "b": quantize_weight(gaussian(8, 64, 1), 8, 32, False, float_zero=True),
    }
    back = _decode(_encode(weights))
    for name, q in weights.items():
        got = back[name]
        assert torch.equal(got.codes, q.codes) and torch.equal(got.scale, q.scale)
        assert (got.offset is None) == (q.offset is None) and (got.zero is None) == (q.zero is None)
        assert torch.equal(dequantize_weight(got), dequantize_weight(q))


def test_spec_rules():
    base = dict(model="m", method="uniform", bit_budget={"avg_bits": 5.0})
    spec = JobSpec(**base, zero_point="float")
    assert spec.float_zero and [e.value for e in spec.exports] == ["gguf"]  # the export that carries it
    assert JobSpec(**base, zero_point="float", target_runtime="llama.cpp").exports[0].value == "gguf"
    with pytest.raises(ValueError, match="asymmetric grids"):
        JobSpec(**base, zero_point="float", symmetric=True)
    with pytest.raises(ValueError, match="carried only by the GGUF export"):
        JobSpec(**base, zero_point="float", exports=["gguf", "hf"])
    with pytest.raises(ValueError):
        JobSpec(**base, zero_point="float", target_runtime="vllm")
    assert not JobSpec(**base).float_zero


def test_a_float_zero_job_ships_the_codes_it_measured(source, tmp_path):
    """The whole pipeline: the layer pass stores offsets, the allocation prices them, and the
    GGUF's Q4_1 tensors decode (gguf-py's reference) to exactly the dequantized checkpoints."""
    from core.streaming.checkpoints import load_codes

    spec = make_spec(zero_point="float", exports=["gguf"], bit_budget={"avg_bits": 7.0})
    job = run(spec, source)
    allocation = job.outputs.allocations[0]
    assert allocation.effective_bits <= 7.0

    def priced(float_zero: bool) -> float:
        stored = weights = 0
        for layer in job.outputs.profile.layers:
            for linear in layer.linears:
                assert linear.shape is not None
                stored += stored_bits(allocation.bits[layer.name], 32, False, linear.shape, float_zero)
                weights += linear.params
        return stored / weights

    assert allocation.effective_bits == pytest.approx(priced(True), abs=1e-12)
    assert priced(True) > priced(False)  # the fp16 offsets are paid for
    assert 4 in allocation.bits.values()
    path = tmp_path / "model.gguf"
    path.write_bytes(job.store.objects["artifacts/model.gguf"])
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    checked = 0
    for layer, bits in sorted(allocation.bits.items()):
        if bits != 4:
            continue
        i = int(layer.rsplit(".", 1)[1])
        codes = load_codes(job.store, "work/layers", i, 4)
        q = codes[f"{layer}.mlp.down_proj"]
        assert q.offset is not None
        t = tensors[f"blk.{i}.ffn_down.weight"]
        assert t.tensor_type.name == "Q4_1"
        got = torch.from_numpy(dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(q.shape)
        assert torch.equal(got, dequantize_weight(q))
        checked += 1
    assert checked
