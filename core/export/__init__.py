"""Artifacts a user downloads: the compressed-tensors HF directory, the GGUF file, the manifest."""

from core.export._common import ExportedFile, TensorFetcher, model_tensors
from core.export.gguf import export_gguf
from core.export.hf import export_hf
from core.export.manifest import build_manifest, file_sha256, library_versions, write_manifest

__all__ = [
    "ExportedFile",
    "TensorFetcher",
    "build_manifest",
    "export_gguf",
    "export_hf",
    "file_sha256",
    "library_versions",
    "model_tensors",
    "write_manifest",
]
