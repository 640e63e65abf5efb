"""Swagger UI and ReDoc render in a real headless Chromium without internet: the real `nilus-api`
process serves their assets itself. FastAPI's default (CDN) pages, in the same browser, stay blank:
the offline setup is real."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from api_fixtures import World, start_api_process, stop_api_process
from browser import offline_chromium
from fastapi import FastAPI
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from nilus_dagster.embedded.postgres import free_port


@pytest.fixture
def cdn_docs_app() -> Iterator[str]:
    """A plain FastAPI app with FastAPI's default docs pages (assets from a CDN)."""
    app = FastAPI(title="control")

    @app.get("/things/{thing_id}")
    def thing(thing_id: int) -> dict[str, int]:
        return {"id": thing_id}

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the control app did not start"
        time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(10)


def _loaded(browser) -> bool:
    return browser.execute_script("return document.readyState") == "complete"


@pytest.mark.timeout(600)
def test_swagger_and_redoc_render_offline(sqlite_world: World, cdn_docs_app: str) -> None:
    proc, url = start_api_process(sqlite_world, sqlite_world.home, "tok-docs:acme:read")
    try:
        spec = httpx.get(f"{url}/nilus-manager/openapi.json", timeout=30).json()
        operations = {(m.upper(), path) for path, item in spec["paths"].items() for m in item}
        assert len(operations) >= 16
        with offline_chromium() as browser:
            wait = WebDriverWait(browser, 90)
            browser.get(f"{url}/nilus-manager/docs")
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".opblock")) == len(operations))
            shown = {
                (
                    block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text,
                    block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path"),
                )
                for block in browser.find_elements(By.CSS_SELECTOR, ".opblock")
            }
            assert shown == operations
            assert browser.find_element(By.CSS_SELECTOR, ".info .title").text.startswith("Nilus Manager API")
            pipelines = '[data-path="/nilus-manager/api/v1/tenants/{tenant}/pipelines"]'
            assert browser.find_element(By.CSS_SELECTOR, pipelines).is_displayed()

            browser.get(f"{url}/nilus-manager/redoc")
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, '[data-section-id^="operation/"]')) >= 16)
            heading = browser.find_element(By.CSS_SELECTOR, "h1")
            assert heading.text.startswith("Nilus Manager API") and heading.is_displayed()
            assert "List Pipelines" in browser.find_element(By.TAG_NAME, "body").text

            # the control: FastAPI's own pages need the CDN, so here they render nothing
            for page, script_global in (("/docs", "SwaggerUIBundle"), ("/redoc", "Redoc")):
                browser.get(f"{cdn_docs_app}{page}")
                wait.until(_loaded)  # its scripts have run (or failed to load) by now
                assert browser.execute_script(f"return typeof window.{script_global}") == "undefined", page
                assert browser.find_elements(By.CSS_SELECTOR, ".opblock, [data-section-id]") == [], page
    finally:
        stop_api_process(proc)
