import json

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from dppmg.config import ScorerConfig
from dppmg.device import resolve_device
from dppmg.errors import DppmgError
from dppmg.scorer import (
    Scorer,
    build_scorer,
    build_tiny_scorer,
    build_tokenizer,
    contrastive_loss,
    evaluate_retrieval,
    heldout_split,
    random_shift,
    train_scorer,
)

COLOURS = {  # name → (RGB, synonyms)
    "red": ((220, 30, 30), ["crimson", "scarlet"]),
    "green": ((30, 180, 40), ["emerald", "leafy"]),
    "blue": ((30, 60, 220), ["navy", "azure"]),
    "yellow": ((235, 220, 30), ["golden", "lemon"]),
    "purple": ((140, 40, 170), ["violet", "plum"]),
    "orange": ((245, 140, 20), ["tangerine", "amber"]),
    "black": ((15, 15, 15), ["dark", "jet"]),
    "white": ((250, 250, 250), ["snowy", "ivory"]),
}
SHAPES = {"square": ["box", "block"], "circle": ["round thing", "disc"], "triangle": ["wedge", "pyramid"]}
TEMPLATES = ["a {c} {s}", "the {c} {s}", "one {c} {s} on grey", "{c} {s}"]


def toy_pairs(n: int, seed: int = 0, size: int = 32) -> tuple[list[str], np.ndarray]:
    """n (text, image) pairs: coloured squares, circles and triangles on grey, with synonym captions."""
    rng = np.random.default_rng(seed)
    colours, shapes = list(COLOURS), list(SHAPES)
    yy, xx = np.mgrid[0:size, 0:size]
    texts, images = [], np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        colour, shape = colours[i % len(colours)], shapes[(i // len(colours)) % len(shapes)]
        r = rng.integers(size // 5, size // 3)
        cy, cx = rng.integers(r, size - r, size=2)
        if shape == "square":
            mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        elif shape == "circle":
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        else:
            mask = (yy >= cy - r) & (yy <= cy + r) & (abs(xx - cx) <= (yy - cy + r) / 2)
        img = np.full((size, size, 3), 128, dtype=np.int16) + rng.integers(-12, 13, size=(size, size, 1))
        img[mask] = COLOURS[colour][0]
        images[i] = img.clip(0, 255).astype(np.uint8)
        words_c = rng.choice([colour, *COLOURS[colour][1]])
        words_s = rng.choice([shape, *SHAPES[shape]])
        texts.append(rng.choice(TEMPLATES).format(c=words_c, s=words_s))
    return texts, images


def tiny_cfg(**kw) -> ScorerConfig:
    base = dict(
        hidden_size=32, num_layers=1, num_heads=2, projection_dim=16, patch_size=8, max_text_length=16
    )
    return ScorerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data():
    return toy_pairs(48)


@pytest.fixture
def scorer(data):
    torch.manual_seed(0)
    return build_tiny_scorer(tiny_cfg(), data[0])


def test_embeddings_have_shape_and_unit_norm(scorer, data):
    texts, images = data
    t = scorer.encode_text(texts[:5])
    i = scorer.encode_images(images[:7])
    assert t.shape == (5, 16) and i.shape == (7, 16)
    assert torch.allclose(t.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(i.norm(dim=-1), torch.ones(7), atol=1e-5)
    sim = scorer.similarity(t[:5], i[:5])
    assert sim.shape == (5,) and (sim.abs() <= 1 + 1e-5).all()
    assert torch.allclose(scorer.similarity(t, t), torch.ones(5), atol=1e-5)


def test_image_inputs_uint8_float_and_other_sizes_agree(scorer, data):
    _, images = data
    as_uint8 = scorer.encode_images(images[:4])
    as_float = scorer.encode_images(torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float() / 255)
    assert torch.allclose(as_uint8, as_float, atol=1e-5)
    big = np.repeat(np.repeat(images[:4], 2, axis=1), 2, axis=2)  # 64×64, resized back to 32
    assert scorer.encode_images(big).shape == (4, 16)
    assert torch.allclose(scorer.encode_images(big), as_uint8, atol=0.1)
    with pytest.raises(DppmgError, match="batch"):
        scorer.encode_images(images[0])


def test_batching_does_not_change_embeddings(scorer, data):
    texts, images = data
    assert torch.allclose(scorer.encode_text(texts, batch_size=5), scorer.encode_text(texts), atol=1e-5)
    assert torch.allclose(scorer.encode_images(images, batch_size=7), scorer.encode_images(images), atol=1e-5)


def test_image_features_are_differentiable(scorer, data):
    pixels = (torch.from_numpy(data[1][:2]).permute(0, 3, 1, 2).float() / 255).requires_grad_()
    scorer.image_features(pixels).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_tokenizer_wraps_words_in_bos_eos_and_lowercases():
    tok = build_tokenizer(["a red circle", "a blue square!"], max_vocab=100, max_length=8)
    assert [tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2, 3]
    ids = tok("A RED, circle zebra")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3
    assert ids[1:-1] == [tok.convert_tokens_to_ids(w) for w in ["a", "red"]] + [
        1,
        tok.convert_tokens_to_ids("circle"),
        1,
    ]
    long = tok("a " * 20, truncation=True, max_length=8)["input_ids"]
    assert len(long) == 8 and long[-1] == 3  # truncation keeps the EOS the model pools at
    small = build_tokenizer(["a a a red red blue"], max_vocab=2, max_length=8)
    assert set(small.get_vocab()) == {"[PAD]", "[UNK]", "[BOS]", "[EOS]", "a", "red"}  # most frequent kept


def test_text_embedding_pools_at_eos(scorer):
    """Padding and anything after EOS must not move the embedding; a real word must."""
    ids = scorer.tokenize(["a red circle"])
    base = scorer.text_features(**ids)
    red = scorer.tokenizer.convert_tokens_to_ids("red")
    blue = scorer.tokenizer.convert_tokens_to_ids("blue")
    eos = scorer.tokenizer.eos_token_id
    n = ids["input_ids"].shape[1]
    # Same text followed by junk after EOS (attention mask covering it): causal attention ignores it. The
    # junk holds the largest id, where CLIP's legacy argmax pooling would look instead of at EOS.
    top = len(scorer.tokenizer) - 1
    junk = torch.tensor([[*ids["input_ids"][0].tolist(), top, top]])
    assert torch.allclose(scorer.text_features(junk, torch.ones_like(junk)), base, atol=1e-5)
    padded = scorer.tokenize(["a red circle", "a red circle and a big blue square"])
    assert padded["input_ids"].shape[1] > n
    assert torch.allclose(scorer.text_features(**padded)[0], base[0], atol=1e-5)
    changed = ids["input_ids"].clone()
    changed[0, 2] = blue  # "a blue circle"
    assert (ids["input_ids"][0, 2] == red) and (changed[0, -1] == eos)
    assert not torch.allclose(scorer.text_features(changed, ids["attention_mask"]), base, atol=1e-3)
    assert scorer.model.config.text_config.eos_token_id == eos != 2  # "first EOS" pooling, not argmax


def test_save_load_roundtrip_gives_identical_embeddings(scorer, data, tmp_path):
    texts, images = data
    scorer.save(tmp_path / "scorer")
    settings = json.loads((tmp_path / "scorer" / "scorer.json").read_text())
    assert settings["image_size"] == 32 and settings["kind"] == "tiny" and len(settings["image_mean"]) == 3
    loaded = Scorer.load(tmp_path / "scorer")
    assert torch.equal(loaded.encode_text(texts), scorer.encode_text(texts))
    assert torch.equal(loaded.encode_images(images), scorer.encode_images(images))
    with pytest.raises(DppmgError, match="no scorer"):
        Scorer.load(tmp_path / "missing")


def test_pretrained_path_loads_a_saved_clip_folder(data, tmp_path):
    """A plain CLIPModel folder (no scorer.json) is loaded like a hub id and keeps its own image size."""
    texts, images = data
    tok = build_tokenizer(texts, max_vocab=100, max_length=12)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            common,
            vocab_size=len(tok),
            max_position_embeddings=12,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        ),
        vision_config=dict(common, image_size=24, patch_size=6),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    cfg = ScorerConfig(pretrained=str(tmp_path / "clip"), heldout_fraction=0.25)
    scorer, report = build_scorer(cfg, texts, images, seed=0, progress=False)
    assert scorer.image_size == 24 and scorer.max_text_length == 12 and scorer.kind.startswith("pretrained:")
    assert scorer.encode_images(images[:3]).shape == (3, 8)  # 32×32 inputs resized to 24
    assert report["n_heldout"] == 12 and report["steps"] == 0 and 0 <= report["recall@5"] <= 1
    with pytest.raises(DppmgError, match="could not be loaded"):
        Scorer.from_pretrained(str(tmp_path / "nothing-here"))


def test_device_auto_resolves_to_an_available_device(scorer):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device("cpu").type == "cpu"
    assert scorer.to("auto").device.type == expected


def test_contrastive_loss_is_low_for_matched_pairs():
    emb = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(np.log(100.0))
    assert contrastive_loss(emb, emb, scale) < 0.1
    assert contrastive_loss(emb, emb.roll(1, 0), scale) > 1.0


def test_random_shift_moves_content_within_bounds():
    x = torch.zeros(4, 3, 8, 8)
    x[:, :, 4, 4] = 1.0
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for img in out:
        y, xx = (img[0] == 1).nonzero()[0].tolist()
        assert abs(y - 4) <= 2 and abs(xx - 4) <= 2
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)


def test_heldout_split_is_seeded_and_disjoint():
    tr, ho = heldout_split(50, 0.2, seed=3)
    assert len(ho) == 10 and len(tr) == 40 and not set(tr) & set(ho)
    assert np.array_equal(ho, heldout_split(50, 0.2, seed=3)[1])
    assert not np.array_equal(ho, heldout_split(50, 0.2, seed=4)[1])
    with pytest.raises(DppmgError, match="at least 2"):
        heldout_split(2, 0.5, seed=0)


def test_evaluate_retrieval_counts_hits():
    class Fixed:  # a stand-in with hand-made embeddings: text i matches image i except for text 3
        model = torch.nn.Linear(1, 1)

        def encode_text(self, texts):
            e = torch.eye(4)
            e[3] = torch.tensor([1.0, 0, 0, 0])
            return e

        def encode_images(self, images):
            return torch.eye(4)

    r = evaluate_retrieval(Fixed(), ["a"] * 4, np.zeros((4, 2, 2, 3), np.uint8), ks=(1, 4))
    assert r == {"n": 4, "recall@1": 0.75, "chance@1": 0.25, "recall@4": 1.0, "chance@4": 1.0}


def test_training_lowers_loss_and_beats_chance_on_heldout():
    texts, images = toy_pairs(96, seed=1)
    # 40 epochs × 3 steps: ~1 s on 2 idle cores. Over seeds 0-9 the final loss was < 0.45 × the first
    # epoch's and held-out recall@5 ≥ 0.83 (chance 0.42), so the bounds below leave a margin.
    cfg = tiny_cfg(epochs=40, batch_size=32, lr=2e-3, heldout_fraction=0.125)
    scorer, report = train_scorer(texts, images, cfg, seed=0, progress=False)
    assert report["n_train"] == 84 and report["n_heldout"] == 12 and report["kind"] == "tiny"
    assert report["loss_final"] < 0.6 * report["loss_initial"]
    assert report["chance@5"] == pytest.approx(5 / 12)
    assert report["recall@5"] >= report["chance@5"] + 0.25
    assert not scorer.model.training


def test_train_scorer_rejects_mismatched_inputs():
    texts, images = toy_pairs(10)
    with pytest.raises(DppmgError, match="one text per image"):
        train_scorer(texts[:9], images, tiny_cfg(epochs=1), seed=0, progress=False)
    with pytest.raises(DppmgError, match="uint8"):
        train_scorer(texts, images.astype(np.float32), tiny_cfg(epochs=1), seed=0, progress=False)
