"""core.export.gguf: exact block mapping of our grid, rope row order, metadata, determinism, and a
tiny Llama GGUF that transformers loads back to our dequantized weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import MIXED, make_spec, quantize_model
from gguf import GGMLQuantizationType, GGUFReader, dequantize
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.errors import ExportError
from core.export import export_gguf, export_hf
from core.export.ggml_blocks import encode_quantized, requantize
from core.export.gguf import gguf_tensor_name, rope_row_permutation
from core.quant.primitives import dequantize_weight, quantize_weight
from core.types import BitMap

pytestmark = pytest.mark.unit

TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.chat_template",
)


def gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def ggml_dequant(encoded) -> torch.Tensor:
    """Decode our bytes with gguf-py's reference dequantizer (independent of our encoder)."""
    return torch.from_numpy(dequantize(encoded.data, GGMLQuantizationType[encoded.qtype]).astype(np.float32))


# ------------------------------------------------------------------------------------------ blocks


SYMMETRIC_TYPE = {2: "Q4_0", 3: "Q4_0", 4: "Q4_0", 5: "Q5_0", 6: "Q8_0", 7: "Q8_0", 8: "Q8_0"}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_symmetric_grid_maps_exactly(bits, group_size):
    q = quantize_weight(gaussian(64, 256, bits), bits, group_size, symmetric=True)
    encoded = encode_quantized(q)
    assert encoded.qtype == SYMMETRIC_TYPE[bits]
    assert encoded.exact_blocks == encoded.total_blocks
    torch.testing.assert_close(ggml_dequant(encoded), dequantize_weight(q), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("group_size", [32, 128])
def test_asymmetric_two_and_three_bit_map_exactly_to_q4_1(bits, group_size):
    q = quantize_weight(gaussian(64, 256, bits), bits, group_size, symmetric=False)
    encoded = encode_quantized(q)
    assert encoded.qtype == "Q4_1" and encoded.exact_blocks == encoded.total_blocks
    torch.testing.assert_close(ggml_dequant(encoded), dequantize_weight(q), rtol=0, atol=0)


@pytest.mark.parametrize("bits, qtype", [(4, "Q4_1"), (5, "Q5_1")])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_asymmetric_q4_1_q5_1_are_exact_up_to_the_fp16_offset(bits, qtype, group_size):
    """d = scale and the codes carry over; only m = scale·(k − zero) is rounded to fp16, so a
    block is exact when that product is representable and otherwise off by at most half an fp16
    ulp of m (< 1 % of a quantization step at 4 bits, < 2 % at 5)."""
    q = quantize_weight(gaussian(64, 256, 7), bits, group_size, symmetric=False)
    encoded = encode_quantized(q)
    assert encoded.qtype == qtype
    assert 0 < encoded.exact_blocks <= encoded.total_blocks
    ours = dequantize_weight(q)
    diff = (ggml_dequant(encoded) - ours).abs()
    step = q.scale.float().abs().repeat_interleave(group_size, dim=1)[:, :256]
    assert bool((diff <= step * (2**bits - 1) * 2.0**-11).all())
    assert float(diff.max()) > 0  # some block's m is not representable: the bound is what is tested
    blocks_exact = (diff.reshape(64, 8, 32).amax(-1) == 0).sum().item()
    assert blocks_exact >= encoded.exact_blocks


@pytest.mark.parametrize("bits", [6, 7])
@pytest.mark.parametrize("group_size", [32, 128])
def test_asymmetric_six_and_seven_bit_map_exactly_to_q8_0(bits, group_size):
    q = quantize_weight(gaussian(64, 256, bits), bits, group_size, symmetric=False)
    encoded = encode_quantized(q)
    assert encoded.qtype == "Q8_0" and encoded.exact_blocks == encoded.total_blocks
    torch.testing.assert_close(ggml_dequant(encoded), dequantize_weight(q), rtol=0, atol=0)


def test_q5_high_bit_of_every_position_reaches_the_reference_decoder():
    """Each of the 32 positions holds a level with bit 4 set in turn, so a wrong qh bit order
    (weight j ↔ bit j) shows up as a 16-step error at that position."""
    levels = torch.full((32, 1, 32), 3, dtype=torch.int64)
    levels[torch.arange(32), 0, torch.arange(32)] = 19
    d = torch.ones(32, 1, dtype=torch.float16)
    from core.export.ggml_blocks import EncodedTensor, pack_blocks

    data = pack_blocks("Q5_0", levels, d)
    back = ggml_dequant(EncodedTensor(data=data, qtype="Q5_0", exact_blocks=32, total_blocks=32))
    torch.testing.assert_close(back, (levels.reshape(32, 32) - 16).float(), rtol=0, atol=0)


def test_asymmetric_eight_bit_q8_0_exact_where_int8_holds_the_level():
    q = quantize_weight(gaussian(64, 256, 8), 8, 128, symmetric=False)
    encoded = encode_quantized(q)
    assert encoded.qtype == "Q8_0" and 0 < encoded.exact_blocks < encoded.total_blocks
    diff = (ggml_dequant(encoded) - dequantize_weight(q)).abs().reshape(64, 8, 32).amax(-1)
    assert (diff == 0).sum().item() >= encoded.exact_blocks
    # requantized blocks: within half a Q8_0 step of the block's largest magnitude
    amax = dequantize_weight(q).abs().reshape(64, 8, 32).amax(-1)
    assert bool((diff <= amax / 127 * 0.5 + 1e-6).all())


def test_group_not_multiple_of_32_is_requantized():
    q = quantize_weight(gaussian(16, 96, 3), 4, 16, symmetric=False)
    encoded = encode_quantized(q)
    assert encoded.exact_blocks == 0 and encoded.qtype == "Q4_1"
    ours = dequantize_weight(q)
    err = (ggml_dequant(encoded) - ours).abs().reshape(16, 3, 32)
    span = ours.reshape(16, 3, 32)
    step = (span.amax(-1) - span.amin(-1)) / 15
    assert bool((err.amax(-1) <= step * 0.5 + 1e-3 * step + 1e-7).all())


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_requantizers_round_trip_through_gguf_reference(qtype):
    x = gaussian(8, 64, 11)
    encoded = requantize(x, qtype)
    back = ggml_dequant(encoded)
    levels = {"Q8_0": 255, "Q5_0": 31, "Q5_1": 31}.get(qtype, 15)
    step = (x.abs().amax() * 2) / levels
    assert float((back - x).abs().max()) <= float(step)


# ------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("rows, heads", [(96, 4), (48, 2), (576, 9), (192, 3)])
def test_rope_permutation_is_undone_by_the_transformers_gguf_loader(rows, heads):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.arange(rows * 4, dtype=torch.float32).reshape(rows, 4)
    permuted = w[rope_row_permutation(rows, heads)].numpy()
    restored = LlamaTensorProcessor()._reverse_permute_weights(permuted, heads, heads)
    np.testing.assert_array_equal(restored, w.numpy())
    assert not np.array_equal(permuted, w.numpy())


def test_pre_tokenizer_names():
    from core.export.gguf_metadata import pre_tokenizer_name

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    smollm = {
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
        }
    }
    assert pre_tokenizer_name(smollm) == "smollm"
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}) == "default"


def test_tensor_names():
    assert gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_tensor_name("model.layers.3.self_attn.o_proj.weight") == "blk.3.attn_output.weight"
    assert gguf_tensor_name("model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"
    assert gguf_tensor_name("model.norm.weight") == "output_norm.weight"
    with pytest.raises(ExportError):
        gguf_tensor_name("model.layers.0.self_attn.q_proj.bias")


# ------------------------------------------------------------------------------------------ files


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_tiny_gguf_loads_in_transformers_with_our_weights(tiny, tmp_path, symmetric):
    model, tokenizer = tiny
    bits, weights = quantize_model(model, MIXED, 32, symmetric)
    exported = export_gguf(model, tokenizer, weights, bits, make_spec(32, symmetric), tmp_path / "tiny.gguf")
    path = exported.path
    assert path == tmp_path / "tiny.gguf" and exported.name == "tiny.gguf"
    assert exported.size == path.stat().st_size

    reader = GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == ("Q4_0" if symmetric else "Q4_1")
    assert types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["blk.2.attn_q.weight"] == "F16"
    assert types["token_embd.weight"] == "F16" and types["output_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied embeddings
    assert reader.fields["general.file_type"].contents() == (2 if symmetric else 3)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert loaded.config.tie_word_embeddings
    for name, q in weights.items():
        got = loaded.get_submodule(name).weight.detach()
        ours = dequantize_weight(q)
        if symmetric:
            torch.testing.assert_close(got, ours, rtol=0, atol=0, msg=name)
        elif q.bits == 4:
            bound = float(q.scale.float().abs().max()) * 15 * 2.0**-11
            assert float((got - ours).abs().max()) <= bound, name
        else:
            assert float((got - ours).abs().max()) <= float(ours.abs().max()) / 127, name
    for name in ("model.layers.2.mlp.up_proj", "model.embed_tokens", "model.norm"):
        torch.testing.assert_close(
            loaded.get_submodule(name).weight, model.get_submodule(name).weight.half().float(), rtol=0, atol=0
        )

    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ("The capital of France is 12345.", "def f(x):\n    return x ** 2"):
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_symmetric_gguf_and_hf_exports_give_the_same_logits(tiny, tmp_path):
    model, tokenizer = tiny
    bits, weights = quantize_model(model, MIXED, 32, True)
    spec = make_spec(32, True)
    export_hf(model, tokenizer, weights, bits, spec, tmp_path / "hf")
    export_gguf(model, tokenizer, weights, bits, spec, tmp_path / "g" / "tiny.gguf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    gg = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ids = tokenizer(["The capital of France is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = hf(ids).logits, gg(ids).logits
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())


def test_tokenizer_metadata_matches_the_smollm2_gguf(tiny, tmp_path, smollm2_path):
    """The tiny model borrows SmolLM2's tokenizer, so what we write from the HF tokenizer must equal
    what llama.cpp's converter wrote into the SmolLM2 GGUF."""
    model, tokenizer = tiny
    bits, weights = quantize_model(model, MIXED, 32, False)
    path = export_gguf(model, tokenizer, weights, bits, make_spec(32, False), tmp_path / "tiny.gguf").path
    ours, theirs = GGUFReader(path).fields, GGUFReader(smollm2_path).fields
    for key in TOKENIZER_KEYS:
        assert ours[key].contents() == theirs[key].contents(), key
    # the fixture's tokenizer was rebuilt by transformers from the GGUF, which drops SmolLM's
    # "split digits" pre-tokenizer step; we describe the tokenizer we were given
    assert ours["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert ours["llama.block_count"].contents() == 4
    assert ours["llama.attention.head_count_kv"].contents() == 2
    assert ours["llama.rope.dimension_count"].contents() == 24


def test_export_is_byte_identical_and_source_metadata_round_trips(tiny, tmp_path):
    model, tokenizer = tiny
    bits, weights = quantize_model(model, MIXED, 64, False)
    spec = make_spec(64, False)
    first = export_gguf(model, tokenizer, weights, bits, spec, tmp_path / "a.gguf")
    second = export_gguf(model, tokenizer, weights, bits, spec, tmp_path / "b.gguf")
    assert first.path.read_bytes() == second.path.read_bytes() and first.sha256 == second.sha256
    # using our own file as the source copies its metadata verbatim: the same bytes again
    third = export_gguf(model, None, weights, bits, spec, tmp_path / "c.gguf", source_gguf=first.path)
    assert third.path.read_bytes() == first.path.read_bytes() and third.sha256 == first.sha256


def test_source_gguf_of_another_model_is_rejected(tiny, tmp_path, smollm2_path):
    model, tokenizer = tiny
    bits, weights = quantize_model(model, MIXED, 32, False)
    with pytest.raises(ExportError, match="does not describe this model"):
        export_gguf(
            model, tokenizer, weights, bits, make_spec(32, False), tmp_path / "x.gguf", source_gguf=smollm2_path
        )
    assert not (tmp_path / "x.gguf").exists()  # no partial file


def test_weight_checks_happen_when_the_weight_is_written(tiny, tmp_path):
    model, tokenizer = tiny
    bits, weights = quantize_model(model, MIXED, 32, False)
    with pytest.raises(ExportError, match="spec asks"):
        export_gguf(model, tokenizer, weights, bits, make_spec(64, False), tmp_path / "g" / "x.gguf")
    assert not (tmp_path / "g").exists()


def test_non_llama_models_are_rejected(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()
    with pytest.raises(ExportError, match="llama-architecture"):
        export_gguf(model, None, {}, BitMap({"model.layers.0": 16}), make_spec(32, False), tmp_path / "q.gguf")
