"""Memory preflight estimate (core.memory): exact parameter and Hessian sizes on known shapes,
checked against the real model objects and the packaged SmolLM2 GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.calibration import HessianCollector, make_batches, run_fp_pass
from core.memory import RUNTIME_BYTES, ModelDims, estimate_job_memory, gguf_model_dims, read_model_dims
from core.models import ModelSource, load_model, parameter_count

pytestmark = pytest.mark.unit

# HuggingFaceTB/SmolLM2-135M-Instruct config.json (the fields the estimate reads)
SMOLLM2_CONFIG = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                  "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                  "vocab_size": 49152, "tie_word_embeddings": True}
SMOLLM2_PARAMS = 134_515_008
# per layer, float32: q/k/v input 576², o_proj input (9·64)², gate/up input 576², down input 1536²
SMOLLM2_HESSIAN_BYTES = 30 * 4 * (576 * 576 * 3 + 1536 * 1536)


def test_smollm2_config_gives_exact_parameters_and_hessians() -> None:
    dims = ModelDims.from_config(SMOLLM2_CONFIG)
    assert dims.head_dim == 64 and dims.attention_width == 576
    assert dims.parameters == SMOLLM2_PARAMS
    est = estimate_job_memory(dims, method="taq", calibration_rows=256, max_tokens=256)
    assert est.parameters == SMOLLM2_PARAMS
    assert est.weights_bytes == SMOLLM2_PARAMS * 4 == 538_060_032  # float32 on a CPU worker
    assert est.hessian_bytes == SMOLLM2_HESSIAN_BYTES == 402_554_880
    assert est.runtime_bytes == RUNTIME_BYTES and est.evaluation_bytes == 0
    assert sum(est.breakdown.values()) == est.total_bytes
    assert 1.4 < est.total_gib < 2.0
    assert est.to_dict()["breakdown"] == est.breakdown


def test_packaged_gguf_header_matches_the_config(smollm2_path: Path) -> None:
    dims = gguf_model_dims(smollm2_path)
    config_dims = ModelDims.from_config(SMOLLM2_CONFIG)
    assert dims.exact_parameters == SMOLLM2_PARAMS  # counted from the tensor shapes
    assert (dims.hidden_size, dims.intermediate_size, dims.num_layers, dims.num_heads, dims.num_kv_heads,
            dims.head_dim, dims.vocab_size, dims.tie_word_embeddings) == (576, 1536, 30, 9, 3, 64, 49152, True)
    assert dims.hessian_elements_per_layer == config_dims.hessian_elements_per_layer
    source = ModelSource(model_id="smollm2", kind="gguf", path=smollm2_path.parent, gguf_file=smollm2_path.name,
                         weights_format="gguf")
    assert read_model_dims(source) == dims


def test_terms_follow_method_device_rows_and_evaluation() -> None:
    dims = ModelDims.from_config(SMOLLM2_CONFIG)
    base = dict(calibration_rows=256, max_tokens=256)
    taq = estimate_job_memory(dims, method="taq", **base)
    kl = estimate_job_memory(dims, method="taq_kl", **base)
    taqo = estimate_job_memory(dims, method="taqo", **base)
    assert kl.activation_bytes > taqo.activation_bytes > taq.activation_bytes  # cached inputs, logits
    # taqo: 2 cached hidden states of every token + 3 logit buffers of one 2048-token batch on top of taq
    assert taqo.activation_bytes - taq.activation_bytes == 2 * 256 * 256 * 576 * 4 + 3 * 2048 * 49152 * 4
    no_rows = estimate_job_memory(dims, method="uniform", calibration_rows=0, max_tokens=256)
    assert no_rows.hessian_bytes == 0 and no_rows.activation_bytes == 0
    cuda = estimate_job_memory(dims, method="taq", weight_bytes=2, batch_tokens=16384, **base)
    assert cuda.weights_bytes * 2 == taq.weights_bytes and cuda.hessian_bytes == taq.hessian_bytes
    evaluated = estimate_job_memory(dims, method="taq", evaluates=True, **base)
    assert evaluated.evaluation_bytes == 2 * taq.weights_bytes
    huge = estimate_job_memory(dims, method="taq_kl", calibration_rows=4096, max_tokens=8192)
    assert huge.total_gib > 200  # the cached layer inputs of 33M tokens alone
    with pytest.raises(ValueError):
        estimate_job_memory(dims, method="taq", weight_bytes=3, **base)


def test_attention_width_and_nested_text_config() -> None:
    # Gemma 3 270M: 4 heads of 256 on a 640-wide model, so o_proj's input is 1024, not 640
    gemma = {"text_config": {"hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
                             "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                             "vocab_size": 262144}, "tie_word_embeddings": True}
    dims = ModelDims.from_config(gemma)
    assert dims.attention_width == 1024
    assert dims.hessian_elements_per_layer == 640 * 640 * 2 + 1024 * 1024 + 2048 * 2048
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelDims.from_config({"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1,
                               "vocab_size": 10})


def test_estimate_matches_the_real_tiny_model(tiny_llama_dir: Path) -> None:
    """Parameters and Hessian bytes equal what the loaded model and HessianCollector really hold."""
    source = ModelSource(model_id="tiny-llama", kind="hf_dir", path=tiny_llama_dir)
    dims = read_model_dims(source)
    assert dims == ModelDims.from_config(json.loads((tiny_llama_dir / "config.json").read_text()))
    loaded = load_model(source, device="cpu")
    assert dims.parameters == parameter_count(loaded.model)
    hessians = HessianCollector(loaded)
    run_fp_pass(loaded, make_batches([[1, 5, 9, 13], [2, 6]], 0, "cpu"), hessians=hessians)
    held = sum(t.numel() * t.element_size() for t in hessians.sums.values())
    assert all(t.dtype == torch.float32 for t in hessians.sums.values())
    est = estimate_job_memory(dims, method="taq", calibration_rows=2, max_tokens=4)
    assert est.hessian_bytes == held
