"""The one canonical-JSON helper: artifacts byte-identical across key orders, UTF-8, no NaN; hash
inputs compact and stable."""

from __future__ import annotations

import hashlib
import math

import pytest

from core.canonical_json import canonical_json, compact_json, json_sha256

pytestmark = pytest.mark.unit


def test_artifact_bytes_ignore_key_order_and_keep_utf8() -> None:
    a = canonical_json({"b": 1, "a": {"y": [1, 2], "x": "Nouméa"}})
    b = canonical_json({"a": {"x": "Nouméa", "y": [1, 2]}, "b": 1})
    assert a == b and a.endswith(b"\n") and "Nouméa".encode() in a
    assert a.startswith(b'{\n  "a": {\n    "x"')


def test_nan_is_refused() -> None:
    with pytest.raises(ValueError):
        canonical_json({"kl": math.nan})
    with pytest.raises(ValueError):
        canonical_json([math.inf])


def test_hash_input_is_compact_and_stable() -> None:
    assert compact_json({"b": [1, 2], "a": "é"}) == '{"a":"\\u00e9","b":[1,2]}'
    assert json_sha256({"b": 1, "a": 2}) == hashlib.sha256(b'{"a":2,"b":1}').hexdigest()
