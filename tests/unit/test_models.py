"""Model resolution (security cases included), loading and the module walk/swap entry point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from core.errors import ModelNotFound, UnsafeModel, UnsupportedModel
from core.models import (
    LoadedModel,
    ModelSource,
    layer_parameter_count,
    list_models,
    load_model,
    parameter_count,
    resolve_model,
)
from core.modules import decoder_layers, decoder_stack, get_module, named_linears, set_module

pytestmark = pytest.mark.unit


def _hf_dir(path: Path, weights: str = "model.safetensors") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / weights).write_bytes(b"\0" * 8)
    return path


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    r = tmp_path / "models"
    r.mkdir()
    _hf_dir(r / "good")
    _hf_dir(r / "org" / "nested")
    (r / "Tiny.Q4_1.gguf").write_bytes(b"GGUF")
    return r


@pytest.fixture()
def empty_cache(tmp_path: Path) -> Path:
    d = tmp_path / "hf-cache"
    d.mkdir()
    return d


# ---------------------------------------------------------------------------------------------
# resolution
# ---------------------------------------------------------------------------------------------


def test_resolves_directory_gguf_and_nested(root: Path, empty_cache: Path) -> None:
    src = resolve_model("good", [root], {}, hf_cache_dir=empty_cache)
    assert (src.kind, src.path, src.gguf_file, src.weights_format) == (
        "hf_dir",
        (root / "good").resolve(),
        None,
        "safetensors",
    )
    gguf = resolve_model("Tiny.Q4_1", [root], {}, hf_cache_dir=empty_cache)
    assert (gguf.kind, gguf.gguf_file, gguf.weights_format) == ("gguf", "Tiny.Q4_1.gguf", "gguf")
    assert gguf.file == (root / "Tiny.Q4_1.gguf").resolve()
    assert resolve_model("org/nested", [root], {}, hf_cache_dir=empty_cache).path == (root / "org" / "nested").resolve()


def test_second_root_is_searched(tmp_path: Path, root: Path, empty_cache: Path) -> None:
    other = tmp_path / "other"
    _hf_dir(other / "extra")
    assert resolve_model("extra", [root, other], {}, hf_cache_dir=empty_cache).path == (other / "extra").resolve()


def test_registry_entries_win_and_may_point_anywhere(tmp_path: Path, root: Path, empty_cache: Path) -> None:
    outside = _hf_dir(tmp_path / "elsewhere" / "m")
    gguf = tmp_path / "elsewhere" / "x.gguf"
    gguf.write_bytes(b"GGUF")
    registry = {"good": outside, "my-gguf": gguf}
    assert resolve_model("good", [root], registry, hf_cache_dir=empty_cache).path == outside
    src = resolve_model("my-gguf", [root], registry, hf_cache_dir=empty_cache)
    assert (src.kind, src.path, src.gguf_file) == ("gguf", gguf.parent, "x.gguf")


@pytest.mark.parametrize(
    "bad",
    [
        "../models/good",
        "good/../good",
        "/etc",
        "~/x",
        "https://huggingface.co/x/y",
        "file:///etc/passwd",
        "s3://bucket/model",
        "a\\b",
        "./good",
        "good//x",
        "",
    ],
)
def test_unsafe_ids_are_refused(bad: str, root: Path, empty_cache: Path) -> None:
    with pytest.raises(UnsafeModel):
        resolve_model(bad, [root], {}, hf_cache_dir=empty_cache)


def test_symlink_escaping_the_root_is_refused(tmp_path: Path, root: Path, empty_cache: Path) -> None:
    outside = _hf_dir(tmp_path / "secret")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeModel, match="outside"):
        resolve_model("escape", [root], {}, hf_cache_dir=empty_cache)
    secret_gguf = tmp_path / "secret.gguf"
    secret_gguf.write_bytes(b"GGUF")
    (root / "leak.gguf").symlink_to(secret_gguf)
    with pytest.raises(UnsafeModel):
        resolve_model("leak", [root], {}, hf_cache_dir=empty_cache)
    # a weight file inside a model dir that links out is refused too
    inner = _hf_dir(root / "inner-link")
    (inner / "model.safetensors").unlink()
    (inner / "model.safetensors").symlink_to(secret_gguf)
    with pytest.raises(UnsafeModel):
        resolve_model("inner-link", [root], {}, hf_cache_dir=empty_cache)


def test_symlink_inside_the_root_is_fine(root: Path, empty_cache: Path) -> None:
    (root / "alias").symlink_to(root / "good", target_is_directory=True)
    assert resolve_model("alias", [root], {}, hf_cache_dir=empty_cache).kind == "hf_dir"


def test_pickle_weights_refused_unless_allowed(root: Path, empty_cache: Path) -> None:
    _hf_dir(root / "pickled", weights="pytorch_model.bin")
    with pytest.raises(UnsafeModel, match="pickle"):
        resolve_model("pickled", [root], {}, hf_cache_dir=empty_cache)
    src = resolve_model("pickled", [root], {}, allow_pickle=True, hf_cache_dir=empty_cache)
    assert src.weights_format == "pickle"
    # safetensors next to a .bin is fine without opt-in
    both = _hf_dir(root / "both", weights="pytorch_model.bin")
    (both / "model.safetensors").write_bytes(b"\0")
    assert resolve_model("both", [root], {}, hf_cache_dir=empty_cache).weights_format == "safetensors"


def test_missing_model_names_every_place_tried(tmp_path: Path, root: Path, empty_cache: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ModelNotFound) as info:
        resolve_model("org/absent", [root, other], {}, hf_cache_dir=empty_cache)
    message = info.value.message
    for place in ("registry", str(root / "org/absent"), str(other / "org/absent.gguf"), "Hugging Face cache"):
        assert place in message
    assert len(info.value.details["tried"]) == 6


def test_hf_cache_lookup_is_local(tmp_path: Path, root: Path) -> None:
    cache = tmp_path / "cache"
    snapshot = cache / "models--acme--tiny" / "snapshots" / "0123abcd"
    _hf_dir(snapshot)
    (cache / "models--acme--tiny" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny" / "refs" / "main").write_text("0123abcd")
    src = resolve_model("acme/tiny", [root], {}, hf_cache_dir=cache)
    assert (src.kind, src.path) == ("hf_cache", snapshot)
    with pytest.raises(ModelNotFound):
        resolve_model("acme/other", [root], {}, hf_cache_dir=cache)


def test_list_models_skips_unsafe_and_pickle(tmp_path: Path, root: Path, empty_cache: Path) -> None:
    _hf_dir(root / "pickled", weights="pytorch_model.bin")
    (root / "escape").symlink_to(_hf_dir(tmp_path / "secret"), target_is_directory=True)
    (root / "not-a-model").mkdir()
    registry = {"reg": _hf_dir(tmp_path / "reg")}
    ids = [s.model_id for s in list_models([root], registry, hf_cache_dir=empty_cache)]
    assert ids == ["reg", "Tiny.Q4_1", "good", "org/nested"]
    assert all("path" not in s.to_dict() for s in list_models([root], {}, hf_cache_dir=empty_cache))


def test_content_sha256_is_stable_and_content_sensitive(root: Path, empty_cache: Path) -> None:
    a = resolve_model("good", [root], {}, hf_cache_dir=empty_cache)
    first = a.compute_sha256()
    assert first == resolve_model("good", [root], {}, hf_cache_dir=empty_cache).compute_sha256()
    (root / "good" / "model.safetensors").write_bytes(b"\1" * 8)
    assert resolve_model("good", [root], {}, hf_cache_dir=empty_cache).compute_sha256() != first


# ---------------------------------------------------------------------------------------------
# loading and modules
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_root: Path) -> LoadedModel:
    return load_model(resolve_model("tiny-llama", [tiny_model_root], {}, hf_cache_dir=tiny_model_root / "no-cache"))


def test_load_tiny_llama_layers(tiny: LoadedModel) -> None:
    assert [r.name for r in tiny.layers] == [f"model.layers.{i}" for i in range(4)]
    ref = tiny.layers[2]
    assert sorted(n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in ref.linears) == sorted(
        [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
    )
    assert all(n.startswith("model.layers.2.") for n in ref.linears)
    # 96*96*2 (q, o) + 96*48*2 (k, v: GQA) + 96*192*3 (mlp)
    assert ref.params == 96 * 96 * 2 + 96 * 48 * 2 + 96 * 192 * 3
    assert layer_parameter_count(tiny)["model.layers.0"] == ref.params
    assert parameter_count(tiny.model) == sum(p.numel() for p in tiny.model.parameters())
    assert tiny.dtype == torch.float32 and tiny.device.type == "cpu"
    assert not tiny.model.training


def test_named_linears_get_and_set_module(tiny: LoadedModel) -> None:
    model = tiny.model
    linears = named_linears(model)
    assert "lm_head" in linears and "model.layers.3.mlp.down_proj" in linears
    assert named_linears(model, "model.layers.1") == tiny.layers[1].linears
    assert get_module(model, "model.layers.1.mlp.up_proj") is linears["model.layers.1.mlp.up_proj"]
    assert get_module(model, "") is model
    with pytest.raises(KeyError):
        get_module(model, "model.layers.9")
    original = get_module(model, "model.layers.0.mlp.up_proj")
    replacement = nn.Linear(original.in_features, original.out_features, bias=False)
    try:
        assert set_module(model, "model.layers.0.mlp.up_proj", replacement) is original
        assert model.model.layers[0].mlp.up_proj is replacement
    finally:
        set_module(model, "model.layers.0.mlp.up_proj", original)
    assert [n for n, _ in decoder_layers(model)] == [r.name for r in tiny.layers]
    assert decoder_stack(model).final_norm_name == "model.norm"


def test_module_without_decoder_layers_is_unsupported() -> None:
    with pytest.raises(UnsupportedModel):
        decoder_stack(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_unknown_architecture_is_unsupported(tmp_path: Path, tiny_llama_dir: Path) -> None:
    d = tmp_path / "weird"
    shutil.copytree(tiny_llama_dir, d)
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="definitely-not-a-model", architectures=["Nope"])
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel):
        load_model(ModelSource(model_id="weird", kind="hf_dir", path=d))
