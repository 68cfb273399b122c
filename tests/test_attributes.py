"""The attribute judge: held-out accuracy far above chance, hit rates on content with known attributes,
determinism, saving, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dppmg.config import SyntheticConfig
from dppmg.data.format import ProcessedDataset
from dppmg.data.imageio import write_image_array
from dppmg.data.synthetic import ATTRIBUTES, generate_world, render_items, write_texts
from dppmg.errors import DppmgError
from stage2_generation.attributes import (
    AttributeJudge,
    fit_judge,
    preference_hit_rates,
    target_hit_rate,
    words,
)

WORLD = SyntheticConfig(n_users=40, n_items=240)
IMAGE_PREFS = ("colour", "pattern")
TEXT_PREFS = ("style", "material", "room")


def make_dataset(root: Path, cfg: SyntheticConfig = WORLD, seed: int = 0) -> ProcessedDataset:
    """A synthetic world in the processed format, built in memory (no features, no scorer)."""
    raw = generate_world(cfg, seed=seed)
    items = raw.items.assign(
        item_idx=np.arange(len(raw.items)), image=write_image_array(raw.images, root, progress=False)
    )
    users = raw.users.assign(user_idx=np.arange(len(raw.users)))
    interactions = pd.DataFrame({"user_idx": [0], "item_idx": [0], "timestamp": [0], "split": ["train"]})
    meta = {"source": "synthetic", "source_info": raw.info, "modalities": ["text", "image"]}
    return ProcessedDataset(root, items, interactions, users, meta)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> ProcessedDataset:
    return make_dataset(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def judge(world: ProcessedDataset) -> AttributeJudge:
    return AttributeJudge.fit(world, seed=0)


def content_for(
    users: pd.DataFrame, shift: int = 0, seed: int = 1
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Fresh items (not in the catalog) showing each user's preferred attributes, or, with shift=k, the value
    k places further along every preference's vocabulary (never the preferred one for 0 < k < its size).
    Categories are random. Returns images uint8 [U, 32, 32, 3], texts [U], categories [U]."""
    rng = np.random.default_rng(seed)
    n = len(users)
    codes = {a: rng.integers(0, len(v), n) for a, v in ATTRIBUTES.items()}
    for prefix, attrs in (("pref_image_", IMAGE_PREFS), ("pref_text_", TEXT_PREFS)):
        for a in attrs:
            preferred = np.array([ATTRIBUTES[a].index(v) for v in users[f"{prefix}{a}"]])
            codes[a] = (preferred + shift) % len(ATTRIBUTES[a])
    images = render_items(codes["category"], codes["colour"], codes["pattern"], 32, rng).images
    texts = write_texts(codes, visual_mention_prob=0.6, rng=rng)
    return images, texts, np.array(ATTRIBUTES["category"])[codes["category"]]


# --- fitting ---------------------------------------------------------------------------------------------


def test_judge_reads_the_right_attributes_and_beats_chance_on_heldout_items(judge: AttributeJudge):
    assert judge.image_attributes == ["category", "colour", "pattern"]
    assert judge.text_attributes == ["category", "style", "material", "room"]
    assert judge.info["n_train"] + judge.info["n_heldout"] == WORLD.n_items and judge.info["n_heldout"] == 48
    measured = [k for k in judge.accuracy if not k.endswith(("_chance", "_noisy"))]
    assert len(measured) == 7
    for key in measured:
        chance = judge.accuracy[f"{key}_chance"]
        assert chance < 0.5
        assert judge.accuracy[key] >= 0.85 and judge.accuracy[key] > chance + 0.4, key
    for a in judge.image_attributes:
        assert judge.accuracy[f"image_{a}_noisy"] >= 0.8, a


def test_fit_is_deterministic_for_a_seed(world: ProcessedDataset, judge: AttributeJudge):
    again = AttributeJudge.fit(world, seed=0)
    for mine, theirs in ((judge.image_head, again.image_head), (judge.text_head, again.text_head)):
        assert torch.equal(mine.weight, theirs.weight) and torch.equal(mine.bias, theirs.bias)
    assert again.accuracy == judge.accuracy and again.text_vocabulary == judge.text_vocabulary


def test_text_vocabulary_comes_from_training_items_only(world: ProcessedDataset, judge: AttributeJudge):
    held = set(judge.info["heldout_items"])
    assert len(held) == judge.info["n_heldout"]
    texts = world.items["text"]
    train_words = {w for i, t in enumerate(texts) if i not in held for w in words(t)}
    assert set(judge.text_vocabulary) == train_words


# --- hit rates ---------------------------------------------------------------------------------------------


def test_hit_rates_are_one_for_preferred_content_and_low_for_mismatched(world, judge):
    users = world.users
    images, texts, categories = content_for(users)
    hits = preference_hit_rates(judge, users, images=images, texts=texts)
    expected = {f"hit_image_{a}" for a in IMAGE_PREFS} | {f"hit_text_{a}" for a in TEXT_PREFS}
    assert set(hits) == expected | {"hit_image", "hit_text"}
    assert all(v >= 0.95 for v in hits.values()), hits
    assert hits["hit_image"] == pytest.approx(np.mean([hits[f"hit_image_{a}"] for a in IMAGE_PREFS]))
    assert target_hit_rate(judge, categories, images=images, texts=texts) == {
        "target_hit_image": pytest.approx(1.0, abs=0.05),
        "target_hit_text": pytest.approx(1.0, abs=0.05),
    }

    wrong_images, wrong_texts, _ = content_for(users, shift=1)
    misses = preference_hit_rates(judge, users, images=wrong_images, texts=wrong_texts)
    assert all(v <= 0.05 for v in misses.values()), misses
    other = np.roll(categories, 1)
    assert target_hit_rate(judge, other, texts=texts)["target_hit_text"] < 0.5


def test_noisy_generations_are_still_judged(world, judge):
    images, _, _ = content_for(world.users, seed=2)
    rng = np.random.default_rng(0)
    noisy = np.clip(images + rng.normal(0, 20, images.shape), 0, 255).astype(np.uint8)
    assert preference_hit_rates(judge, world.users, images=noisy)["hit_image"] >= 0.9


def test_larger_images_are_resized_to_the_catalog_size(world, judge):
    images, _, _ = content_for(world.users, seed=3)
    big = images.repeat(2, axis=1).repeat(2, axis=2)  # 64x64, nearest-neighbour upscale
    small_pred, big_pred = judge.predict_images(images), judge.predict_images(big)
    agree = np.mean([s == b for a in small_pred for s, b in zip(small_pred[a], big_pred[a])])
    assert agree >= 0.9


def test_only_the_given_modality_is_scored(world, judge):
    _, texts, _ = content_for(world.users)
    assert set(preference_hit_rates(judge, world.users, texts=texts)) == {
        f"hit_text_{a}" for a in TEXT_PREFS
    } | {"hit_text"}


# --- saving and errors -----------------------------------------------------------------------------------


def test_save_then_load_predicts_the_same(world, judge, tmp_path: Path):
    images, texts, _ = content_for(world.users)
    path = judge.save(tmp_path / "judge.safetensors")
    loaded = AttributeJudge.load(path)
    assert loaded.predict_images(images) == judge.predict_images(images)
    assert loaded.predict_texts(texts) == judge.predict_texts(texts)
    assert loaded.accuracy == judge.accuracy and loaded.info == judge.info
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DppmgError, match="junk.safetensors"):
        AttributeJudge.load(tmp_path / "junk.safetensors")


def test_dataset_without_ground_truth_raises_or_gives_none(world: ProcessedDataset):
    items = world.items[[c for c in world.items.columns if not c.startswith("attr_")]]
    plain = ProcessedDataset(world.root, items, world.interactions, world.users[["user_idx", "user_id"]], {})
    with pytest.raises(DppmgError, match="attr_"):
        AttributeJudge.fit(plain)
    assert fit_judge(plain) is None
    # attributes without users' tastes: nothing to judge a generation against either
    no_tastes = ProcessedDataset(world.root, world.items, world.interactions, plain.users, {})
    assert fit_judge(no_tastes) is None


def test_bad_inputs_name_what_is_wrong(world, judge):
    images, texts, _ = content_for(world.users)
    with pytest.raises(DppmgError, match=r"uint8 \[N, H, W, 3\]"):
        judge.predict_images(images.astype(np.float32))
    with pytest.raises(DppmgError, match=r"uint8 \[N, H, W, 3\]"):
        judge.predict_images(images[..., 0])
    with pytest.raises(DppmgError, match="aligned"):
        preference_hit_rates(judge, world.users, images=images[:-1])
    with pytest.raises(DppmgError, match="pref_text_room"):
        preference_hit_rates(judge, world.users.drop(columns="pref_text_room"), texts=texts)
    with pytest.raises(DppmgError, match="images, texts or both"):
        preference_hit_rates(judge, world.users)
    with pytest.raises(DppmgError, match="heldout_fraction"):
        AttributeJudge.fit(world, heldout_fraction=1.0)


@pytest.mark.slow
def test_minilm_text_features_also_beat_chance(world: ProcessedDataset):
    # The alternative text classifier (MiniLM embeddings; the world has no features, so it encodes them).
    judge = AttributeJudge.fit(world, text_features="minilm")
    assert judge.text_vocabulary == []
    for a in judge.text_attributes:
        assert judge.accuracy[f"text_{a}"] > judge.accuracy[f"text_{a}_chance"] + 0.4, a
    _, texts, _ = content_for(world.users)
    assert preference_hit_rates(judge, world.users, texts=texts)["hit_text"] >= 0.8
