"""The dashboard: static HTML/JS/CSS under ``/ui`` (``/`` redirects there), served by the API
process. The browser code calls only the public ``/v1`` API, with the API key the person enters
(kept in ``sessionStorage``, sent as ``Authorization: Bearer``): no cookies, so nothing a
cross-site request could ride on. None of these routes is in the OpenAPI document.

Every dashboard response carries a Content-Security-Policy that allows only this origin's own
scripts, styles and connections (no inline script or style, no eval), and is never framed."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"

#: blob: for downloads (fetch → Blob → object URL) and data: for Chart.js' image export; the API
#: is same-origin, so connect-src 'self' covers every call and the event stream
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # revalidate every time (ETag / Last-Modified): an upgraded service never runs stale scripts
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.api_route("/", methods=["GET", "HEAD"])
def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.api_route("/ui", methods=["GET", "HEAD"])
def ui_no_slash() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.api_route("/ui/", methods=["GET", "HEAD"])
def ui_index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


class _Static(StaticFiles):
    """StaticFiles with the dashboard's security headers on every file it serves."""

    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        if path.endswith(".js"):  # module scripts need a JavaScript type under nosniff
            response.headers["Content-Type"] = "text/javascript; charset=utf-8"
        return response


def install(app: FastAPI) -> None:
    """Mount the dashboard on `app`: `/` → `/ui/`, the page at `/ui/`, its files at `/ui/static/`."""
    app.include_router(router)
    app.mount("/ui/static", _Static(directory=STATIC_DIR), name="ui-static")
