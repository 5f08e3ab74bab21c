"""bench/bench_scale.py: the streamed random-weight Llama checkpoints (shards, index, loading) and
the report. The service run itself is a benchmark, not a test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.bench_scale import complete, markdown, table  # noqa: E402
from bench.scale_models import INDEX, SHAPES, plan_shards, shard_name, tensor_specs, verify_headers, write_checkpoint  # noqa: E402

pytestmark = pytest.mark.unit


def test_shards_are_filled_in_order_and_an_oversized_tensor_sits_alone() -> None:
    specs = [("a", (10,)), ("b", (10,)), ("c", (100,)), ("d", (5,)), ("e", (5,))]  # bf16: 20, 20, 200, 10, 10 B
    assert plan_shards(specs, 50) == [[0, 1], [2], [3, 4]]
    assert plan_shards(specs, 10_000) == [[0, 1, 2, 3, 4]]
    assert shard_name(0, 3) == "model-00001-of-00003.safetensors"


def test_real_shapes_have_the_llama_parameter_counts() -> None:
    count = lambda key: sum(torch.Size(d).numel() for _, d in tensor_specs(SHAPES[key]))  # noqa: E731
    assert count("8b") == 8_030_261_248  # Llama-3.1-8B
    assert count("1b") == 1_235_814_400  # Llama-3.2-1B (tied)


def test_tiny_checkpoint_shards_index_and_loads(tmp_path: Path, smollm2_tokenizer_dir: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    max_bytes = 100_000
    summary = write_checkpoint(
        "tiny", tmp_path, max_shard_bytes=max_bytes, tokenizer_dir=smollm2_tokenizer_dir, log=lambda *_: None
    )
    directory = tmp_path / "llama-tiny-shape"
    assert summary["written"] and summary["num_shards"] > 2
    index = json.loads((directory / INDEX).read_text())
    files = sorted(directory.glob("*.safetensors"))
    assert [f.name for f in files] == [shard_name(i, len(files)) for i in range(len(files))]
    assert sorted(set(index["weight_map"].values())) == [f.name for f in files]
    specs = dict(tensor_specs(SHAPES["tiny"]))
    assert set(index["weight_map"]) == set(specs)
    assert index["metadata"]["total_size"] == sum(2 * torch.Size(d).numel() for d in specs.values())
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            sizes = [2 * torch.Size(st.get_slice(k).get_shape()).numel() for k in st.keys()]  # noqa: SIM118 - safe_open: no __iter__
        assert len(sizes) == 1 or sum(sizes) <= max_bytes
    assert summary["size_bytes"] == sum(f.stat().st_size for f in files)
    assert verify_headers(directory, max_shard_bytes=max_bytes)["ok"]
    assert not verify_headers(directory, max_shard_bytes=max_bytes // 10)["ok"]

    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = model.config
    assert (config.hidden_size, config.num_key_value_heads, config.tie_word_embeddings) == (64, 2, True)
    assert config.bos_token_id == 1 and config.eos_token_id == 2 and config.pad_token_id == 2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.bfloat16))
    std = model.model.layers[1].mlp.down_proj.weight.float().std().item()
    assert 0.019 < std < 0.021
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert len(tokenizer) == 49152
    with torch.no_grad():
        logits = model(**tokenizer("The capital of France is", return_tensors="pt")).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()

    # complete and matching: skipped; another shard size: rewritten with identical tensors
    again = write_checkpoint(
        "tiny", tmp_path, max_shard_bytes=max_bytes, tokenizer_dir=smollm2_tokenizer_dir, log=lambda *_: None
    )
    assert not again["written"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one = write_checkpoint("tiny", tmp_path, tokenizer_dir=smollm2_tokenizer_dir, log=lambda *_: None)
    assert one["written"] and one["num_shards"] == 1 and len(list(directory.glob("*.safetensors"))) == 1
    reloaded = AutoModelForCausalLM.from_pretrained(directory).state_dict()
    assert all(torch.equal(before[k], reloaded[k]) for k in before)


def test_report_has_every_column_with_and_without_reported_memory() -> None:
    job = {
        "shape": "tiny",
        "quantizer": "rtn",
        "rows": 8,
        "max_tokens": 128,
        "status": "succeeded",
        "wall_s": 12.3,
        "timings": {"load": 1.0, "quantize": 2.5},
        "reported": None,
        "sampled": {"peak_rss_bytes": 3 << 30, "peak_rss_by_stage": {"load": 2 << 30}},
    }
    results = {
        "jobs": [
            complete(dict(job), 1 << 30),
            complete({**job, "quantizer": "gptq", "reported": {"peak_rss_bytes": 4 << 30}}, 1 << 30),
        ],
        "machine": {"nproc": 2, "cpu_model": "x", "mem_total_bytes": 24 << 30, "torch_threads_worker_env": 2},
        "service": {"worker_memory_bytes": 20 << 30},
        "command": "python bench/bench_scale.py run",
        "started_at": "2026-11-29T00:00:00+00:00",
        "checkpoint": {"name": "llama-tiny-shape", "parameters": 3_268_928, "num_shards": 1},
    }
    assert results["jobs"][0]["rss_over_checkpoint"] == 3.0 and results["jobs"][0]["peak_rss_source"] == "sampled"
    assert results["jobs"][1]["rss_over_checkpoint"] == 4.0 and results["jobs"][1]["peak_rss_source"] == "reported"
    rows = table(results).splitlines()
    assert len(rows) == 4 and all(row.count("|") == 20 for row in rows)  # 19 columns
    assert "4.00 (s 3.00)" in rows[3] and "3.00 (s)" in rows[2]
    assert "Peak RSS per stage" in markdown(results)
