"""`dppmg data prepare`: any source → the processed format, item features and the scorer, atomically.

The dataset is built in a staging folder beside its final place and renamed into place only when every
file is written, so an interrupted run leaves the previous dataset (if any) untouched. A rerun with the
same config and unchanged raw files is a no-op; a different config needs `data.overwrite=true`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from dppmg import __version__
from dppmg.config import Config, to_dict, to_yaml
from dppmg.data.format import content_hash, write_features, write_meta, write_tables
from dppmg.data.imageio import copy_image_files, load_image_array, write_image_array
from dppmg.data.loaders import load_source
from dppmg.data.processing import ProcessedTables, process
from dppmg.data.raw import RawDataset
from dppmg.errors import DppmgError
from dppmg.io import commit_dir, exclusive_lock, finished_with, staging_dir, write_text
from dppmg.log import logger
from dppmg.seeding import seed_everything

# How `dppmg.data.imageio.to_rgb` reads the image modes that are not RGB, for the warning that counts them.
IMAGE_MODES = {"L": "grayscale", "RGBA": "transparent parts on white", "P": "palette", "I;16": "16-bit, scaled to 8 bits"}


def prepare(cfg: Config, progress: bool = True) -> Path:
    """Build `cfg.data.processed_dir`; returns its path.

    Building holds a lock beside the folder (`.<name>.lock`), so that a second process building the same dataset is
    refused rather than removing the first one's staging folder. Finding it up to date takes no lock: a dataset on
    a read-only disk can be used, and every rank of a multi-process run can look at once.
    """
    final = cfg.data.processed_dir
    fingerprint = build_fingerprint(cfg)
    if _up_to_date(cfg, final, fingerprint):
        return final
    with exclusive_lock(final.parent / f".{final.name}.lock", f"the processed dataset {final}"):
        if not _up_to_date(cfg, final, fingerprint):  # another process may have finished it in between
            _build(cfg, final, fingerprint, progress)
    return final


def _up_to_date(cfg: Config, final: Path, fingerprint: str) -> bool:
    if finished_with(
        final / "meta.json",
        "build_fingerprint",
        fingerprint,
        cfg.data.overwrite,
        "data.overwrite",
        "data.name",
    ):
        logger.info("%s is up to date (same config and raw files); nothing to do", final)
        return True
    if not (final / "meta.json").is_file() and final.exists() and any(final.iterdir()):
        raise DppmgError(f"{final} exists but is not a processed dataset (no meta.json); move it away first")
    return False


def _build(cfg: Config, final: Path, fingerprint: str, progress: bool) -> None:
    t0 = time.perf_counter()
    staging = staging_dir(final)
    try:
        raw = load_source(cfg.data, cfg.seed)
        logger.info("read %s: %d items, %d interactions", raw.source, len(raw.items), len(raw.interactions))
        tables = process(raw, cfg.data, cfg.seed, progress=progress)
        _log_report(tables.report)
        _check_text_with_images(raw, tables)
        # Reading and processing draw only from generators seeded explicitly; the features and the scorer use the
        # global ones. Seeding here, after the input checks, keeps torch's import off the path of a bad-input error.
        seed_everything(cfg.seed)
        meta = _write_dataset(staging, raw, tables, cfg, progress)
        meta.update(build_fingerprint=fingerprint, seconds=round(time.perf_counter() - t0, 2))
        write_meta(staging, meta)
        write_text(staging / "config.yaml", to_yaml(cfg))
        commit_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    c = meta["counts"]
    logger.info(
        "wrote %s: %d users, %d items, %d interactions (train %d / valid %d / test %d), modalities %s, %.1f s",
        final, c["users"], c["items"], c["interactions"], c["train"], c["valid"], c["test"],
        "+".join(meta["modalities"]) or "none", meta["seconds"],
    )  # fmt: skip


def _write_dataset(
    root: Path, raw: RawDataset, tables: ProcessedTables, cfg: Config, progress: bool
) -> dict[str, Any]:
    items = tables.items.copy()
    rows = tables.item_rows
    images: np.ndarray | None = None  # uint8 [I, H, W, 3], kept in memory for the scorer
    if raw.images is not None:
        images = raw.images[rows]
        items["image"] = write_image_array(images, root, progress)
    elif items["image"].notna().any():
        items["image"] = copy_image_files(items["image"].tolist(), root, progress)
    else:
        items["image"] = None

    write_tables(root, items, tables.interactions, tables.users)
    meta: dict[str, Any] = {
        "name": cfg.data.name,
        "source": raw.source,
        "source_info": raw.info,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dppmg_version": __version__,
        "seed": cfg.seed,
        "split": cfg.data.split,
        "split_ratios": list(cfg.data.split_ratios) if cfg.data.split == "random" else None,
        "counts": _counts(tables),
        "processing": tables.report,
        "content_hash": content_hash(items, tables.interactions, tables.users),
        "modalities": [],
        "features": {},
    }
    has_text = bool(items["text"].notna().any())
    has_image = images is not None or bool(items["image"].notna().any())

    # Text features: the source's own (MMRec) or the configured sentence encoder.
    if "text" in raw.features:
        _add_features(
            root, meta, "text", raw.features["text"][rows], encoder=raw.info.get("text_features", "source")
        )
    elif has_text:
        from dppmg.text_encoder import encode_texts, text_encoder_name

        f = cfg.features
        feats = encode_texts(
            items["text"].fillna("").tolist(), f.text_encoder, batch_size=f.text_batch_size,
            max_length=f.text_max_length, device=f.device, cache_dir=f.cache_dir, progress=progress,
        )  # fmt: skip
        _add_features(root, meta, "text", feats, encoder=text_encoder_name(f.text_encoder))

    # Image features: the source's own (MMRec) or the scorer's image tower.
    if "image" in raw.features:
        _add_features(
            root, meta, "image", raw.features["image"][rows], encoder=raw.info.get("image_features", "source")
        )
    elif has_image:
        if images is None:
            size = cfg.features.scorer.image_size
            images = load_image_array([str(root / p) for p in items["image"]], size, progress)
        from dppmg.scorer import build_scorer

        scorer, report = build_scorer(
            cfg.features.scorer, items["text"].fillna("").tolist(), images, cfg.seed, progress=progress
        )
        scorer.save(root / "scorer")
        if cfg.features.image_encoder == "scorer":
            _add_features(root, meta, "image", scorer.encode_images(images).cpu().numpy(), encoder="scorer")
        else:
            from dppmg.image_encoder import build_image_encoder, encode_image_files

            encoder = build_image_encoder(cfg.features.image_encoder, cfg.features.device)
            feats = encode_image_files(encoder, [root / p for p in items["image"]], progress)
            _add_features(root, meta, "image", feats, encoder=encoder.name)
        meta["scorer"] = report
        logger.info(
            "scorer held-out text→image retrieval on %d items: recall@1 %.3f (chance %.3f), recall@5 %.3f (chance %.3f)",
            report["n_heldout"], report["recall@1"], report["chance@1"], report["recall@5"], report["chance@5"],
        )  # fmt: skip
    if images is not None:
        meta["image_size"] = list(images.shape[1:3])
    return meta


def _check_text_with_images(raw: RawDataset, tables: ProcessedTables) -> None:
    """Images need text beside them: the scorer (and so every image feature and reward) learns from the pairs."""
    items = tables.items
    if raw.images is None and items["image"].notna().any() and not items["text"].notna().any():
        raise DppmgError(
            f"{raw.info.get('items_file', 'the items')}: items have images but no text (every text is empty): "
            "the scorer is trained on (text, image) pairs; give items a text or drop the images"
        )


def _log_report(report: dict[str, Any]) -> None:
    """One warning per filtering step that removed something, so nobody is surprised by the final counts."""
    for step, info in report.items():
        if isinstance(info, dict) and info.get("dropped_interactions"):
            settings = ", ".join(
                f"{k}={v}"
                for k, v in info.items()
                if k != "dropped_interactions" and not isinstance(v, (dict, list))
            )
            logger.warning("%s (%s): dropped %d interactions", step, settings, info["dropped_interactions"])
    if report.get("unused_items_dropped"):
        logger.info("dropped %d items left without interactions", report["unused_items_dropped"])
    converted = report.get("images", {}).get("converted_to_rgb")
    if converted:
        modes = ", ".join(f"{n} {m}" + (f" ({IMAGE_MODES[m]})" if m in IMAGE_MODES else "") for m, n in converted.items())
        logger.warning("images: %d are not RGB and are read as RGB: %s", sum(converted.values()), modes)
    if report.get("images", {}).get("sizes", 0) > 1:
        logger.info("images: %d different sizes; each is resized when read", report["images"]["sizes"])


def _add_features(root: Path, meta: dict, modality: str, feats: np.ndarray, encoder: str) -> None:
    bad = ~np.isfinite(feats).all(axis=1)
    if bad.any():
        raise DppmgError(
            f"{modality} features from {encoder}: {int(bad.sum())} item(s) have NaN or infinite values, e.g. item_idx "
            f"{int(np.flatnonzero(bad)[0])}; expected finite features"
        )
    write_features(root, modality, feats)
    meta["modalities"].append(modality)
    meta["features"][modality] = {"encoder": encoder, "dim": int(feats.shape[1])}


def _counts(t: ProcessedTables) -> dict[str, int]:
    split_counts = t.interactions["split"].value_counts()
    return {
        "users": len(t.users),
        "items": len(t.items),
        "interactions": len(t.interactions),
        **{s: int(split_counts.get(s, 0)) for s in ("train", "valid", "test")},
    }


# Keys that change how a dataset is built (not where it goes or how fast it runs).
_IGNORED_KEYS = {"data": {"overwrite", "root"}, "features": {"device", "cache_dir", "text_batch_size"}}


def build_fingerprint(cfg: Config) -> str:
    """A hash of what determines the dataset: data and feature config, seed, version, raw files' sizes and times."""
    parts: dict[str, Any] = {"seed": cfg.seed, "version": __version__, "python": platform.python_version()}
    for section in ("data", "features"):
        d = to_dict(getattr(cfg, section))
        parts[section] = {k: v for k, v in d.items() if k not in _IGNORED_KEYS[section]}
    if cfg.data.source != "synthetic":
        del parts["data"]["synthetic"]  # the world's settings do not shape a real dataset
    parts["raw_files"] = _raw_files_signature(cfg)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _raw_files_signature(cfg: Config) -> list:
    """The content of the raw folder's top-level files (SHA-256) and the images folder's (name, size) listing.

    Contents, not modification times: a copy of the same raw data (a fresh checkout of `../shared`, an rsync to
    another machine) keeps its prepared dataset, while an edited file or an added image invalidates it.
    """
    d = cfg.data
    if d.raw_dir is None or not Path(d.raw_dir).is_dir():
        return []
    sig: list = [[p.name, _file_sha256(p)] for p in sorted(Path(d.raw_dir).iterdir()) if p.is_file()]
    images = d.raw_path(d.images_dir)
    if images is not None and images.is_dir():
        listing = hashlib.sha256()
        for entry in sorted(os.scandir(images), key=lambda e: e.name):
            if entry.is_file():
                listing.update(f"{entry.name}\0{entry.stat().st_size}\n".encode())
        sig.append([str(d.images_dir), listing.hexdigest()])
    return sig


def _file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
