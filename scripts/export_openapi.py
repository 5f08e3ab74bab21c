"""Print the service's OpenAPI document (sorted keys, indent 2): ``make openapi`` writes it to
``openapi.json`` at the repository root, which ``tests/unit/test_openapi_drift.py`` compares with
the schema the app serves. The app is built against a throw-away ``TAQ_DATA_DIR`` with every other
``TAQ_*`` variable ignored, so the output depends only on the code."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def openapi_document() -> dict:
    from api.main import create_app
    from common.settings import Settings

    saved = {k: v for k, v in os.environ.items() if k.startswith("TAQ_")}
    with tempfile.TemporaryDirectory(prefix="taq-openapi-") as data_dir:
        for key in saved:
            del os.environ[key]
        os.environ["TAQ_DATA_DIR"] = data_dir
        try:
            return create_app(Settings()).openapi()
        finally:
            os.environ.pop("TAQ_DATA_DIR", None)
            os.environ.update(saved)


def render() -> str:
    return json.dumps(openapi_document(), sort_keys=True, indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
