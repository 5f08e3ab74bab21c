"""core.export.hf: the compressed-tensors directory loads in transformers and reproduces our own
dequantized model; layout, determinism and input checks (tiny random Llama)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from export_helpers import MIXED, make_spec, quantize_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from core.errors import ExportError
from core.export import export_hf
from core.export._common import LinearPlan
from core.export.hf import choose_strategy, quantized_tensors
from core.modules import named_linears
from core.quant.primitives import dequantize_weight, quantize_weight
from core.scheme import QuantScheme
from core.types import BitMap

pytestmark = pytest.mark.unit

PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]


def reference_model(model, weights):
    """Our own dequantized model as the export stores it: quantized linears dequantized, every
    other weight rounded to float16."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for _, value in ref.state_dict().items():
            value.copy_(value.half().float())
        for name, q in weights.items():
            ref.get_submodule(name).weight.copy_(dequantize_weight(q))
    return ref


def max_logit_gap(a, b, tokenizer) -> tuple[float, float]:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        la, lb = a(**batch).logits, b(**batch).logits
    mask = batch["attention_mask"].bool()
    return float((la - lb).abs()[mask].max()), float(lb.abs()[mask].max())


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [32, 64], ids=["g32", "g64-padded"])
def test_export_loads_in_transformers_and_matches_dequantized_model(tiny, tmp_path, symmetric, group_size):
    model, tokenizer = tiny
    bits, weights = quantize_model(model, MIXED, group_size, symmetric)
    export_hf(model, tokenizer, weights, bits, make_spec(group_size, symmetric), tmp_path / "hf")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    gap, scale = max_logit_gap(loaded, reference_model(model, weights), tokenizer)
    assert gap <= 1e-3 * scale, f"logits differ by {gap} (scale {scale})"


@pytest.mark.parametrize("widths", [(2, 3, 16, 8), (5, 6, 7, 4)], ids=["2-3-16-8", "5-6-7-4"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_two_to_seven_bit_layers_load_exactly(tiny, tmp_path, symmetric, widths):
    model, tokenizer = tiny
    bits, weights = quantize_model(model, widths, 32, symmetric)
    export_hf(model, tokenizer, weights, bits, make_spec(32, symmetric), tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    gap, scale = max_logit_gap(loaded, reference_model(model, weights), tokenizer)
    assert gap <= 1e-3 * scale


def test_all_sixteen_bit_map_exports_a_plain_float16_model(tiny, tmp_path):
    model, tokenizer = tiny
    bits, weights = quantize_model(model, (16, 16, 16, 16), 32, False)
    assert weights == {}
    export_hf(model, tokenizer, weights, bits, make_spec(32, False), tmp_path / "hf")
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    gap, scale = max_logit_gap(loaded, reference_model(model, {}), tokenizer)
    assert gap <= 1e-3 * scale


def test_config_groups_target_exactly_the_linears_of_each_width(tiny, tmp_path):
    model, tokenizer = tiny
    bits, weights = quantize_model(model, MIXED, 32, False)
    files = export_hf(model, tokenizer, weights, bits, make_spec(32, False), tmp_path / "hf")
    assert {f.name for f in files} >= {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert [f.name for f in files] == sorted(f.name for f in files)
    assert all(f.path == tmp_path / "hf" / f.name for f in files)
    assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()  # one file below the shard size

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    assert set(qc["config_groups"]) == {"int4", "int8"}
    for width, group in qc["config_groups"].items():
        expected = [n for n, q in weights.items() if q.bits == int(width[3:])]
        assert group["targets"] == expected
        assert group["weights"]["num_bits"] == int(width[3:])
        assert group["weights"]["type"] == "int" and group["weights"]["symmetric"] is False
    kept = list(named_linears(model, "model.layers.2"))
    assert qc["ignore"] == kept + ["lm_head"]
    assert config["tie_word_embeddings"] is True and config["dtype"] == "float16"
    assert "_name_or_path" not in config

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys  # tied: stored once, as the embedding
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
        assert f.get_tensor("model.layers.2.self_attn.q_proj.weight").dtype == torch.float16
        assert f.get_tensor("model.norm.weight").dtype == torch.float16
        name = "model.layers.0.mlp.down_proj"
        assert f"{name}.weight" not in keys
        assert f.get_tensor(f"{name}.weight_packed").dtype == torch.int32
        assert f.get_tensor(f"{name}.weight_scale").dtype == torch.float16
        assert f.get_tensor(f"{name}.weight_shape").tolist() == [96, 192]


def test_export_is_byte_identical_across_runs(tiny, tmp_path):
    model, tokenizer = tiny
    bits, weights = quantize_model(model, MIXED, 64, False)
    spec = make_spec(64, False)
    first = export_hf(model, tokenizer, weights, bits, spec, tmp_path / "a")
    second = export_hf(model, tokenizer, weights, bits, spec, tmp_path / "b")
    assert [f.name for f in first] == [f.name for f in second]
    for a, b in zip(first, second):
        assert a.path.read_bytes() == b.path.read_bytes(), a.name
        assert (a.size, a.sha256) == (b.size, b.sha256)


def test_strategy_choice():
    plans = [
        LinearPlan(name="x", layer="l", bits=4, shape=(8, 96)),
        LinearPlan(name="y", layer="l", bits=16, shape=(8, 100)),
    ]
    assert choose_strategy(plans, QuantScheme(32, symmetric=True)) == "group"
    assert choose_strategy(plans, QuantScheme(32)) == "block"  # transformers can't load asym group
    assert choose_strategy(plans, QuantScheme(64, symmetric=True)) == "block"  # 64 does not divide 96
    assert choose_strategy(plans, QuantScheme(32), "group") == "group"
    assert choose_strategy(plans[1:], QuantScheme(64, symmetric=True)) == "group"  # nothing quantized
    with pytest.raises(ExportError, match="divide"):
        choose_strategy(plans, QuantScheme(64, symmetric=True), "group")
    with pytest.raises(ExportError, match="unknown"):
        choose_strategy(plans, QuantScheme(32, symmetric=True), "tiles")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_group_layout_decompresses_with_compressed_tensors(tiny, bits):
    """The vLLM layout (group strategy, asymmetric: zero points packed along the output dim)
    decompresses in compressed-tensors to exactly our dequantized weight."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    model, _ = tiny
    weight = model.get_submodule("model.layers.0.mlp.gate_proj").weight.detach()
    q = quantize_weight(weight, bits, 32, symmetric=False)
    tensors = quantized_tensors(q, "group")
    assert tensors["weight_zero_point"].dtype == torch.int32
    assert tuple(tensors["weight_zero_point"].shape) == (-(-192 * bits // 32), 3)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=32),
    )
    # compressed-tensors dequantizes in the scale's dtype; a float32 model (as transformers loads
    # it with dtype=float32) holds float32 scales, where scale * (code - zero) is exact
    tensors["weight_scale"] = tensors["weight_scale"].float()
    out = PackedQuantizationCompressor.decompress(dict(tensors), scheme)
    torch.testing.assert_close(out["weight"], dequantize_weight(q), rtol=0, atol=0)


def test_block_layout_decompresses_padded_groups_with_compressed_tensors(tiny):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    model, _ = tiny
    weight = model.get_submodule("model.layers.0.self_attn.o_proj").weight.detach()  # in 96, g 64: padded
    q = quantize_weight(weight, 4, 64, symmetric=False)
    tensors = quantized_tensors(q, "block")
    assert tensors["weight_zero_point"].dtype == torch.int8 and tuple(tensors["weight_scale"].shape) == (96, 2)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="block", block_structure=[1, 64]),
    )
    tensors["weight_scale"] = tensors["weight_scale"].float()
    out = PackedQuantizationCompressor.decompress(dict(tensors), scheme)
    torch.testing.assert_close(out["weight"], dequantize_weight(q), rtol=0, atol=0)


def test_inconsistent_inputs_are_export_errors(tiny, tmp_path):
    model, tokenizer = tiny
    bits, weights = quantize_model(model, MIXED, 32, False)
    spec = make_spec(32, False)

    missing = dict(weights)
    missing.pop("model.layers.0.self_attn.q_proj")
    with pytest.raises(ExportError, match="no quantized weight"):
        export_hf(model, tokenizer, missing, bits, spec, tmp_path / "a")

    extra = dict(weights)
    extra["model.layers.2.self_attn.q_proj"] = weights["model.layers.0.self_attn.q_proj"]
    with pytest.raises(ExportError, match="keeps it at 16 bits"):
        export_hf(model, tokenizer, extra, bits, spec, tmp_path / "b")

    with pytest.raises(ExportError, match="no width"):
        export_hf(
            model,
            tokenizer,
            weights,
            BitMap({k: v for k, v in bits.bits.items() if k != "model.layers.3"}),
            spec,
            tmp_path / "c",
        )

    # checked when each weight is loaded, mid-write: the partial directory is removed
    with pytest.raises(ExportError, match="spec asks"):
        export_hf(model, tokenizer, weights, bits, make_spec(64, False), tmp_path / "d")

    wrong_width = BitMap(dict(bits.bits, **{"model.layers.0": 8}))
    with pytest.raises(ExportError, match="quantized at 4 bits"):
        export_hf(model, tokenizer, weights, wrong_width, spec, tmp_path / "e")

    bad_shape = dict(weights)
    name = "model.layers.1.mlp.up_proj"
    bad_shape[name] = quantize_weight(torch.randn(192, 64), 8, 32, False)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="quantized shape"):
        export_hf(model, tokenizer, bad_shape, bits, spec, tmp_path / "f")
    for d in "ade":
        assert not (tmp_path / d).exists()
    # a directory that existed keeps what was there, loses what the failed export wrote
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["keep.txt"]
