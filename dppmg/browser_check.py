"""Open an HTML page in headless Chromium and report images that did not render and console errors.

Selenium drives Chromium through chromedriver: it gives `get_log("browser")` for console messages and page
exceptions, which a hand-written DevTools client would have to reimplement. Both binaries come from Debian's
`chromium` and `chromium-driver` packages; `DPPMG_CHROMIUM` (and `DPPMG_CHROMEDRIVER`) override where they are.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dppmg.errors import DppmgError

LOAD_TIMEOUT_S = 30

# Every <img>, once the page has loaded and each image is complete: (src, naturalWidth).
_IMAGES_JS = "return Array.from(document.images).map(i => [i.currentSrc || i.src, i.naturalWidth]);"
_ALL_COMPLETE_JS = (
    "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete);"
)


@dataclass
class PageReport:
    """What a page showed: `images` is how many <img> it has, `broken` their srcs with naturalWidth 0."""

    path: Path
    images: int
    broken: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.broken and not self.console_errors

    def raise_if_failed(self) -> None:
        if self.ok:
            return
        lines = [
            f"{self.path}: {len(self.broken)} of {self.images} images broken, "
            f"{len(self.console_errors)} console errors"
        ]
        lines += [f"  broken image: {_short(src)}" for src in self.broken]
        lines += [f"  console error: {msg}" for msg in self.console_errors]
        raise DppmgError("\n".join(lines))


def _short(src: str, n: int = 80) -> str:
    return src if len(src) <= n else src[:n] + "…"  # data: URIs run to kilobytes


def find_chromium() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths, or None when either is missing."""
    browser = os.environ.get("DPPMG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("DPPMG_CHROMEDRIVER") or shutil.which("chromedriver")
    if not browser or not driver or not Path(browser).is_file() or not Path(driver).is_file():
        return None
    return browser, driver


def check_page(path: str | Path) -> PageReport:
    """Load `path` as a file:// URL, wait for every image, and collect broken images and console errors."""
    from selenium import webdriver  # a dev dependency, imported only when a page is checked
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    path = Path(path).resolve()
    if not path.is_file():
        raise DppmgError(f"no page at {path}")
    found = find_chromium()
    if found is None:
        raise DppmgError(
            "no chromium found: install Debian's chromium and chromium-driver, or set DPPMG_CHROMIUM"
        )
    browser, chromedriver = found
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    opts.add_argument("--headless=new")
    opts.add_argument("--no-sandbox")  # the sandbox refuses to start as root, as in CI containers
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(chromedriver))
    try:
        driver.set_page_load_timeout(LOAD_TIMEOUT_S)
        driver.get(path.as_uri())
        try:
            WebDriverWait(driver, LOAD_TIMEOUT_S).until(lambda d: d.execute_script(_ALL_COMPLETE_JS))
        except TimeoutException:
            raise DppmgError(
                f"{path}: the page or its images did not finish loading in {LOAD_TIMEOUT_S} s"
            ) from None
        images = driver.execute_script(_IMAGES_JS)
        logs = driver.get_log("browser")
    finally:
        driver.quit()
    return PageReport(
        path=path,
        images=len(images),
        broken=[src for src, width in images if not width],
        console_errors=[e["message"] for e in logs if e.get("level") == "SEVERE"],
    )
