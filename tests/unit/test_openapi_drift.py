"""The committed openapi.json (the stable contract generated clients are built from) must equal the
schema the app serves; regenerate it with `make openapi` after an intended API change."""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.unit


def _exporter():
    spec = importlib.util.spec_from_file_location("export_openapi", ROOT / "scripts" / "export_openapi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_openapi_matches_served_schema():
    committed_path = ROOT / "openapi.json"
    assert committed_path.is_file(), "openapi.json is missing: run `make openapi` and commit it"
    served = _exporter().render()
    committed = committed_path.read_text()
    if served != committed:
        diff = "".join(
            list(
                difflib.unified_diff(
                    committed.splitlines(True),
                    served.splitlines(True),
                    "openapi.json (committed)",
                    "served by api.main.create_app",
                )
            )[:60]
        )
        pytest.fail(
            "openapi.json is out of date with the API: run `make openapi` "
            "(python scripts/export_openapi.py > openapi.json) and commit the result.\n" + diff
        )
