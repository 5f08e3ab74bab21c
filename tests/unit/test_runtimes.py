"""`target_runtime`: the spec refuses menus a runtime cannot load, the load stage refuses shapes its
layout cannot carry, and a vLLM-targeted job writes a checkpoint that passes vLLM's
compressed-tensors WNA16 rules (encoded below as read from vLLM's source), where the default
asymmetric export does not."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from pipeline_helpers import make_spec, run, write_hf
from pydantic import ValidationError
from safetensors import safe_open

from core.errors import InvalidSpec
from core.runtimes import RUNTIMES, hf_strategy, shape_problems, spec_problems
from core.spec import JobSpec

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]

# ---- vLLM's rules for compressed-tensors weight-only integer checkpoints ------------------------
# vllm/model_executor/layers/quantization/compressed_tensors/schemes/compressed_tensors_wNa16.py:
# WNA16_SUPPORTED_TYPES_MAP (symmetric: uint4b8, uint8b128) and WNA16_ZP_SUPPORTED_TYPES_MAP (zero
# points: uint4, uint8); compressed_tensors.py `_is_wNa16_group_channel`: strategy group or channel,
# static, no input activations; marlin_utils.py MARLIN_SUPPORTED_GROUP_SIZES = [-1, 32, 64, 128];
# fused modules (qkv_proj, gate_up_proj) need one scheme across their shards; create_weights:
# weight_packed int32 [out, in / pack], weight_scale [out, in / group], qzeros int32
# [out / pack, in / group] (packed along the output dim).
VLLM_BITS = {4, 8}
VLLM_STRATEGIES = {"group", "channel"}
MARLIN_GROUP_SIZES = {-1, 32, 64, 128}
FUSED = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]


def vllm_problems(hf_dir: Path) -> list[str]:
    """Why vLLM would refuse to serve `hf_dir` (empty when it would serve it)."""
    config = json.loads((hf_dir / "config.json").read_text())["quantization_config"]
    problems: list[str] = []
    if config.get("quant_method") != "compressed-tensors" or config.get("format") != "pack-quantized":
        problems.append(f"not a pack-quantized compressed-tensors checkpoint: {config.get('format')}")
    scheme_of: dict[str, str] = dict.fromkeys(config["ignore"], "ignore")
    tensors = {}
    for shard in hf_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[key] = f.get_tensor(key)
    for group_name, group in config["config_groups"].items():
        w = group["weights"]
        if group.get("input_activations") is not None:
            problems.append(f"{group_name}: input activations are quantized")
        if w["type"] != "int" or w["num_bits"] not in VLLM_BITS or w.get("dynamic"):
            problems.append(f"{group_name}: {w['type']}{w['num_bits']} dynamic={w.get('dynamic')} not a WNA16 type")
        if w["strategy"] not in VLLM_STRATEGIES:
            problems.append(f"{group_name}: strategy {w['strategy']} (vLLM serves group/channel)")
            continue
        group_size = w.get("group_size") or -1
        if w["strategy"] == "group" and group_size not in MARLIN_GROUP_SIZES:
            problems.append(f"{group_name}: group_size {group_size} not in {sorted(MARLIN_GROUP_SIZES)}")
        pack = 32 // w["num_bits"]
        for target in group["targets"]:
            scheme_of[target] = group_name
            out_f, in_f = (int(v) for v in tensors[f"{target}.weight_shape"])
            groups = 1 if group_size == -1 else in_f // group_size
            if group_size != -1 and in_f % group_size:
                problems.append(f"{target}: in_features {in_f} not a multiple of group_size {group_size}")
            expected = {"weight_packed": (out_f, in_f // pack), "weight_scale": (out_f, groups)}
            if not w["symmetric"]:
                expected["weight_zero_point"] = (out_f // pack, groups)
            for suffix, shape in expected.items():
                got = tensors.get(f"{target}.{suffix}")
                if got is None or tuple(got.shape) != shape:
                    problems.append(f"{target}.{suffix}: {None if got is None else tuple(got.shape)} != {shape}")
            if tensors[f"{target}.weight_packed"].dtype != torch.int32:
                problems.append(f"{target}.weight_packed is not int32")
    for name in list(scheme_of):
        for shards in FUSED:
            if name.endswith(shards[0]):
                stem = name[: -len(shards[0])]
                schemes = {scheme_of.get(stem + s) for s in shards}
                if len(schemes) != 1:
                    shown = sorted(map(str, schemes))
                    problems.append(f"{stem}{{{','.join(shards)}}}: fused shards with schemes {shown}")
    return problems


# ---- the spec ---------------------------------------------------------------------------------
def test_default_exports_follow_the_runtime() -> None:
    fields = dict(model="m", method="uniform", bit_budget={"avg_bits": 4.5})
    assert [f.value for f in JobSpec(**fields, target_runtime="llama.cpp").exports] == ["gguf"]
    assert [f.value for f in JobSpec(**fields, target_runtime="vllm").exports] == ["hf"]
    assert [f.value for f in JobSpec(**fields, target_runtime="transformers").exports] == ["hf"]
    assert JobSpec(**fields).target_runtime is None


@pytest.mark.parametrize(
    "runtime, fields, message",
    [
        ("vllm", {"bit_choices": [2, 4, 16]}, r"remove \[2\] from bit_choices"),
        ("vllm", {"group_size": 256}, r"group_size in \[32, 64, 128\], got 256"),
        ("vllm", {"exports": ["gguf"]}, r"loads the 'hf' export; add it to exports"),
        ("llama.cpp", {"group_size": 48}, r"multiple of 32, got 48"),
        ("llama.cpp", {"bit_choices": [3, 4, 8, 16]}, r"remove \[3\]"),
        ("llama.cpp", {"exports": ["hf"]}, r"'gguf' export"),
    ],
)
def test_a_menu_the_runtime_cannot_load_is_refused(runtime: str, fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        JobSpec(model="m", method="uniform", bit_budget={"avg_bits": 4.5}, target_runtime=runtime, **fields)


def test_transformers_loads_every_menu() -> None:
    spec = JobSpec(
        model="m",
        method="uniform",
        bit_budget={"avg_bits": 4.5},
        bit_choices=[2, 3, 4, 8, 16],
        group_size=48,
        target_runtime="transformers",
    )
    assert spec.bit_choices == [2, 3, 4, 8, 16]
    assert spec_problems("transformers", bit_choices=[2, 3], group_sizes=[8], exports=["hf"]) == []


def test_shape_problems_name_a_group_size_that_fits() -> None:
    smollm2 = {"q_proj": 576, "o_proj": 576, "down_proj": 1536}
    [problem] = shape_problems("vllm", in_features=smollm2, group_sizes=[128])
    assert "in_features 576" in problem and "use group_size 64" in problem
    assert shape_problems("vllm", in_features=smollm2, group_sizes=[64]) == []
    assert shape_problems("llama.cpp", in_features=smollm2, group_sizes=[128]) == []  # Q4 blocks of 32 pad
    assert hf_strategy("vllm") == "group" and hf_strategy(None) == hf_strategy("transformers") == "auto"
    assert set(RUNTIMES) == {"vllm", "llama.cpp", "transformers"}


LLAMA_CPP_SIX = dict(symmetric=True, k_quants=True, group_size=32, bit_choices=[4, 6, 8, 16])


def test_llama_cpp_loads_6_bits_only_as_q6_k() -> None:
    fields = dict(model="m", method="uniform", bit_budget={"avg_bits": 5.0}, target_runtime="llama.cpp")
    spec = JobSpec(**fields, **LLAMA_CPP_SIX)
    assert spec.k_quant_widths == [6] and [f.value for f in spec.exports] == ["gguf"]
    # without super-blocks a 6-bit weight would be Q8_0: 8.5 bits stored where the budget counts 6.5
    with pytest.raises(ValidationError, match=r"\[4, 5, 8, 16\] \(6 with k_quants on a symmetric grid\); remove \[6\]"):
        JobSpec(**fields, **{**LLAMA_CPP_SIX, "k_quants": False})
    with pytest.raises(ValidationError, match=r"remove \[6\]"):  # k_quants' float grid stores 4/5 bits only
        JobSpec(**fields, **{**LLAMA_CPP_SIX, "symmetric": False, "zero_point": "float"})
    with pytest.raises(ValidationError, match=r"remove \[6\]"):
        JobSpec(**fields, bit_choices=[4, 6, 16], group_size=32)
    assert spec_problems("vllm", bit_choices=[6], group_sizes=[32], exports=["hf"], k_quant_widths=[6])


def test_q6_k_needs_every_linear_in_whole_super_blocks() -> None:
    smollm2 = {"model.layers.0.self_attn.q_proj": 576, "model.layers.0.mlp.down_proj": 1536}
    [problem] = shape_problems("llama.cpp", in_features=smollm2, group_sizes=[32], k_quant_widths=[6])
    assert "in_features 576" in problem and "multiples of 256" in problem and "remove [6]" in problem
    llama = {"q_proj": 4096, "down_proj": 14336}
    assert shape_problems("llama.cpp", in_features=llama, group_sizes=[32], k_quant_widths=[6]) == []
    # 4/5-bit K-quants fall back to Q4_1/Q5_1 at their own price: no shape rule
    assert shape_problems("llama.cpp", in_features=smollm2, group_sizes=[32], k_quant_widths=[4, 5]) == []


# ---- jobs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
def test_vllm_target_writes_a_checkpoint_vllm_serves(source, tmp_path: Path, symmetric: bool) -> None:
    done = run(make_spec(target_runtime="vllm", symmetric=symmetric), source, work_dir=tmp_path / "work")
    hf_dir = write_hf(done.store, "hf", tmp_path / "hf")
    assert vllm_problems(hf_dir) == []
    config = json.loads((hf_dir / "config.json").read_text())["quantization_config"]
    assert {g["weights"]["strategy"] for g in config["config_groups"].values()} == {"group"}
    assert all(g["weights"]["symmetric"] is symmetric for g in config["config_groups"].values())


def test_the_default_asymmetric_export_is_not_servable_by_vllm(source, tmp_path: Path) -> None:
    done = run(make_spec(), source, work_dir=tmp_path / "work")
    problems = vllm_problems(write_hf(done.store, "hf", tmp_path / "hf"))
    assert problems and all(re.search(r"strategy block", p) for p in problems)


def test_a_group_size_that_does_not_divide_a_width_fails_at_load(source, tmp_path: Path) -> None:
    spec = make_spec(target_runtime="vllm", group_size=64)  # the tiny Llama's widths are 96 and 192
    with pytest.raises(InvalidSpec, match=r"in_features 96.*use group_size 32"):
        run(spec, source, work_dir=tmp_path / "work")


def test_submit_checks_the_shapes_in_the_model_config(source) -> None:
    from common.jobs import check_runtime_shapes

    with pytest.raises(InvalidSpec, match=r"in_features 96.*use group_size 32"):
        check_runtime_shapes(source, make_spec(target_runtime="vllm", group_size=64))
    check_runtime_shapes(source, make_spec(target_runtime="vllm", group_size=32))
    check_runtime_shapes(source, make_spec(group_size=64))  # no target: nothing to check


def test_a_6_bit_llama_cpp_job_on_narrow_linears_fails_at_submit_and_load(source, tmp_path: Path) -> None:
    from common.jobs import check_runtime_shapes

    spec = make_spec(target_runtime="llama.cpp", exports=["gguf"], **LLAMA_CPP_SIX)
    with pytest.raises(InvalidSpec, match=r"in_features 96\).*remove \[6\] from bit_choices"):
        check_runtime_shapes(source, spec)
    with pytest.raises(InvalidSpec, match=r"in_features 96\).*remove \[6\] from bit_choices"):
        run(spec, source, work_dir=tmp_path / "work")
