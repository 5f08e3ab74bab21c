"""Keep server paths out of what clients see. Error messages built deep in the library (a
checkpoint reader naming its file, a registry naming its target) may carry absolute paths of this
machine; the API and the worker pass every client-facing message and detail through
``redact_paths``, which keeps only the last component (the file name a user can act on)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# an absolute POSIX path of two or more components, not part of a URL (`http://h/x`) and not one
# of our own routes (`/v1/...`)
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/(?!v1/)(?:[^\s/'\"`;,()<>\[\]{}]+/)+([^\s/'\"`;,()<>\[\]{}]*)")
_MAX_DEPTH = 20


def _last_component(match: re.Match[str]) -> str:
    path = match.group(0)
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return f"…/{name}/" if path.endswith("/") else f"…/{name}"


def redact_text(text: str) -> str:
    return _ABSOLUTE_PATH.sub(_last_component, text)


def redact_paths(value: Any, _depth: int = 0) -> Any:
    """`value` with every absolute path in its strings (dict keys and values, list items) cut to
    its last component."""
    if isinstance(value, str):
        return redact_text(value)
    if _depth >= _MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {redact_paths(k, _depth + 1): redact_paths(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_paths(v, _depth + 1) for v in value]
    return value


def redact_url(url: str) -> str:
    """A connection URL with its password replaced by ``***`` (for logs and ``taq admin config``)."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
