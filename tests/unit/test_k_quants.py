"""K-quant super-blocks (`k_quants`): float-zero 4/5-bit weights in groups of 32 whose scales and
offsets are 6-bit multiples of one fp16 value per 256 weights, exported to GGUF Q4_K / Q5_K 1:1."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, dequantize
from pipeline_helpers import make_spec, run

from core.export.ggml_kquants import encode_super_blocks, pack_super_blocks
from core.quant.gptq import gptq_quantize_weight
from core.quant.metrics import sqnr_db
from core.quant.primitives import dequantize_weight, quantize_weight
from core.quant.superblocks import super_params
from core.scheme import QuantScheme, effective_bits, stored_bits
from core.spec import JobSpec
from core.streaming.checkpoints import load_codes

pytestmark = pytest.mark.unit


def gaussian(rows: int, cols: int, seed: int, mean: float = 0.0, std: float = 0.05) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * std + mean


def ggml_dequant(data: np.ndarray, qtype: str) -> torch.Tensor:
    return torch.from_numpy(dequantize(data, GGMLQuantizationType[qtype]).astype(np.float32))


@pytest.mark.parametrize("bits, qtype", [(4, "Q4_K"), (5, "Q5_K"), (6, "Q6_K")])
@pytest.mark.parametrize("clip", [False, True])
def test_gguf_super_blocks_decode_to_exactly_our_weights(bits, qtype, clip):
    # rows of different magnitudes (tiny ones probe d's fp16 floor), one-signed groups, a zero row
    w = torch.cat([gaussian(16, 512, bits), gaussian(8, 512, 7, mean=0.2), gaussian(7, 512, 8, std=1e-5)])
    w = torch.cat([w, torch.zeros(1, 512)])
    symmetric = qtype == "Q6_K"  # Q6_K: symmetric 6-bit groups, int8 multiples of d
    q = quantize_weight(w, bits, 32, symmetric, clip_search=clip, float_zero=not symmetric, k_quants=True)
    assert q.scale.dtype == torch.float32
    if not symmetric:
        assert q.offset is not None and bool((q.offset <= 0).all())  # m is unsigned: offsets at or below 0
    encoded = encode_super_blocks(q)
    assert encoded is not None and encoded.qtype == qtype
    assert encoded.data.shape == (32, 2 * {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[qtype])
    torch.testing.assert_close(ggml_dequant(encoded.data, qtype), dequantize_weight(q), rtol=0, atol=0)


def test_every_field_lands_where_the_reference_decoder_reads_it():
    """Hand-made parameters covering every 6-bit value position and every code, not only what the
    quantizer happens to produce."""
    gen = torch.Generator().manual_seed(0)
    rows, supers = 4, 3
    codes = torch.randint(0, 32, (rows, supers * 256), generator=gen, dtype=torch.uint8)
    sc = torch.randint(0, 64, (rows, supers, 8), generator=gen, dtype=torch.uint8)
    m = torch.randint(0, 64, (rows, supers, 8), generator=gen, dtype=torch.uint8)
    d = (torch.rand(rows, supers, generator=gen) * 0.01).half()
    dmin = (torch.rand(rows, supers, generator=gen) * 0.01).half()
    from core.quant.superblocks import SuperParams

    params = SuperParams(d=d, dmin=dmin, sc=sc, m=m)
    for qtype, top in (("Q4_K", 15), ("Q5_K", 31)):
        c = codes & top
        expect = (
            d.float().unsqueeze(-1) * sc.float() * c.reshape(rows, supers, 8, 32).float().permute(3, 0, 1, 2)
            - dmin.float().unsqueeze(-1) * m.float()
        ).permute(1, 2, 3, 0)
        got = ggml_dequant(pack_super_blocks(qtype, c, params), qtype)
        torch.testing.assert_close(got, expect.reshape(rows, -1), rtol=0, atol=0)


def test_super_params_recover_what_the_quantizer_stored_and_refuse_other_grids():
    w = gaussian(8, 256, 1)
    q = quantize_weight(w, 4, 32, False, float_zero=True, k_quants=True)
    assert q.offset is not None
    params = super_params(q.scale, q.offset)
    assert params is not None and int(params.sc.max()) <= 63 and int(params.m.max()) <= 63
    scale = params.d.float().unsqueeze(-1) * params.sc.float()
    assert q.scale.dtype == torch.float32 and torch.equal(scale.reshape(8, 8), q.scale)  # d · sc, exact
    # a plain float-zero weight (Q4_1 style) is not on super-block form: refused, never approximated
    plain = quantize_weight(w, 4, 32, False, float_zero=True)
    assert plain.offset is not None and super_params(plain.scale, plain.offset) is None
    assert encode_super_blocks(plain) is None


def q4_k_source(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Weights that were themselves stored as Q4_K (fp16 d, dmin per 256; 6-bit sc, m per 32, the
    largest sc of a super-block 63 as llama.cpp's quantizer makes it; every group using levels 0
    and 15), as Gemma 3's packaged down_proj is."""
    gen = torch.Generator().manual_seed(seed)
    supers = cols // 256
    levels = torch.randint(0, 16, (rows, supers, 8, 32), generator=gen)
    levels[..., 0], levels[..., 1] = 0, 15
    sc = torch.randint(20, 64, (rows, supers, 8, 1), generator=gen)
    sc[:, :, 0] = 63
    m = torch.randint(0, 64, (rows, supers, 8, 1), generator=gen)
    m[:, :, 0] = 63
    d = (torch.rand(rows, supers, 1, 1, generator=gen) * 1e-4 + 1e-5).half().float()
    dmin = (torch.rand(rows, supers, 1, 1, generator=gen) * 1e-3).half().float()
    return (d * sc * levels - dmin * m).reshape(rows, cols)


def test_a_q4_k_source_is_reproduced_exactly():
    w = q4_k_source(16, 512, 0)
    q = quantize_weight(w, 4, 32, False, float_zero=True, k_quants=True)
    assert torch.equal(dequantize_weight(q), w)
    encoded = encode_super_blocks(q)
    assert encoded is not None and torch.equal(ggml_dequant(encoded.data, "Q4_K"), w)
    # Q4_1's fp16 scale cannot hold d · sc: the plain float-zero grid is off by fp16 rounding
    assert not torch.equal(dequantize_weight(quantize_weight(w, 4, 32, False, float_zero=True)), w)


def test_checkpoints_keep_the_float32_scales():
    from core.streaming.checkpoints import _decode, _encode

    q = quantize_weight(gaussian(8, 256, 5), 5, 32, False, float_zero=True, k_quants=True)
    back = _decode(_encode({"w": q}))["w"]
    assert back.scale.dtype == torch.float32 and torch.equal(back.scale, q.scale)
    assert back.offset is not None and q.offset is not None and torch.equal(back.offset, q.offset)
    assert torch.equal(back.codes, q.codes)


def test_super_blocks_cost_a_little_accuracy_and_half_a_bit():
    w = gaussian(64, 1024, 3)
    k = sqnr_db(w, dequantize_weight(quantize_weight(w, 4, 32, False, float_zero=True, k_quants=True)))
    q4_1 = sqnr_db(w, dequantize_weight(quantize_weight(w, 4, 32, False, float_zero=True)))
    assert q4_1 - 0.2 < k < q4_1  # measured -0.016 dB: the 6-bit sub-scales and sub-mins
    assert effective_bits(4, 32, False, 1024, float_zero=True, k_quants=True) == 4.5  # 144 bytes / 256
    assert effective_bits(5, 32, False, 1024, float_zero=True, k_quants=True) == 5.5  # 176 bytes / 256
    # dims that are not whole super-blocks keep Q4_1 / Q5_1 (and its price); 8 bits stay integer
    assert stored_bits(4, 32, False, (10, 576), True, True) == stored_bits(4, 32, False, (10, 576), True)
    assert effective_bits(8, 32, False, 1024, True, True) == effective_bits(8, 32, False, 1024)
    scheme = QuantScheme(32, float_zero=True, k_quants=True)
    assert scheme.effective_bits(4) == 4.5 and scheme.stored_bits(5, (3, 512)) == 3 * 512 * 5.5
    assert not scheme.superblocks_at(4, 576) and scheme.superblocks_at(4, 1536)
    # not on super-blocks: 576 inputs, or another group size
    w576 = gaussian(4, 576, 4)
    assert torch.equal(
        quantize_weight(w576, 4, 32, False, float_zero=True, k_quants=True).scale,
        quantize_weight(w576, 4, 32, False, float_zero=True).scale,
    )
    with pytest.raises(ValueError, match="k_quants needs float_zero or symmetric"):
        QuantScheme(32, k_quants=True)


def test_q6_k_matches_the_plain_symmetric_grid_at_fewer_bits():
    w = gaussian(64, 1024, 6)
    k = sqnr_db(w, dequantize_weight(quantize_weight(w, 6, 32, True, k_quants=True)))
    plain = sqnr_db(w, dequantize_weight(quantize_weight(w, 6, 32, True)))
    assert abs(k - plain) < 0.05  # within 0.03 dB: int8 sub-scales lose nothing visible
    assert effective_bits(6, 32, True, 1024, k_quants=True) == 6.5625  # 210 bytes / 256
    assert effective_bits(6, 32, True, 576, k_quants=True) == effective_bits(6, 32, True, 576)  # Q8_0 there
    assert not QuantScheme(32, symmetric=True, k_quants=True).superblocks_at(4, 1024)  # Q4_0 stays
    w4 = gaussian(4, 256, 1)
    assert encode_super_blocks(quantize_weight(w4, 6, 32, True)) is None  # fp16 scales: not on the form
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1024, 1024, generator=gen) @ (torch.eye(1024) + 0.1 * torch.randn(1024, 1024, generator=gen))
    h = x.T @ x / 1024
    gptq = gptq_quantize_weight(w, h, 6, 32, True, k_quants=True)
    encoded = encode_super_blocks(gptq)
    assert encoded is not None and encoded.qtype == "Q6_K"
    torch.testing.assert_close(ggml_dequant(encoded.data, "Q6_K"), dequantize_weight(gptq), rtol=0, atol=0)
    diagonal = gptq_quantize_weight(w, torch.eye(1024), 6, 32, True, k_quants=True)
    assert torch.equal(diagonal.codes, quantize_weight(w, 6, 32, True, k_quants=True).codes)


def test_gptq_on_super_blocks():
    w = gaussian(24, 512, 2, mean=0.02)
    for clip in (False, True):  # a diagonal H propagates nothing: round-to-nearest, code for code
        rtn = quantize_weight(w, 4, 32, False, clip_search=clip, float_zero=True, k_quants=True)
        gptq = gptq_quantize_weight(
            w, torch.eye(512) * 2.0, 4, 32, False, clip_search=clip, float_zero=True, k_quants=True
        )
        assert torch.equal(gptq.codes, rtn.codes) and torch.equal(gptq.scale, rtn.scale)
        assert gptq.offset is not None and rtn.offset is not None and torch.equal(gptq.offset, rtn.offset)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 512, generator=gen) @ (torch.eye(512) + 0.2 * torch.randn(512, 512, generator=gen))
    gptq = gptq_quantize_weight(w, x.T @ x / 1024, 5, 32, False, float_zero=True, k_quants=True)
    encoded = encode_super_blocks(gptq)  # the error-updated groups still land on the super-blocks
    assert encoded is not None and encoded.qtype == "Q5_K"
    torch.testing.assert_close(ggml_dequant(encoded.data, "Q5_K"), dequantize_weight(gptq), rtol=0, atol=0)

    def output_error(q):
        return float(((x @ (w - dequantize_weight(q)).T) ** 2).sum())

    assert output_error(gptq) < 0.8 * output_error(quantize_weight(w, 5, 32, False, float_zero=True, k_quants=True))


def test_spec_rules():
    base = dict(model="m", method="uniform", bit_budget={"avg_bits": 5.0}, group_size=32)
    spec = JobSpec(**base, zero_point="float", k_quants=True)
    assert spec.scheme.k_quants and [e.value for e in spec.exports] == ["gguf"]
    assert "K-quant" in spec.scheme.describe()
    with pytest.raises(ValueError, match="set zero_point 'float' or symmetric true"):
        JobSpec(**base, k_quants=True)
    with pytest.raises(
        ValueError, match="set zero_point 'float' or symmetric true"
    ):  # also where `scheme` is read first
        JobSpec(**base, k_quants=True, target_runtime="llama.cpp")
    symmetric = JobSpec(**base, symmetric=True, k_quants=True, bit_choices=[4, 6, 16])
    assert symmetric.scheme.superblocks_at(6, 256) and not symmetric.scheme.superblocks_at(4, 256)
    with pytest.raises(ValueError, match="has none"):
        JobSpec(**base, symmetric=True, k_quants=True, bit_choices=[4, 8, 16])
    with pytest.raises(ValueError, match="groups of 32"):
        JobSpec(**{**base, "group_size": 64}, zero_point="float", k_quants=True)
    with pytest.raises(ValueError, match="groups of 32"):
        JobSpec(**base, zero_point="float", k_quants=True, bit_choices=[5, 8], group_size_by_bits={5: 64})
    with pytest.raises(ValueError, match="has none"):
        JobSpec(**base, zero_point="float", k_quants=True, bit_choices=[8, 16])
    assert JobSpec(**base, zero_point="float", k_quants=True, bit_choices=[4, 8], group_size_by_bits={8: 128})


@pytest.fixture(scope="module")
def wide_source(wide_tiny_model_root):
    """The tiny Llama with an MLP of 256: its down_proj rows are whole super-blocks."""
    from core.models import resolve_model

    return resolve_model("tiny-llama", [wide_tiny_model_root], {})


#: (grid fields, bit choices, down_proj's GGUF type and up_proj's (96 inputs) per width)
JOB_GRIDS = {
    "float": ({"zero_point": "float"}, [4, 5, 16], {4: ("Q4_K", "Q4_1"), 5: ("Q5_K", "Q5_1")}),
    "symmetric": ({"symmetric": True}, [4, 6, 16], {4: ("Q4_0", "Q4_0"), 6: ("Q6_K", "Q8_0")}),
}


@pytest.mark.parametrize("grid", sorted(JOB_GRIDS))
def test_a_k_quant_job_prices_and_ships_the_codes_it_measured(grid, wide_source, tmp_path):
    fields, choices, types = JOB_GRIDS[grid]
    spec = make_spec(**fields, k_quants=True, exports=["gguf"], bit_choices=choices, bit_budget={"avg_bits": 6.0})
    job = run(spec, wide_source)
    allocation = job.outputs.allocations[0]
    scheme = spec.scheme
    stored = weights = 0
    for layer in job.outputs.profile.layers:
        for linear in layer.linears:
            assert linear.shape is not None
            stored += scheme.stored_bits(allocation.bits[layer.name], linear.shape)
            weights += linear.params
    assert allocation.effective_bits == pytest.approx(stored / weights, abs=1e-12) and stored / weights <= 6.0
    path = tmp_path / "model.gguf"
    path.write_bytes(job.store.objects["artifacts/model.gguf"])
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    checked = set()
    for layer, bits in sorted(allocation.bits.items()):
        if bits == 16:
            continue
        i = int(layer.rsplit(".", 1)[1])
        codes = load_codes(job.store, "work/layers", i, bits)
        down = tensors[f"blk.{i}.ffn_down.weight"]
        assert down.tensor_type.name == types[bits][0]
        got = torch.from_numpy(dequantize(down.data, down.tensor_type).astype(np.float32))
        assert torch.equal(got.reshape(96, 256), dequantize_weight(codes[f"{layer}.mlp.down_proj"]))
        # 96 inputs are not whole super-blocks: the legacy type of the grid
        assert tensors[f"blk.{i}.ffn_up.weight"].tensor_type.name == types[bits][1]
        checked.add(bits)
    assert any(types[b][0].endswith("_K") for b in checked)  # a K-quant width was allocated and checked
    # the submit's disk estimate counts the float32 super-block scales the checkpoints keep
    from core.disk import estimate_job_disk, group_bytes
    from core.model_dims import read_model_dims

    checkpoints = sum(len(v) for k, v in job.store.objects.items() if k.endswith(".safetensors"))
    estimate = partial(
        estimate_job_disk, read_model_dims(wide_source), bit_choices=choices, group_size=32, budgets=[6.0], formats=1
    )
    assert checkpoints <= estimate(group_param_bytes=group_bytes(float_zero=False, k_quants=True)).checkpoint_bytes
    if grid == "float":  # fp16 scale and uint8 zero would not bound float32 scales and offsets
        assert estimate(group_param_bytes=group_bytes(float_zero=False, k_quants=False)).checkpoint_bytes < checkpoints


def test_gptq_super_block_scales_do_not_depend_on_the_row_chunking(monkeypatch):
    import core.quant.gptq_sweep as gptq_sweep

    w = gaussian(24, 512, 9)
    h = torch.eye(512) + 0.1
    whole = gptq_quantize_weight(w, h, 4, 32, False, clip_search=True, float_zero=True, k_quants=True)
    monkeypatch.setattr(gptq_sweep, "_CHUNK_ELEMENTS", 5 * 512)  # chunks of 5 rows
    chunked = gptq_quantize_weight(w, h, 4, 32, False, clip_search=True, float_zero=True, k_quants=True)
    assert torch.equal(whole.codes, chunked.codes) and torch.equal(whole.scale, chunked.scale)


def test_weights_past_fp16_range_keep_a_finite_super_block_scale():
    w = gaussian(2, 256, 3) * 1e10  # group scales ~2e8: d = scale / 63 is past fp16
    for symmetric, bits in ((False, 4), (True, 6)):
        q = quantize_weight(w, bits, 32, symmetric, float_zero=not symmetric, k_quants=True)
        assert bool(torch.isfinite(q.scale).all()) and bool(torch.isfinite(dequantize_weight(q)).all())
        assert encode_super_blocks(q) is not None
