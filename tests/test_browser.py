"""The gallery and eval pages in headless Chromium: every image renders and the console stays clean."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import gallery_entry
from PIL import Image

from dppmg.browser_check import check_page, find_chromium
from dppmg.errors import DppmgError
from stage2_generation.gallery import MAX_HISTORY, write_gallery

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="no chromium/chromedriver found (apt-get install chromium chromium-driver)",
)
pytest.importorskip("selenium", reason="selenium is in the dev extra")


def test_the_gallery_renders_every_image_without_console_errors(tmp_path: Path):
    page = write_gallery(
        tmp_path / "gallery.html",
        [gallery_entry("u1", 3, seed=1), gallery_entry("u2", 12, seed=2)],
        title="t",
    )
    report = check_page(page)
    report.raise_if_failed()
    assert report.images == (3 + 1 + 3) + (MAX_HISTORY + 1 + 3)  # history, target, generations


def test_the_eval_page_with_plots_renders(tmp_path: Path):
    """The eval page is the gallery writer with a summary table and embedded plot PNGs."""
    plot = tmp_path / "metrics.png"
    Image.fromarray(np.full((40, 60, 3), 200, dtype=np.uint8)).save(plot)
    page = write_gallery(
        tmp_path / "index.html",
        [gallery_entry("u", 2)],
        title="eval",
        summary={"a": {"m": 1.0}},
        figures=[plot],
    )
    report = check_page(page)
    report.raise_if_failed()
    assert report.images == 1 + 2 + 1 + 3


def test_a_broken_image_and_a_console_error_fail_the_check(tmp_path: Path):
    page = tmp_path / "bad.html"
    page.write_text(
        '<html><body><img src="missing.png"><img src="data:image/png;base64,AAAA">'
        '<script>console.error("boom")</script></body></html>'
    )
    report = check_page(page)
    assert not report.ok and report.images == 2
    assert report.broken == [(tmp_path / "missing.png").as_uri(), "data:image/png;base64,AAAA"]
    assert any('"boom"' in m for m in report.console_errors)
    with pytest.raises(DppmgError, match=r"(?s)bad\.html: 2 of 2 images broken.*missing\.png"):
        report.raise_if_failed()
