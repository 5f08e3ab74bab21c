"""The one way JSON is made canonical: artifacts (sorted keys, indent 2, UTF-8, no NaN, trailing
newline, so a rerun writes the same bytes) and hash inputs (sorted keys, no whitespace, ASCII, so
the same value always hashes the same)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["canonical_json", "compact_json", "json_sha256"]


def canonical_json(obj: Any) -> bytes:
    """An artifact's bytes (manifest.json, profile.json, bitmap.json, eval.json, config files).
    NaN and infinities are refused: they are not JSON, and a browser's JSON.parse rejects them."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def compact_json(obj: Any) -> str:
    """The input of a hash: sorted keys, no whitespace, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def json_sha256(obj: Any) -> str:
    """sha256 hex of `compact_json(obj)`."""
    return hashlib.sha256(compact_json(obj).encode()).hexdigest()
