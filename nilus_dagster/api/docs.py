"""Swagger UI and ReDoc from packaged assets: the docs pages work without internet.

FastAPI's default pages load their JavaScript, CSS and fonts from a CDN, so offline (an air-gapped
cluster, a laptop on a plane) they are blank. The assets come from the `fastapi-offline` wheel
(Swagger UI's bundle and CSS, ReDoc's standalone build, FastAPI's favicon) and are served under
`{root}/static`; ReDoc's Google Fonts are left out.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def assets_dir() -> Path:
    """The packaged asset folder (fails at startup, naming what is missing, if it is incomplete)."""
    folder = Path(str(files("fastapi_offline") / "static"))
    missing = [name for name in ASSETS if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline's assets are missing {missing} in {folder}: reinstall nilus-dagster")
    return folder


def install_docs(app: FastAPI, root: str) -> None:
    """`{root}/docs` (Swagger UI) and `{root}/redoc`, open like the OpenAPI JSON they render."""
    static = f"{root}/static"
    app.mount(static, StaticFiles(directory=assets_dir()), name="nilus_docs_static")
    title = app.title
    openapi_url = app.openapi_url or f"{root}/openapi.json"
    oauth2_redirect = f"{root}/docs/oauth2-redirect"

    @app.get(f"{root}/docs", include_in_schema=False)
    def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title} - Swagger UI",
            swagger_js_url=f"{static}/swagger-ui-bundle.js",
            swagger_css_url=f"{static}/swagger-ui.css",
            swagger_favicon_url=f"{static}/favicon.png",
            oauth2_redirect_url=oauth2_redirect,
        )

    @app.get(oauth2_redirect, include_in_schema=False)
    def swagger_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(f"{root}/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{title} - ReDoc",
            redoc_js_url=f"{static}/redoc.standalone.js",
            redoc_favicon_url=f"{static}/favicon.png",
            with_google_fonts=False,
        )
