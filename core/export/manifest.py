"""``manifest.json``: what was asked, what was produced and what it really costs.

Holds the spec, seed, source model id and content hash, library versions, the bit map, effective
bits as the allocator computed them and as measured from the stored bytes of each artifact, and
the size and sha256 of every file. No timestamps or host paths, so reruns are byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from importlib import metadata
from pathlib import Path
from typing import Any

from core.canonical_json import canonical_json
from core.spec import JobSpec
from core.types import BitMap

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
#: distributions whose versions decide the artifact bytes
VERSIONED_PACKAGES = ("taq-service", "torch", "transformers", "compressed-tensors", "gguf", "safetensors", "numpy")

_CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point")
_GGUF_LINEAR = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks (artifacts can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the artifacts ("not installed" when absent)."""
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(length))
        return header


def hf_storage(export_dir: Path) -> dict[str, Any] | None:
    """Stored bytes of the quantized linears of a compressed-tensors export, from the files.

    Counts ``weight_packed`` + ``weight_scale`` + ``weight_zero_point`` bytes against the weight
    count in ``weight_shape``. ``packing_padding_bytes`` is what int32 word alignment adds over
    bits × weights (codes and packed zero points); it is part of the stored total. None when the
    directory has no quantized linear.
    """
    from safetensors import safe_open

    config = json.loads((export_dir / "config.json").read_text())
    qconfig = config.get("quantization_config") or {}
    bits_of = {t: g["weights"]["num_bits"] for g in qconfig.get("config_groups", {}).values() for t in g["targets"]}
    totals = {"weight_packed": 0, "weight_scale": 0, "weight_zero_point": 0}
    weights = linears = padding = 0
    for file in sorted(export_dir.glob("*.safetensors")):
        header = _safetensors_header(file)
        with safe_open(str(file), framework="pt") as handle:
            for key in sorted(k for k in header if k.endswith(".weight_shape")):
                module = key[: -len(".weight_shape")]
                out_features, in_features = (int(v) for v in handle.get_tensor(key).tolist())
                linears += 1
                weights += out_features * in_features
                bits = bits_of.get(module)
                for suffix in _CT_SUFFIXES:
                    info = header.get(f"{module}.{suffix}")
                    if info is None:
                        continue
                    nbytes = info["data_offsets"][1] - info["data_offsets"][0]
                    totals[suffix] += nbytes
                    if bits is not None and suffix == "weight_packed":
                        padding += nbytes - (out_features * in_features * bits + 7) // 8
                    if bits is not None and suffix == "weight_zero_point" and info["dtype"] == "I32":
                        # packed along the output dim: [ceil(out * bits / 32), n_groups]
                        padding += nbytes - (out_features * info["shape"][1] * bits + 7) // 8
    if not linears:
        return None
    total = sum(totals.values())
    return {
        "quantized_linears": linears,
        "weights": weights,
        "code_bytes": totals["weight_packed"],
        "scale_bytes": totals["weight_scale"],
        "zero_point_bytes": totals["weight_zero_point"],
        "total_bytes": total,
        "packing_padding_bytes": padding,
        "effective_bits": total * 8 / weights,
    }


def gguf_storage(path: Path) -> dict[str, Any] | None:
    """Stored bytes of the decoder linears of a GGUF file, per GGML type and overall. Reads the
    tensor index only (core.weights' header parser skips the vocabulary, which gguf's GGUFReader
    would turn into a hundred thousand small arrays)."""
    import math
    import os

    from core.weights.gguf_reader import parse_gguf_header

    fd = os.open(path, os.O_RDONLY)
    try:
        header = parse_gguf_header(fd, os.fstat(fd).st_size, Path(path).name)
    finally:
        os.close(fd)
    by_type: dict[str, dict[str, int]] = {}
    for tensor in header.tensors:
        if not _GGUF_LINEAR.match(tensor.name):
            continue
        entry = by_type.setdefault(tensor.qtype.name, {"tensors": 0, "weights": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["weights"] += int(math.prod(tensor.shape))
        entry["bytes"] += int(tensor.nbytes)
    if not by_type:
        return None
    quantized = {k: v for k, v in by_type.items() if k not in ("F16", "F32", "BF16")}
    q_weights = sum(v["weights"] for v in quantized.values())
    q_bytes = sum(v["bytes"] for v in quantized.values())
    return {
        "by_type": {k: dict(v, bits_per_weight=v["bytes"] * 8 / v["weights"]) for k, v in sorted(by_type.items())},
        "quantized_weights": q_weights,
        "quantized_bytes": q_bytes,
        "effective_bits": q_bytes * 8 / q_weights if q_weights else None,
    }


def storage_summary(files: list[tuple[str, Path]]) -> dict[str, Any]:
    """Stored bits per artifact, measured from local files: an HF export is recognised by its
    ``*.safetensors`` files (keyed by its directory), a GGUF by its ``.gguf`` name. Reads headers
    only (safetensors headers, GGUF tensor infos)."""
    hf_dirs: dict[str, Path] = {}
    ggufs: dict[str, Path] = {}
    for rel, path in files:
        rel = Path(rel).as_posix()
        if rel.endswith(".safetensors"):
            hf_dirs[rel.rpartition("/")[0] or "."] = Path(path).parent
        elif rel.endswith(".gguf"):
            ggufs[rel] = Path(path)
    storage: dict[str, Any] = {}
    for name, directory in sorted(hf_dirs.items()):
        storage[name] = {"format": "hf", **(hf_storage(directory) or {})}
    for name, path in sorted(ggufs.items()):
        storage[name] = {"format": "gguf", **(gguf_storage(path) or {})}
    return storage


def assemble_manifest(
    spec: JobSpec,
    source_model_id: str,
    source_sha256: str | None,
    bit_map: BitMap,
    effective_bits_reported: float | None,
    *,
    entries: list[dict[str, Any]],
    storage: dict[str, Any],
    library_versions: dict[str, str],
) -> dict[str, Any]:
    """The manifest from what is already known: `entries` {"name", "size", "sha256"} of every
    file (names relative to the artifact root) and `storage` (`storage_summary`)."""
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("duplicate file names in the manifest")
    return {
        "manifest_version": MANIFEST_VERSION,
        "spec": spec.model_dump(mode="json"),
        "seed": spec.seed,
        "source": {"model_id": source_model_id, "sha256": source_sha256},
        "library_versions": dict(sorted(library_versions.items())),
        bit_map.manifest_key: dict(bit_map.bits),
        "effective_bits": {
            "allocator": effective_bits_reported,
            "stored": {name: s.get("effective_bits") for name, s in storage.items()},
        },
        "storage": storage,
        "files": sorted(
            ({"name": e["name"], "size": int(e["size"]), "sha256": e["sha256"]} for e in entries),
            key=lambda e: e["name"],
        ),
    }


def build_manifest(
    spec: JobSpec,
    source_model_id: str,
    source_sha256: str | None,
    bit_map: BitMap,
    effective_bits_reported: float | None,
    files: list[tuple[str, Path]],
    library_versions: dict[str, str],
    hashes: dict[str, tuple[int, str]] | None = None,
) -> dict[str, Any]:
    """The manifest as a dict from local files: `files` are (name relative to the artifact root,
    local path); each file is hashed unless `hashes` (relative name -> (size, sha256), e.g. from
    the exporters' ExportedFiles) already has it, and stored bits are measured from the files."""
    hashes = hashes or {}
    entries = []
    for rel, path in files:
        rel = Path(rel).as_posix()
        size, sha256 = hashes[rel] if rel in hashes else (Path(path).stat().st_size, file_sha256(Path(path)))
        entries.append({"name": rel, "size": int(size), "sha256": sha256})
    return assemble_manifest(
        spec,
        source_model_id,
        source_sha256,
        bit_map,
        effective_bits_reported,
        entries=entries,
        storage=storage_summary(files),
        library_versions=library_versions,
    )


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` (canonical JSON) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MANIFEST_NAME
    path.write_bytes(canonical_json(manifest))
    return path
