"""Model resolution (ids → local files, never the network) and loading.

A model id resolves, in this order, to
1. an operator registry entry (name → local model directory or `.gguf` file),
2. a path relative to one of the model roots: a model directory (`tiny-llama` →
   `<root>/tiny-llama/`) or a `.gguf` file named without its extension
   (`SmolLM2-135M-Instruct.Q4_1` → `<root>/SmolLM2-135M-Instruct.Q4_1.gguf`),
3. a Hugging Face id already present in the local HF cache (looked up with
   `huggingface_hub.try_to_load_from_cache`, which never touches the network).

Ids with `..`, absolute paths, URLs or anything that resolves outside its root (escaping
symlinks included) raise UnsafeModel. Pickle weights (`*.bin`, `*.pt`, ...) without a
safetensors alternative raise UnsafeModel unless the operator passes `allow_pickle=True`.
`trust_remote_code` is never enabled and loading is always `local_files_only`.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from core.errors import ModelNotFound, UnsafeModel
from core.model_paths import check_contained, check_model_id, inside_root
from core.modules import decoder_stack, named_linears

__all__ = [
    "LayerRef",
    "LoadedModel",
    "ModelSource",
    "default_dtype",
    "layer_parameter_count",
    "linear_parameter_count",
    "list_models",
    "load_model",
    "parameter_count",
    "resolve_model",
]

ModelKind = Literal["hf_dir", "gguf", "hf_cache"]
WeightsFormat = Literal["safetensors", "pickle", "gguf"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class ModelSource:
    """Where a model id resolved to. `path` is the directory `from_pretrained` reads; for
    `gguf` it is the file's directory and `gguf_file` the file name. `content_sha256` is filled
    by `compute_sha256()` (hashing a model takes a while, so it is done on demand for manifests).
    """

    model_id: str
    kind: ModelKind
    path: Path
    gguf_file: str | None = None
    weights_format: WeightsFormat = "safetensors"
    content_sha256: str | None = None

    @property
    def file(self) -> Path:
        """The GGUF file, or the model directory."""
        return self.path / self.gguf_file if self.gguf_file else self.path

    def content_files(self) -> list[Path]:
        """The files whose bytes define the model (sorted)."""
        if self.gguf_file:
            return [self.path / self.gguf_file]
        return sorted(p for p in self.path.rglob("*") if p.is_file() and not p.name.startswith("."))

    def compute_sha256(self) -> str:
        """sha256 of the GGUF file, or of a directory's (relative name, file sha256) list.

        A file in a Hugging Face cache snapshot is a link to `blobs/<sha256>` when it is stored
        with LFS (the weights): that name is its content hash, so it is not read again."""
        if self.content_sha256 is None:
            if self.gguf_file:
                self.content_sha256 = _known_sha256(self.path / self.gguf_file) or _file_sha256(
                    self.path / self.gguf_file
                )
            else:
                outer = hashlib.sha256()
                for p in self.content_files():
                    outer.update(p.relative_to(self.path).as_posix().encode() + b"\0")
                    outer.update((_known_sha256(p) or _file_sha256(p)).encode() + b"\n")
                self.content_sha256 = outer.hexdigest()
        return self.content_sha256

    def content_signature(self) -> list[tuple[str, int, int]]:
        """(relative name, size, mtime_ns) of every content file: a cached hash is valid while
        this is unchanged."""
        out = []
        for p in self.content_files():
            stat = p.stat()
            out.append(
                (p.relative_to(self.path).as_posix() if not self.gguf_file else p.name, stat.st_size, stat.st_mtime_ns)
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """Client-safe description (no server paths)."""
        return {
            "id": self.model_id,
            "kind": self.kind,
            "gguf_file": self.gguf_file,
            "weights_format": self.weights_format,
            "content_sha256": self.content_sha256,
        }


@dataclass(frozen=True)
class LayerRef:
    """One decoder layer: `name` is its full dotted name, `linears` its nn.Linear by full name."""

    index: int
    name: str
    module: nn.Module
    linears: dict[str, nn.Linear] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return linear_parameter_count(self.linears.values())


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    source: ModelSource
    layers: list[LayerRef]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def linear_names(self) -> list[str]:
        return [name for ref in self.layers for name in ref.linears]


# ---------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------


def parameter_count(model: nn.Module) -> int:
    """All parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def linear_parameter_count(linears: Iterable[nn.Linear]) -> int:
    """Weights of the given linears (biases are not quantized and not counted)."""
    return sum(int(l.weight.numel()) for l in linears)


def layer_parameter_count(loaded: LoadedModel) -> dict[str, int]:
    """Quantizable weights per decoder layer name."""
    return {ref.name: ref.params for ref in loaded.layers}


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------


def _known_sha256(path: Path) -> str | None:
    """The content hash a Hugging Face cache already names a file by (an LFS blob), else None."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", target.name):
        return target.name
    return None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _weights_format(directory: Path, model_id: str, allow_pickle: bool) -> WeightsFormat:
    files = [p for p in directory.iterdir() if p.is_file() or p.is_symlink()]
    if any(p.name.endswith(".safetensors") for p in files):
        return "safetensors"
    pickles = sorted(p.name for p in files if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        if not allow_pickle:
            raise UnsafeModel(
                f"model '{model_id}' only has pickle weights ({', '.join(pickles[:3])}); "
                "pickle loading is refused unless the operator allows it",
                details={"files": pickles},
            )
        return "pickle"
    raise ModelNotFound(f"model '{model_id}' has no weights (*.safetensors) in its directory")


def _source_for_path(model_id: str, path: Path, kind: ModelKind, allow_pickle: bool) -> ModelSource:
    if path.is_file() and path.name.endswith(".gguf"):
        return ModelSource(model_id=model_id, kind="gguf", path=path.parent, gguf_file=path.name, weights_format="gguf")
    if path.is_dir():
        fmt = _weights_format(path, model_id, allow_pickle)
        return ModelSource(model_id=model_id, kind=kind, path=path, weights_format=fmt)
    raise ModelNotFound(f"model '{model_id}' points to '{path}', which is neither a model directory nor a .gguf file")


def _from_hf_cache(model_id: str, hf_cache_dir: Path | None) -> Path | None:
    if not _HF_ID.match(model_id):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    found = try_to_load_from_cache(
        model_id, "config.json", cache_dir=str(hf_cache_dir) if hf_cache_dir is not None else None
    )
    if isinstance(found, str) and Path(found).is_file():
        return Path(found).parent
    return None


def resolve_model(
    model_id: str,
    roots: list[Path],
    registry: dict[str, Path],
    allow_pickle: bool = False,
    *,
    hf_cache_dir: Path | None = None,
) -> ModelSource:
    """Resolve `model_id` to a local model (see module docstring). Raises ModelNotFound (naming
    every place tried) or UnsafeModel."""
    tried: list[str] = []
    if model_id in registry:
        path = Path(registry[model_id]).expanduser()
        if path.exists():
            return _source_for_path(model_id, path, "hf_dir", allow_pickle)
        tried.append(f"registry entry '{model_id}' -> {path} (missing)")
    else:
        tried.append(f"registry (no entry '{model_id}')")

    check_model_id(model_id)
    for root in roots:
        root = Path(root).expanduser()
        directory = root / model_id
        gguf = root / (model_id if model_id.endswith(".gguf") else f"{model_id}.gguf")
        for candidate in (directory, gguf):
            if (candidate.exists() or candidate.is_symlink()) and not inside_root(candidate, root):
                raise UnsafeModel(f"model '{model_id}' resolves outside its model root (symlink escape)")
        if directory.is_dir() and (directory / "config.json").exists():
            check_contained(directory, root, model_id)
            return _source_for_path(model_id, directory.resolve(), "hf_dir", allow_pickle)
        tried.append(f"{directory}/ (no model directory)")
        if gguf.is_file():
            check_contained(gguf, root, model_id)
            return _source_for_path(model_id, gguf.resolve(), "gguf", allow_pickle)
        tried.append(f"{gguf} (no file)")

    snapshot = _from_hf_cache(model_id, hf_cache_dir)
    if snapshot is not None:
        return _source_for_path(model_id, snapshot, "hf_cache", allow_pickle)
    tried.append(
        f"Hugging Face cache (no cached '{model_id}')"
        if _HF_ID.match(model_id)
        else "Hugging Face cache (not an 'org/name' id)"
    )
    raise ModelNotFound(f"model '{model_id}' not found; tried: " + "; ".join(tried), details={"tried": tried})


def list_models(
    roots: list[Path],
    registry: dict[str, Path],
    *,
    allow_pickle: bool = False,
    hf_cache_dir: Path | None = None,
    include_hf_cache: bool = True,
) -> list[ModelSource]:
    """Every model id this deployment can load: registry entries, then root entries (model
    directories, one or two levels deep, and `.gguf` files), then HF-cache models with a
    config.json. Entries that would not resolve (unsafe, pickle-only, broken) are left out; the
    first source of an id wins."""
    found: dict[str, ModelSource] = {}

    def add(model_id: str) -> None:
        if model_id in found:
            return
        with contextlib.suppress(ModelNotFound, UnsafeModel):
            found[model_id] = resolve_model(model_id, roots, registry, allow_pickle, hf_cache_dir=hf_cache_dir)

    for model_id in sorted(registry):
        add(model_id)
    for root in roots:
        root = Path(root).expanduser()
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_file() and entry.name.endswith(".gguf"):
                add(entry.name[: -len(".gguf")])
            elif entry.is_dir():
                if (entry / "config.json").exists():
                    add(entry.name)
                else:
                    for sub in sorted(entry.iterdir()):
                        if sub.is_dir() and (sub / "config.json").exists():
                            add(f"{entry.name}/{sub.name}")
                        elif sub.is_file() and sub.name.endswith(".gguf"):
                            add(f"{entry.name}/{sub.name[: -len('.gguf')]}")
    if include_hf_cache:
        try:
            from huggingface_hub import scan_cache_dir

            info = scan_cache_dir(str(hf_cache_dir) if hf_cache_dir is not None else None)
            for repo in sorted(info.repos, key=lambda r: r.repo_id):
                if repo.repo_type == "model":
                    add(repo.repo_id)
        except Exception:  # noqa: BLE001 - a missing or unreadable cache just lists nothing
            pass
    return list(found.values())


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def default_dtype(device: str | torch.device) -> torch.dtype:
    """float32 on CPU; bfloat16 on CUDA when supported, else float16."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def layer_refs(model: nn.Module) -> list[LayerRef]:
    stack = decoder_stack(model)
    refs = []
    for i, layer in enumerate(stack.layers):
        name = f"{stack.prefix}.{i}"
        refs.append(LayerRef(index=i, name=name, module=layer, linears=named_linears(model, name)))
    return refs


def load_model(
    source: ModelSource, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedModel:
    """The whole model in memory (tests, the bench, generation): the same lazy reader and
    skeleton as streaming (`core.streaming.model.open_streamed`), every parameter onloaded.
    `dtype=None` picks `default_dtype(device)` (float32 on CPU, bf16/fp16 on CUDA)."""
    from core.streaming.model import open_streamed

    streamed = open_streamed(source, device=device, dtype=dtype)
    model = streamed.materialize()
    return LoadedModel(model=model, tokenizer=streamed.tokenizer, source=source, layers=layer_refs(model))
