"""Model ids and paths a request may name: plain relative names that stay inside their model root
(no `..`, absolute paths, URLs or symlinks that escape). Used by `core.models.resolve_model`."""

from __future__ import annotations

import re
from pathlib import Path

from core.errors import UnsafeModel

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def check_model_id(model_id: str) -> None:
    """Reject ids that are not plain relative names."""
    if not model_id or not model_id.strip():
        raise UnsafeModel("empty model id")
    if "\0" in model_id or "\\" in model_id:
        raise UnsafeModel(f"model id {model_id!r} contains forbidden characters")
    if _URL.match(model_id) or "://" in model_id:
        raise UnsafeModel(f"model id {model_id!r} looks like a URL; only local models are served")
    if model_id.startswith(("/", "~")) or Path(model_id).is_absolute():
        raise UnsafeModel(f"model id {model_id!r} is an absolute path; give a name relative to a model root")
    parts = model_id.split("/")
    if any(p in ("..", ".", "") for p in parts):
        raise UnsafeModel(f"model id {model_id!r} has '..', '.' or empty path components")


def inside_root(path: Path, root: Path) -> bool:
    try:
        path.resolve(strict=True).relative_to(root.resolve(strict=True))
        return True
    except (ValueError, OSError):
        return False


def check_contained(candidate: Path, root: Path, model_id: str) -> None:
    """`candidate` and (for a directory) every entry in it must resolve inside `root`."""
    entries = [candidate]
    if candidate.is_dir():
        entries += list(candidate.rglob("*"))
    for p in entries:
        if not inside_root(p, root):
            raise UnsafeModel(
                f"model '{model_id}' resolves outside its model root (symlink escape at "
                f"'{p.relative_to(candidate.parent) if p != candidate else p.name}')"
            )
