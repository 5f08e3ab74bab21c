"""core.export.manifest: hashes, content, byte-identical reruns, and honest stored sizes."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from export_helpers import MIXED, quantize_model
from export_helpers import make_spec as _make_spec

from core.export import build_manifest, export_gguf, export_hf, file_sha256, library_versions, write_manifest
from core.export.manifest import hf_storage
from core.scheme import effective_bits

pytestmark = pytest.mark.unit


def make_spec(group_size: int, symmetric: bool):
    return _make_spec(group_size, symmetric, seed=7, bit_choices=[4, 8, 16])


def allocator_bits(weights, group_size, symmetric) -> float:
    """Σ n·eff(b) / Σ n over the quantized linears, as the allocator counts it."""
    n = sum(math.prod(q.shape) for q in weights.values())
    return sum(math.prod(q.shape) * effective_bits(q.bits, group_size, symmetric) for q in weights.values()) / n


def test_file_sha256_streams(tmp_path):
    data = bytes(range(256)) * 5000
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert file_sha256(path, chunk_size=4096) == hashlib.sha256(data).hexdigest()


def test_library_versions_name_the_artifact_libraries():
    versions = library_versions()
    assert set(versions) >= {"torch", "transformers", "compressed-tensors", "gguf", "taq-service"}
    assert versions["torch"].startswith(torch.__version__.split("+")[0])


def export_all(tiny, root: Path, group_size=32, symmetric=True):
    model, tokenizer = tiny
    bits, weights = quantize_model(model, MIXED, group_size, symmetric)
    spec = make_spec(group_size, symmetric)
    hf_files = export_hf(model, tokenizer, weights, bits, spec, root / "hf")
    gguf = export_gguf(model, tokenizer, weights, bits, spec, root / "model.gguf")
    files = [(f"hf/{f.name}", f.path) for f in hf_files] + [("model.gguf", gguf.path)]
    return spec, bits, weights, files


def test_manifest_content_and_byte_identical_rerun(tiny, tmp_path):
    spec, bits, weights, files = export_all(tiny, tmp_path / "a")
    versions = {"torch": "x", "gguf": "y"}
    reported = allocator_bits(weights, 32, True)
    manifest = build_manifest(spec, "tiny-llama", "ab" * 32, bits, reported, files, versions)

    assert manifest["spec"] == spec.model_dump(mode="json") and manifest["seed"] == 7
    assert manifest["source"] == {"model_id": "tiny-llama", "sha256": "ab" * 32}
    assert manifest["library_versions"] == versions
    assert manifest["bits_by_layer"] == bits.bits
    names = [f["name"] for f in manifest["files"]]
    assert names == sorted(names) and "hf/model.safetensors" in names and "model.gguf" in names
    for entry, (_, path) in zip(manifest["files"], sorted(files)):
        assert entry == {"name": entry["name"], "size": path.stat().st_size, "sha256": file_sha256(path)}
    assert manifest["effective_bits"]["allocator"] == reported
    assert set(manifest["effective_bits"]["stored"]) == {"hf", "model.gguf"}
    text = json.dumps(manifest)
    assert "/tmp" not in text and str(tmp_path) not in text  # no host paths

    first = write_manifest(tmp_path / "a", manifest)
    # a second export of the same inputs gives the same manifest bytes
    spec2, bits2, weights2, files2 = export_all(tiny, tmp_path / "b")
    second = write_manifest(
        tmp_path / "b",
        build_manifest(spec2, "tiny-llama", "ab" * 32, bits2, allocator_bits(weights2, 32, True), files2, versions),
    )
    assert first.name == "manifest.json"
    assert first.read_bytes() == second.read_bytes()
    assert json.loads(first.read_text()) == manifest


def test_hashes_from_the_exporters_give_the_same_manifest(tiny, tmp_path):
    model, tokenizer = tiny
    bits, weights = quantize_model(model, MIXED, 32, True)
    spec = make_spec(32, True)
    hf_files = export_hf(model, tokenizer, weights, bits, spec, tmp_path / "hf")
    gguf = export_gguf(model, tokenizer, weights, bits, spec, tmp_path / "model.gguf")
    exported = [(f"hf/{f.name}", f) for f in hf_files] + [("model.gguf", gguf)]
    files = [(rel, f.path) for rel, f in exported]
    hashes = {rel: (f.size, f.sha256) for rel, f in exported}
    plain = build_manifest(spec, "tiny-llama", None, bits, 4.5, files, {})
    assert build_manifest(spec, "tiny-llama", None, bits, 4.5, files, {}, hashes=hashes) == plain
    # the given hashes are used as they are, not recomputed
    fake = dict(hashes, **{"model.gguf": (1, "0" * 64)})
    entry = next(
        e
        for e in build_manifest(spec, "tiny-llama", None, bits, 4.5, files, {}, hashes=fake)["files"]
        if e["name"] == "model.gguf"
    )
    assert entry == {"name": "model.gguf", "size": 1, "sha256": "0" * 64}


def test_stored_bytes_match_effective_bits_for_symmetric_dividing_groups(tiny, tmp_path):
    """Honest sizes: weight bytes of the quantized linears = effective bits × weights / 8 (within
    1 %) when the grid is what the allocator assumes (symmetric, group divides in_features)."""
    spec, bits, weights, files = export_all(tiny, tmp_path, group_size=32, symmetric=True)
    stored = hf_storage(tmp_path / "hf")
    expected = allocator_bits(weights, 32, True)
    n = sum(math.prod(q.shape) for q in weights.values())
    assert stored["weights"] == n and stored["quantized_linears"] == len(weights)
    assert stored["zero_point_bytes"] == 0 and stored["packing_padding_bytes"] == 0
    assert abs(stored["total_bytes"] - expected * n / 8) <= 0.01 * expected * n / 8
    assert abs(stored["effective_bits"] - expected) <= 0.01 * expected


@pytest.mark.parametrize("group_size", [32, 64], ids=["g32", "g64-padded"])
def test_stored_bytes_are_reported_honestly_for_asymmetric_and_padded_grids(tiny, tmp_path, group_size):
    """The allocator counts an fp16 zero per group and ignores the partial last group; the files hold
    an int8 zero (block layout) and ceil(in / g) groups. The manifest reports the stored figure,
    which matches that layout to the byte."""
    spec, bits, weights, files = export_all(tiny, tmp_path, group_size=group_size, symmetric=False)
    stored = hf_storage(tmp_path / "hf")
    expected_bytes = 0
    for q in weights.values():
        out_features, in_features = q.shape
        groups = math.ceil(in_features / group_size)
        expected_bytes += math.ceil(in_features * q.bits / 32) * 4 * out_features  # int32 words
        expected_bytes += out_features * groups * (2 + 1)  # fp16 scale + int8 zero point
    assert stored["total_bytes"] == expected_bytes
    manifest = build_manifest(spec, "tiny-llama", None, bits, allocator_bits(weights, group_size, False), files, {})
    assert manifest["effective_bits"]["stored"]["hf"] == pytest.approx(stored["effective_bits"])
    gguf = manifest["storage"]["model.gguf"]
    assert gguf["by_type"]["Q4_1"]["bits_per_weight"] == 5.0 and gguf["by_type"]["Q8_0"]["bits_per_weight"] == 8.5


def test_duplicate_names_are_rejected(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="duplicate"):
        build_manifest(make_spec(32, False), "m", None, {}, None, [("x", path), ("x", path)], {})
