"""The gallery page: self-contained (no external references), escaped, every image a lossless PNG data URI,
the summary table as given, history truncation, and clear errors for bad input."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from helpers import GALLERY_CONDITIONS, gallery_entry, gallery_image
from PIL import Image

from dppmg.errors import DppmgError
from stage2_generation.gallery import MAX_HISTORY, GalleryEntry, Shown, write_gallery

EVIL = "<script>alert('x')</script> & \"quotes\""


class Page(HTMLParser):
    """Collects every tag's attributes, img sources, and the text of each table's cells by table class."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self._table = dict(attrs).get("class") or ""
            self.tables.setdefault(self._table, [])
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    @property
    def img_sources(self) -> list[str]:
        return [str(a["src"]) for t, a in self.tags if t == "img"]


def parse(path: Path) -> tuple[str, Page]:
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    return text, page


def shown_images(e: GalleryEntry) -> list[np.ndarray]:
    """The images the page should show for an entry, in page order."""
    out = [h.image for h in e.history[-MAX_HISTORY:] if h.image is not None]
    if e.target_item is not None and e.target_item.image is not None:
        out.append(e.target_item.image)
    return out + [g.image for g in e.generations.values() if g.image is not None]


def test_every_image_is_a_png_data_uri_of_the_given_pixels(tmp_path: Path):
    entries = [
        gallery_entry("user_1", 3, seed=1),
        gallery_entry("user_2", 5, seed=2, with_target_image=False),
    ]
    entries[0].generations["after RL"] = Shown(text="text only")  # a generation without an image
    entries[1].history[0] = Shown(image=gallery_image(7, side=20))  # an image without text, another size
    _, page = parse(write_gallery(tmp_path / "g.html", entries, title="t"))
    expected = [im for e in entries for im in shown_images(e)]
    assert len(page.img_sources) == len(expected) == 3 + 1 + 2 + 5 + 3
    for src, want in zip(page.img_sources, expected):
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.size == (want.shape[1], want.shape[0])
            assert np.array_equal(np.asarray(im.convert("RGB")), want)  # lossless


def test_page_references_nothing_outside_itself(tmp_path: Path):
    text, page = parse(
        write_gallery(tmp_path / "g.html", [gallery_entry("u", 12)], title="t", summary={"a": {"m": 1}})
    )
    outside_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", text)  # base64 may hold "//"
    for needle in ("http://", "https://", 'src="/', "url(", "@import", "//"):
        assert needle not in outside_images, needle
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object", "embed", "base")]
    for tag, attrs in page.tags:
        assert "href" not in attrs, tag
        if "src" in attrs:
            assert str(attrs["src"]).startswith("data:"), tag
    assert "image-rendering: pixelated" in text


def test_all_text_is_escaped(tmp_path: Path):
    e = GalleryEntry(
        user_id=EVIL,
        history=[Shown(EVIL, gallery_image(0))],
        target=EVIL,
        target_item=Shown(EVIL),
        generations={EVIL: Shown(EVIL, gallery_image(1))},
        scores={EVIL: {EVIL: 1.0}},
    )
    text, page = parse(
        write_gallery(tmp_path / "g.html", [e], title=EVIL, summary={EVIL: {EVIL: 2.0}}, notes=EVIL)
    )
    assert "<script" not in text and "&lt;script&gt;" in text
    assert not [t for t, _ in page.tags if t == "script"]
    # every occurrence made it through escaped: title ×2, notes, summary ×2, user, history, target ×2,
    # generation label, its alt text, its text, its score name
    assert text.count("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quotes&quot;") == 13


def test_summary_table_has_conditions_as_rows_and_metrics_as_columns(tmp_path: Path):
    summary = {
        "none": {"personalization_image": 0.12345, "fidelity": 0.5},
        "dppmg": {"personalization_image": 0.3, "fidelity": float("nan"), "hit_image": 0.75},
    }
    _, page = parse(write_gallery(tmp_path / "g.html", [], title="t", summary=summary))
    assert page.tables["summary"] == [
        ["condition", "personalization_image", "fidelity", "hit_image"],
        ["none", "0.1235", "0.5", ""],
        ["dppmg", "0.3", "n/a", "0.75"],
    ]
    _, plain = parse(write_gallery(tmp_path / "plain.html", [], title="t"))
    assert "summary" not in plain.tables


def test_generations_in_dict_order_with_their_scores(tmp_path: Path):
    text, page = parse(write_gallery(tmp_path / "g.html", [gallery_entry("u", 2)], title="t"))
    positions = [text.index(f"<h3>{c}</h3>") for c in GALLERY_CONDITIONS]
    assert positions == sorted(positions)
    assert page.tables["scores"] == [["personalization_image", "0"], ["consistency", "0.5"]] + [
        ["personalization_image", "0.1"],
        ["consistency", "0.5"],
        ["personalization_image", "0.2"],
        ["consistency", "0.5"],
    ]


def test_long_history_shows_the_last_items_and_says_how_many_were_left_out(tmp_path: Path):
    text, page = parse(
        write_gallery(tmp_path / "g.html", [gallery_entry("u", 12, with_target_image=False)], title="t")
    )
    assert MAX_HISTORY == 8
    assert "last 8 of 12 (4 earlier not shown)" in text
    assert "past item 3<" not in text and "past item 4<" in text and "past item 11<" in text
    assert len(page.img_sources) == 8 + len(GALLERY_CONDITIONS)


def test_written_atomically_and_returns_the_path(tmp_path: Path):
    out = write_gallery(tmp_path / "sub" / "gallery.html", [gallery_entry("u", 1)], title="t")
    assert out == tmp_path / "sub" / "gallery.html" and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["gallery.html"]  # no temporary file left behind


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((32, 32, 3), dtype=np.float32), "float32"),
        (np.zeros((32, 32), dtype=np.uint8), r"\[32, 32\]"),
        (np.zeros((32, 32, 4), dtype=np.uint8), r"\[32, 32, 4\]"),
        ([[0, 0, 0]], "list"),
    ],
)
def test_bad_image_names_the_entry_and_field(tmp_path: Path, bad, message: str):
    e = gallery_entry("user_7", 2)
    e.generations["after RL"] = Shown("x", bad)
    with pytest.raises(DppmgError, match=message) as err:
        write_gallery(tmp_path / "g.html", [gallery_entry("user_1", 1), e], title="t")
    assert re.search(r"entry 1 \(user 'user_7'\) generations\['after RL'\]\.image", str(err.value))
    assert not (tmp_path / "g.html").exists()


def test_bad_scores_are_named(tmp_path: Path):
    e = gallery_entry("u", 1)
    e.scores = {"after RL": {"consistency": "high"}}
    with pytest.raises(DppmgError, match=r"scores\['after RL'\]\['consistency'\]"):
        write_gallery(tmp_path / "g.html", [e], title="t")
    e.scores = {"no such condition": {"m": 1.0}}
    with pytest.raises(DppmgError, match="no such condition"):
        write_gallery(tmp_path / "g.html", [e], title="t")
