"""A real headless Chromium for page tests, cut off from the internet.

Debian's `chromium` and `chromium-driver` (same version, installed here with apt-get when missing,
as the BigQuery fixtures install their emulator), driven by Selenium. Selenium rather than
Playwright: Playwright drives its own pinned browser builds, which it downloads (no download from
outside works here), while Selenium talks WebDriver to whatever chromedriver it is given.

The browser resolves no host name but 127.0.0.1 and sends everything else to a dead proxy: a page
that needs a CDN stays blank, as on an offline machine.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from apt_packages import ensure_packages
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

APT_PACKAGES = ["chromium", "chromium-driver"]


def _binaries() -> tuple[str | None, str | None]:
    return shutil.which("chromium"), shutil.which("chromedriver")


def ensure_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing Debian's packages first if needed."""
    ensure_packages(APT_PACKAGES, lambda: None not in _binaries())
    browser, driver = _binaries()
    assert browser and driver, f"apt-get install {' '.join(APT_PACKAGES)} did not provide chromium/chromedriver"
    return browser, driver


@contextmanager
def offline_chromium() -> Iterator[webdriver.Chrome]:
    browser, driver_path = ensure_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",  # loopback bypasses it; anything else fails
        "--window-size=1280,2000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()
