"""Memory preflight estimate (core.memory) of the streaming pipeline: exact parameter counts and
per-layer terms on known shapes, checked against the real model objects and the packaged SmolLM2
GGUF. The estimate against measured peaks is tests/slow/test_memory_peak.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.memory import RUNTIME_BYTES, estimate_job_memory, generation_bytes
from core.model_dims import ModelDims, gguf_model_dims, read_model_dims
from core.models import ModelSource, load_model, parameter_count

pytestmark = pytest.mark.unit

# HuggingFaceTB/SmolLM2-135M-Instruct config.json (the fields the estimate reads)
SMOLLM2_CONFIG = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
SMOLLM2_PARAMS = 134_515_008
LLAMA_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}


def test_smollm2_config_gives_exact_parameters_and_layer_terms() -> None:
    dims = ModelDims.from_config(SMOLLM2_CONFIG)
    assert dims.head_dim == 64 and dims.attention_width == 576
    assert dims.parameters == SMOLLM2_PARAMS
    assert dims.linear_inputs == [576, 576, 576, 1536]
    est = estimate_job_memory(dims, method="taq", calibration_rows=256, max_tokens=256)
    assert est.parameters == SMOLLM2_PARAMS and est.phase in est.phases
    assert est.runtime_bytes == RUNTIME_BYTES
    assert sum(est.breakdown.values()) == est.total_bytes == max(est.phases.values()) + RUNTIME_BYTES
    assert est.to_dict()["breakdown"] == est.breakdown
    # one layer at float32, never the model: 3,538,944 linear weights
    assert dims.layer_linear_parameters == 3_538_944
    assert est.phases["layer pass"] < 1 << 30
    assert est.assumptions["method"] == "taq" and est.assumptions["calibration_rows"] == 256


def test_layer_terms_by_hand() -> None:
    dims = ModelDims.from_config(SMOLLM2_CONFIG)
    est = estimate_job_memory(
        dims, method="taq", calibration_rows=4, max_tokens=100, activation_ram_bytes=0, widths=2, group_size=128
    )
    phases = est.phases
    tokens = 400
    inputs = 4 * (min(tokens, 576) * 576 * 3 + min(tokens, 1536) * 1536)  # X rows: fewer tokens than features
    layer = 3_538_944
    codes = 2 * (layer + layer // 128 * 4) + 4 * dims.largest_linear * 4
    assert phases["layer pass"] >= layer * 4 + inputs + codes
    gptq = estimate_job_memory(
        dims, method="taq", calibration_rows=4, max_tokens=100, activation_ram_bytes=0, quantizer="gptq"
    )
    # GPTQ's worst group, down_proj here: its float64 factor built in place (plus the float32 H
    # while converting, then the factor's float32 copy) and the sweep over its rows (float32 working
    # copy, uint8 codes three times); gate/up's sweep is larger, its factor smaller.
    # It replaces the error measurement's temporaries, which come after it.
    down, gate_up = 1536 * 1536 * (8 + 4) + 1536 * 576 * (4 + 3), 576 * 576 * 12 + 576 * 3072 * 7
    assert dims.gptq_groups == [(576, 960), (576, 576), (576, 3072), (1536, 576)] and down > gate_up
    errors = 4 * dims.largest_linear * 4
    assert gptq.phases["layer pass"] - phases["layer pass"] == down - errors > 0


def test_terms_follow_method_device_rows_and_evaluation() -> None:
    dims = ModelDims.from_config(SMOLLM2_CONFIG)
    base = dict(calibration_rows=256, max_tokens=256, activation_ram_bytes=64 << 30)
    taq = estimate_job_memory(dims, method="taq", **base)
    kl = estimate_job_memory(dims, method="taq_kl", **base)
    taqo = estimate_job_memory(dims, method="taqo", **base)
    # probe streams: one per layer by the last layer (taq_kl: prompts; taqo: prompts + answers)
    assert kl.phases["layer pass"] > taq.phases["layer pass"] and taqo.phases["layer pass"] > taq.phases["layer pass"]
    assert "scoring head" in kl.phases and "scoring head" in taqo.phases and "scoring head" not in taq.phases
    grad = estimate_job_memory(dims, method="taq_grad", **base)
    # taq_grad keeps every layer's input (prompts + answers) and sweeps the layers back once
    assert grad.phases["layer pass"] == taqo.phases["layer pass"]
    assert "gradient sweep" in grad.phases and "gradient sweep" not in taqo.phases
    assert grad.phases["gradient sweep"] > taq.phases["layer pass"]
    looped = estimate_job_memory(dims, method="taq_grad", closed_loop=True, **base)
    assert "closed loop" in looped.phases and "closed loop" not in grad.phases
    assert looped.phases["closed loop"] > 0 and looped.assumptions["closed_loop"] is True
    capped = estimate_job_memory(
        dims, method="taq_kl", calibration_rows=256, max_tokens=256, activation_ram_bytes=1 << 30
    )
    assert capped.phases["layer pass"] < kl.phases["layer pass"]  # spilled beyond the RAM limit
    no_rows = estimate_job_memory(dims, method="uniform", calibration_rows=0, max_tokens=256)
    assert "linear_inputs" not in no_rows.terms and no_rows.phases["layer pass"] < taq.phases["layer pass"]
    cuda = estimate_job_memory(dims, method="taq", weight_bytes=2, batch_tokens=16384, **base)
    assert cuda.phases["layer pass"] != taq.phases["layer pass"]
    evaluated = estimate_job_memory(dims, method="taq", evaluates=True, eval_rows=64, **base)
    assert "evaluation" in evaluated.phases and "evaluation" not in taq.phases
    generating = estimate_job_memory(dims, method="taq", evaluates=True, eval_rows=64, generation=True, **base)
    assert generating.generation_bytes == generation_bytes(dims, max_tokens=256, weight_bytes=4)
    # the whole model, the KV cache of 16 prompts of 256 + 32 tokens (30 layers, 3 KV heads of 64)
    kv = 2 * 30 * 3 * 64 * 16 * 288 * 4
    assert generating.generation_bytes > SMOLLM2_PARAMS * 4 + kv
    assert generating.total_bytes >= generating.generation_bytes + RUNTIME_BYTES
    # the closed loop's answers check generates too, evaluated or not
    few = dict(base, calibration_rows=8)
    loop_generating = estimate_job_memory(dims, method="taq", closed_loop=True, generation=True, **few)
    assert loop_generating.phase == "generation"
    assert estimate_job_memory(dims, method="taq", closed_loop=True, **few).phase != "generation"
    with pytest.raises(ValueError):
        estimate_job_memory(dims, method="taq", weight_bytes=3, **base)


def test_an_8b_model_fits_a_small_worker_when_streamed() -> None:
    """The whole-model estimate was 69 GiB for a plain taq job on an 8B model; streaming holds one
    layer (0.8 GiB at float32), its inputs and codes, and the largest tensor during export."""
    dims = ModelDims.from_config(LLAMA_8B)
    assert dims.parameters == 8_030_261_248
    rtn = estimate_job_memory(dims, method="taq", calibration_rows=8, max_tokens=128, source_bytes=2)
    gptq = estimate_job_memory(dims, method="taq", calibration_rows=8, max_tokens=128, quantizer="gptq", source_bytes=2)
    assert rtn.total_gib < 4.5 and gptq.total_gib < 6.0  # issue 12: ≤ 6 GiB for GPTQ
    assert gptq.phase == "layer pass"
    # one [in, in] matrix per factorisation, in place, and the block update in place: down_proj
    # (float32 factor of 14336 inputs, 4096 rows) outweighs gate/up (float64 factor of 4096
    # inputs, the sweep over 28672 rows)
    gate_up, down = 4096**2 * 12 + 4096 * 28672 * 7, 14336**2 * 4 + 14336 * 4096 * 7
    assert gptq.terms["gptq"] == down > gate_up and "error_measure" not in gptq.terms
    assert rtn.phases["layer pass"] + down - 4 * dims.largest_linear * 4 == gptq.phases["layer pass"]
    assert rtn.phases["export"] == 128256 * 4096 * 2 + dims.largest_linear * 8 + 128256 * 1024


def test_packaged_gguf_header_matches_the_config(smollm2_path: Path) -> None:
    dims = gguf_model_dims(smollm2_path)
    config_dims = ModelDims.from_config(SMOLLM2_CONFIG)
    assert dims.exact_parameters == SMOLLM2_PARAMS  # counted from the tensor shapes
    assert (
        dims.hidden_size,
        dims.intermediate_size,
        dims.num_layers,
        dims.num_heads,
        dims.num_kv_heads,
        dims.head_dim,
        dims.vocab_size,
        dims.tie_word_embeddings,
    ) == (576, 1536, 30, 9, 3, 64, 49152, True)
    assert dims.hessian_elements_per_layer == config_dims.hessian_elements_per_layer
    source = ModelSource(
        model_id="smollm2", kind="gguf", path=smollm2_path.parent, gguf_file=smollm2_path.name, weights_format="gguf"
    )
    assert read_model_dims(source) == dims


def test_attention_width_and_nested_text_config() -> None:
    # Gemma 3 270M: 4 heads of 256 on a 640-wide model, so o_proj's input is 1024, not 640
    gemma = {
        "text_config": {
            "hidden_size": 640,
            "intermediate_size": 2048,
            "num_hidden_layers": 18,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "vocab_size": 262144,
        },
        "tie_word_embeddings": True,
    }
    dims = ModelDims.from_config(gemma)
    assert dims.attention_width == 1024
    assert dims.hessian_elements_per_layer == 640 * 640 * 2 + 1024 * 1024 + 2048 * 2048
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelDims.from_config({"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 10})


def test_estimate_matches_the_real_tiny_model(tiny_llama_dir: Path) -> None:
    """Parameters equal the loaded model's; the per-input record sizes equal what LayerInputs holds."""
    from core.quant.layer import LayerInputs

    source = ModelSource(model_id="tiny-llama", kind="hf_dir", path=tiny_llama_dir)
    dims = read_model_dims(source)
    assert dims == ModelDims.from_config(json.loads((tiny_llama_dir / "config.json").read_text()))
    loaded = load_model(source, device="cpu")
    assert dims.parameters == parameter_count(loaded.model)
    ref = loaded.layers[0]
    for tokens in (6, 500):  # X rows (fewer tokens than features) and X^T X
        inputs = LayerInputs(ref.linears, tokens)
        hidden = torch.randn(1, tokens, dims.hidden_size)
        inputs.set_batch(torch.ones(1, tokens, dtype=torch.bool))
        with inputs.recording(), torch.no_grad():
            ref.module(hidden, position_embeddings=loaded.model.model.rotary_emb(hidden, torch.arange(tokens)[None]))
        held = sum(sum(t.numel() * t.element_size() for t in parts) for parts in inputs.rows.values())
        held += sum(t.numel() * t.element_size() for t in inputs.sums.values())
        assert held == sum(min(tokens, n) * n * 4 for n in dims.linear_inputs)
