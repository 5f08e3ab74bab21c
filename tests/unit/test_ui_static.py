"""The dashboard's files, without a browser: served at /ui with its security headers, `/`
redirects there, none of it in the OpenAPI document, every file it loads exists and is packaged
(pyproject package-data), and no script or style relies on what the Content-Security-Policy
forbids (inline handlers, inline styles, eval). The browser tests are tests/browser."""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from api.ui import CONTENT_SECURITY_POLICY, STATIC_DIR

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from common.settings import Settings

    settings = Settings(data_dir=tmp_path_factory.mktemp("ui-data"))
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_served_with_security_headers_and_root_redirect(client):
    root = client.get("/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/ui/"
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
    head = client.head("/ui/")
    assert head.status_code == 200 and not head.content and head.headers["content-security-policy"]
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for response in (page, client.get("/ui/static/js/app.js"), client.get("/ui/static/style.css")):
        assert response.status_code == 200
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
    assert client.get("/ui/static/js/app.js").headers["content-type"].startswith("text/javascript")
    missing = client.get("/ui/static/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY and "unsafe-eval" not in CONTENT_SECURITY_POLICY


def test_not_in_the_openapi_document(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/ui")]


def test_every_loaded_file_exists_and_is_packaged():
    html = (STATIC_DIR / "index.html").read_text()
    loaded = re.findall(r'(?:src|href)="/ui/static/([^"]+)"', html)
    assert "js/app.js" in loaded and "vendor/chart.umd.min.js" in loaded
    for name in loaded:
        assert (STATIC_DIR / name).is_file(), name
    for js in STATIC_DIR.glob("js/*.js"):  # module imports
        for name in re.findall(r"from '\./([^']+)'", js.read_text()):
            assert (STATIC_DIR / "js" / name).is_file(), f"{js.name} imports {name}"
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["api.ui"]
    for path in STATIC_DIR.rglob("*"):
        if path.is_file():
            relative = path.relative_to(STATIC_DIR.parent).as_posix()
            assert any(fnmatch(relative, p) and relative.count("/") == p.count("/") for p in patterns), (
                f"{relative} would be left out of the installed package (pyproject package-data)"
            )
    assert (STATIC_DIR / "vendor" / "LICENSE.chart.js.md").read_text().startswith("The MIT License")


def test_nothing_the_content_security_policy_forbids():
    html = (STATIC_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline script"
    assert not re.search(r"\son[a-z]+=", html) and " style=" not in html and "<style" not in html
    for js in STATIC_DIR.glob("js/*.js"):
        text = js.read_text()
        assert not re.search(r"\.(innerHTML|outerHTML)\s*=|insertAdjacentHTML\(", text), js.name  # text nodes only
        assert not re.search(r"\beval\(|new Function\(|setAttribute\('style'|setAttribute\(\"on", text), js.name
        assert len(text.splitlines()) < 400, f"{js.name} is over 400 lines"
