"""Opaque, time-ordered ids: ``<prefix>_<12 hex ms timestamp><16 hex random>``."""

from __future__ import annotations

import re
import secrets
import time

_ID_RE = re.compile(r"^[a-z]{2,4}_[0-9a-f]{28}$")


def new_id(prefix: str) -> str:
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def looks_like_id(value: str, prefix: str) -> bool:
    return bool(_ID_RE.match(value)) and value.startswith(prefix + "_")
