"""End to end: `dppmg data prepare` on the debug world and on a tiny custom dataset with images."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dppmg.config import load_config
from dppmg.data.format import load_dataset
from dppmg.data.prepare import prepare
from dppmg.errors import DppmgError
from dppmg.io import read_json

REPO = Path(__file__).resolve().parents[1]


def debug_cfg(tmp_path, *overrides):
    return load_config(
        REPO / "configs" / "debug.yaml",
        [f"data.root={tmp_path / 'data'}", f"features.cache_dir={tmp_path / 'cache'}", *overrides],
    )


@pytest.fixture(scope="module")
def debug_world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("world")
    cfg = debug_cfg(tmp)
    return cfg, prepare(cfg, progress=False)


def test_debug_world_follows_the_format(debug_world):
    cfg, folder = debug_world
    ds = load_dataset(folder)
    s = cfg.data.synthetic
    assert ds.num_items <= s.n_items and ds.num_users == s.n_users
    assert set(ds.modalities) == {"text", "image"}
    assert ds.features["text"].shape == (ds.num_items, 384)  # all-MiniLM-L6-v2
    assert ds.features["image"].shape[0] == ds.num_items
    assert ds.features["text"].dtype == np.float32
    assert np.isfinite(ds.features["image"]).all()
    # every image path resolves to a PNG of the configured size
    with Image.open(ds.image_path(0)) as im:
        assert im.size == (s.image_size, s.image_size)
    assert set(ds.interactions["split"]) == {"train", "valid", "test"}
    meta = ds.meta
    assert meta["source"] == "synthetic" and meta["seed"] == cfg.seed
    assert meta["features"]["text"]["encoder"].endswith("all-MiniLM-L6-v2")
    assert meta["counts"]["interactions"] == len(ds.interactions)
    assert {"recall@1", "recall@5", "chance@1", "chance@5"} <= set(meta["scorer"])
    assert (folder / "scorer").is_dir() and (folder / "config.yaml").is_file()
    assert any(c.startswith("pref_image_") for c in ds.users.columns)
    assert any(c.startswith("pref_text_") for c in ds.users.columns)


def test_rerun_is_a_noop_and_other_config_needs_overwrite(debug_world, tmp_path):
    cfg, folder = debug_world
    before = (folder / "meta.json").stat().st_mtime_ns
    prepare(cfg, progress=False)
    assert (folder / "meta.json").stat().st_mtime_ns == before  # nothing rebuilt
    root = str(cfg.data.root)
    changed = load_config(
        REPO / "configs" / "debug.yaml", [f"data.root={root}", "seed=1", f"features.cache_dir={tmp_path}"]
    )
    with pytest.raises(DppmgError, match="overwrite"):
        prepare(changed, progress=False)
    assert read_json(folder / "meta.json")["seed"] == 0  # the earlier dataset is intact


def test_same_seed_same_hash(debug_world, tmp_path):
    cfg, folder = debug_world
    again = prepare(debug_cfg(tmp_path), progress=False)
    assert read_json(again / "meta.json")["content_hash"] == read_json(folder / "meta.json")["content_hash"]


def _custom_dataset(root: Path, n_items=12, n_users=12, corrupt=()):
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    items = []
    for i in range(n_items):
        path = root / "img" / f"it{i}.png"
        if i in corrupt:
            path.write_bytes(b"not a png")
        else:
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)
        items.append(
            {
                "item_id": f"it{i}",
                "text": f"item number {i} in blue",
                "keywords": "thing",
                "image": f"it{i}.png",
            }
        )
    pd.DataFrame(items).to_csv(root / "items.csv", index=False)
    rows = [
        {"user_id": f"u{u}", "item_id": f"it{(u + k) % n_items}", "timestamp": 1000 + 10 * k}
        for u in range(n_users)
        for k in range(5)
    ]
    pd.DataFrame(rows).to_csv(root / "interactions.csv", index=False)


def custom_cfg(tmp_path, raw, *overrides):
    return load_config(
        REPO / "configs" / "custom.yaml",
        [
            f"data.raw_dir={raw}", f"data.images_dir={raw / 'img'}", f"data.root={tmp_path / 'data'}",
            f"features.cache_dir={tmp_path / 'cache'}", "features.scorer.epochs=1", "features.scorer.hidden_size=32",
            "features.scorer.num_heads=2", "features.scorer.num_layers=1", "features.scorer.heldout_fraction=0.25",
            *overrides,
        ],
    )  # fmt: skip


def test_custom_source_with_images(tmp_path):
    raw = tmp_path / "raw"
    _custom_dataset(raw)
    folder = prepare(custom_cfg(tmp_path, raw), progress=False)
    ds = load_dataset(folder)
    assert ds.num_items == 12 and set(ds.modalities) == {"text", "image"}
    # images were copied into the dataset, so it stands on its own
    assert all((folder / p).is_file() and str(p).startswith("images/") for p in ds.items["image"])


def test_image_policy_skip_and_error(tmp_path):
    raw = tmp_path / "raw"
    _custom_dataset(raw, corrupt=(3,))
    ds = load_dataset(prepare(custom_cfg(tmp_path, raw, "data.image_policy=skip"), progress=False))
    assert "it3" not in set(ds.items["item_id"]) and ds.num_items == 11
    with pytest.raises(DppmgError, match="it3"):
        prepare(custom_cfg(tmp_path, raw, "data.image_policy=error", "data.name=other"), progress=False)
    assert not (tmp_path / "data" / "processed" / "other").exists()  # nothing half-written


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dppmg", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_error_has_no_traceback(tmp_path):
    r = run_cli("data", "prepare", "configs/custom.yaml", f"data.raw_dir={tmp_path / 'missing'}", cwd=REPO)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "missing" in r.stderr


def test_cli_prepare_and_stats(tmp_path):
    args = [f"data.root={tmp_path / 'data'}", f"features.cache_dir={tmp_path / 'cache'}"]
    r = run_cli("data", "prepare", str(REPO / "configs" / "debug.yaml"), "-q", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("data", "stats", str(REPO / "configs" / "debug.yaml"), *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    stats_dir = tmp_path / "data" / "processed" / "debug" / "stats"
    assert (stats_dir / "sample_items.png").is_file()
    assert read_json(stats_dir / "stats.json")["counts"]["users"] == 40


ML_SMALL = REPO.parent / "shared" / "data" / "ml-latest-small"


@pytest.mark.slow
@pytest.mark.realdata
def test_prepare_movielens_latest_small(tmp_path):
    if not ML_SMALL.is_dir():
        pytest.skip(f"{ML_SMALL} is absent")
    cfg = load_config(
        REPO / "configs" / "movielens.yaml",
        [
            f"data.raw_dir={ML_SMALL}",
            f"data.root={tmp_path / 'data'}",
            f"features.cache_dir={tmp_path / 'cache'}",
        ],
    )
    ds = load_dataset(prepare(cfg, progress=False))
    assert ds.modalities == ["text"]
    assert ds.meta["processing"]["read"] == {"items": 9742, "interactions": 100836, "users": 610}
    # rating >= 4 and 5-core: every user and item keeps at least 5 interactions
    assert ds.interactions.groupby("user_idx").size().min() >= 5
    assert ds.interactions.groupby("item_idx").size().min() >= 5
    assert (ds.split("test").groupby("user_idx").size() == 1).all()
    assert ds.items["keywords"].str.len().gt(0).all()


def test_fingerprint_ignores_world_settings_for_real_sources(tmp_path):
    from dppmg.data.prepare import build_fingerprint

    base = ["data.source=custom", f"data.raw_dir={tmp_path}"]
    a = build_fingerprint(load_config(None, base))
    assert a == build_fingerprint(load_config(None, [*base, "data.synthetic.text_weight=9"]))
    assert a != build_fingerprint(load_config(None, [*base, "data.rating_threshold=4"]))
    syn = build_fingerprint(load_config(None, []))
    assert syn != build_fingerprint(load_config(None, ["data.synthetic.text_weight=9"]))


def test_fingerprint_follows_raw_contents_not_times(tmp_path):
    """A copy of the same raw data (new modification times) keeps its prepared dataset; an edit or an added
    image invalidates it."""
    import os

    from dppmg.data.prepare import build_fingerprint

    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "items.csv").write_text("item_id,text\n1,a film\n")
    Image.new("RGB", (4, 4)).save(raw / "images" / "1.png")

    def fingerprint():
        overrides = ["data.source=custom", f"data.raw_dir={raw}", "data.images_dir=images"]
        return build_fingerprint(load_config(None, overrides))

    a = fingerprint()
    for p in (raw / "items.csv", raw / "images", raw / "images" / "1.png"):
        os.utime(p, ns=(1, 1))
    assert fingerprint() == a
    (raw / "items.csv").write_text("item_id,text\n1,a movie\n")
    b = fingerprint()
    assert b != a
    Image.new("RGB", (4, 4)).save(raw / "images" / "2.png")
    assert fingerprint() != b
