"""Property-based tests (hypothesis): invariants that must hold for any small valid input, not just hand-picked ones.

    loaders       a generated custom dataset (CSV or JSONL, unicode texts, ISO or integer timestamps) round-trips
                  through the processed format: read, processed, written, read back
    quantizer     codes in [0, K) of shape [N, L], and decoding them gives the quantized vectors (eval mode)
    tokens        a token checkpoint saved and loaded gives the same tensors (bit for bit) and manifest
    rewards       finite in, finite out within each reward's bounds; non-finite rows flagged by `finite_mask`

Examples are few (`SETTINGS`) so that the file runs in well under a minute on two cores; a failure prints the
smallest example hypothesis found.
"""

from __future__ import annotations

import json
import math
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dppmg.config import DataConfig
from dppmg.data.format import content_hash, load_dataset, write_features, write_meta, write_tables
from dppmg.data.loaders import load_source
from dppmg.data.processing import process
from dppmg.tokens import TokenCheckpoint, save_token_checkpoint
from stage1_preference.quantizer import PreferenceQuantizer
from stage2_generation.rewards import (
    DEFAULT_WEIGHTS,
    REWARDS,
    RewardInputs,
    combine,
    finite_mask,
    group_advantages,
    pmg_objective,
)

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
COSINE_TOL = 1e-5  # float32 cosines may overshoot ±1 by a rounding step

# Printable text of any script: letters, digits, punctuation, symbols and spaces (no control characters, which
# no source format carries in a field, and no surrogates, which UTF-8 cannot encode).
PRINTABLE = st.characters(categories=["L", "M", "N", "P", "S", "Zs"])
# Strings a CSV reader likes to turn into something else: pandas reads "NA", "null", "nan", "None" as missing.
TRICKY = st.sampled_from(
    ["NA", "N/A", "null", "nan", "None", "#N/A", "-nan", "007", " padded ", "a,b", 'say "hi"']
)
TEXT = st.one_of(st.text(PRINTABLE, min_size=1, max_size=20), TRICKY)
IDS = st.one_of(st.text(PRINTABLE, min_size=1, max_size=8), TRICKY)


# ---------------------------------------------------------------------------------------------------------
# The loaders: the custom format through processing and the processed format


@st.composite
def custom_datasets(draw) -> dict:
    """A valid small custom dataset: unique item ids with texts and keywords, interactions naming those items."""
    item_ids = draw(st.lists(IDS.filter(lambda s: s.strip()), min_size=1, max_size=6, unique=True))
    items = [{"item_id": i, "text": draw(TEXT), "keywords": draw(TEXT)} for i in item_ids]
    user_ids = draw(st.lists(IDS.filter(lambda s: s.strip()), min_size=1, max_size=5, unique=True))
    rows = draw(
        st.lists(
            st.tuples(
                st.sampled_from(user_ids),
                st.sampled_from(item_ids),
                st.integers(0, 2_000_000_000),
                st.booleans(),  # written as an ISO-8601 date rather than integer seconds
            ),
            min_size=1,
            max_size=25,
        )
    )
    fmt = draw(st.sampled_from(["csv", "jsonl"]))
    return {"items": items, "interactions": rows, "format": fmt}


def _write_custom(folder: Path, data: dict) -> None:
    inter = [
        {
            "user_id": u,
            "item_id": i,
            "timestamp": datetime.fromtimestamp(t, timezone.utc).isoformat() if iso else t,
        }
        for u, i, t, iso in data["interactions"]
    ]
    for name, records in (("items", data["items"]), ("interactions", inter)):
        if data["format"] == "csv":
            pd.DataFrame(records).astype(str).to_csv(folder / f"{name}.csv", index=False)
        else:
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            (folder / f"{name}.jsonl").write_text(lines, encoding="utf-8")


def _expected(data: dict) -> tuple[list, list, list[tuple]]:
    """Users, items and (user, item, timestamp) rows the processing documents: dedupe=last keeps each (user, item)
    pair's latest interaction (the later row on a tie), users in order of first appearance, items in source order,
    only those with interactions; rows sorted by user, then time (ties in row order)."""
    latest: dict[tuple, tuple[int, int]] = {}
    for row, (u, i, t, _) in enumerate(data["interactions"]):
        if (u, i) not in latest or (t, row) >= latest[(u, i)]:
            latest[(u, i)] = (t, row)
    kept = sorted(((u, i, t, row) for (u, i), (t, row) in latest.items()), key=lambda r: r[3])
    users = list(dict.fromkeys(u for u, *_ in data["interactions"]))
    used = {i for _, i, _, _ in kept}
    items = [it for it in data["items"] if it["item_id"] in used]
    order = {u: k for k, u in enumerate(users)}
    rows = sorted(kept, key=lambda r: (order[r[0]], r[2], r[3]))
    return users, items, [(u, i, t) for u, i, t, _ in rows]


def _text_or_none(value: str) -> str | None:
    return value if value.strip() else None  # whitespace-only is no text (dppmg/data/loaders/custom.py)


@SETTINGS
@given(data=custom_datasets())
def test_custom_dataset_round_trips_through_the_processed_format(data):
    with tempfile.TemporaryDirectory() as tmp:
        raw_dir, out = Path(tmp) / "raw", Path(tmp) / "processed"
        raw_dir.mkdir()
        out.mkdir()
        _write_custom(raw_dir, data)
        raw = load_source(DataConfig(source="custom", raw_dir=str(raw_dir)), seed=0)
        tables = process(raw, DataConfig(source="custom"), seed=0, progress=False)
        # The processed-format writer and reader as `data prepare` calls them, with stand-in features instead of
        # the text encoder's (encoding is what costs; the format is what is tested).
        features = np.random.default_rng(0).standard_normal((len(tables.items), 3)).astype(np.float32)
        digest = content_hash(tables.items, tables.interactions, tables.users)
        write_tables(out, tables.items, tables.interactions, tables.users)
        write_features(out, "text", features)
        write_meta(out, {"content_hash": digest, "modalities": ["text"]})
        ds = load_dataset(out)

    users, items, rows = _expected(data)
    assert ds.users["user_id"].tolist() == users
    assert ds.items["item_id"].tolist() == [it["item_id"] for it in items]
    assert ds.items["text"].tolist() == [_text_or_none(it["text"]) for it in items]
    assert ds.items["keywords"].tolist() == [_text_or_none(it["keywords"]) for it in items]
    got = [
        (ds.users["user_id"].iat[u], ds.items["item_id"].iat[i], t)
        for u, i, t in ds.interactions[["user_idx", "item_idx", "timestamp"]].itertuples(index=False)
    ]
    assert got == rows
    assert ds.interactions["split"].isin(["train", "valid", "test"]).all()
    np.testing.assert_array_equal(ds.features["text"], features)
    assert content_hash(ds.items, ds.interactions, ds.users) == digest  # the hash survives the round trip


# ---------------------------------------------------------------------------------------------------------
# The quantizer


@SETTINGS
@given(
    dim=st.integers(1, 8),
    levels=st.integers(1, 3),
    codebook_size=st.integers(2, 12),
    n=st.integers(1, 40),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_quantizer_codes_are_in_range_and_decode_to_the_quantized_vectors(
    dim, levels, codebook_size, n, scale, seed
):
    torch.manual_seed(seed)
    quantizer = PreferenceQuantizer(["text"], dim=dim, levels=levels, codebook_size=codebook_size)
    x = torch.randn(n, dim) * scale
    quantizer.train()
    quantizer("text", x)  # k-means initialisation on the first batch, and an EMA step
    quantizer.eval()
    out = quantizer("text", torch.randn(n, dim) * scale)
    assert out.codes.shape == (n, levels) and out.codes.dtype == torch.long
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < codebook_size
    decoded = quantizer.decode("text", out.codes)
    assert decoded.shape == (n, dim)
    torch.testing.assert_close(decoded, out.quantized, rtol=1e-5, atol=1e-5 * scale)


# ---------------------------------------------------------------------------------------------------------
# The token checkpoint

# No subnormals: a library imported by the other tests turns on flush-to-zero, and hypothesis then refuses them.
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOATS32 = st.floats(-FLOAT32_MAX, FLOAT32_MAX, width=32, allow_subnormal=False)  # bounded: no rejected draws
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False)
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)  # fmt: skip


@st.composite
def token_checkpoints(draw) -> dict:
    modalities = draw(st.lists(st.sampled_from(["text", "image"]), min_size=1, max_size=2, unique=True))
    num_users = draw(st.integers(1, 6))
    books, codes, vectors = {}, {}, {}
    for m in modalities:
        levels, size, dim = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
        books[m] = torch.tensor(
            draw(st.lists(FLOATS32, min_size=levels * size * dim, max_size=levels * size * dim))
        )
        books[m] = books[m].reshape(levels, size, dim)
        codes[m] = torch.tensor(
            draw(st.lists(st.integers(0, size - 1), min_size=num_users * levels, max_size=num_users * levels))
        ).reshape(num_users, levels)
        vectors[m] = torch.tensor(
            draw(st.lists(FLOATS32, min_size=num_users * dim, max_size=num_users * dim))
        )
        vectors[m] = vectors[m].reshape(num_users, dim)
    return {
        "codebooks": books,
        "codes": codes,
        "user_vectors": vectors,
        "user_ids": draw(
            st.lists(st.text(min_size=1, max_size=8), min_size=num_users, max_size=num_users, unique=True)
        ),
        "dataset": {
            "name": draw(st.text(max_size=8)),
            "path": "/nowhere",
            "content_hash": draw(st.text(max_size=16)),
        },
        "config": draw(st.dictionaries(st.text(max_size=6), JSON, max_size=4)),
        "metrics": draw(st.dictionaries(st.text(max_size=6), JSON, max_size=3)),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers: equal bits, not just equal values (-0.0 is not 0.0 here)."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@SETTINGS
@given(ck=token_checkpoints())
def test_token_checkpoint_save_and_load_are_identical(ck):
    with tempfile.TemporaryDirectory() as tmp:
        save_token_checkpoint(Path(tmp) / "a", **ck)
        loaded = TokenCheckpoint.load(Path(tmp) / "a")
        save_token_checkpoint(
            Path(tmp) / "b", codebooks=loaded.codebooks, codes=loaded.codes, user_vectors=loaded.user_vectors,
            user_ids=loaded.user_ids, dataset=loaded.manifest["dataset"], config=loaded.manifest["config"],
            metrics=loaded.manifest["metrics"],
        )  # fmt: skip
        again = TokenCheckpoint.load(Path(tmp) / "b")
    for name in ("codebooks", "codes", "user_vectors"):
        stored = getattr(loaded, name)
        assert set(stored) == set(ck[name])
        for m, t in ck[name].items():
            assert stored[m].shape == t.shape
            assert torch.equal(_bits(stored[m]), _bits(t)), (name, m)
    assert loaded.user_ids == ck["user_ids"]
    assert loaded.manifest["dataset"] == ck["dataset"]
    assert loaded.manifest["config"] == ck["config"] and loaded.manifest["metrics"] == ck["metrics"]
    for m, book in ck["codebooks"].items():
        assert (loaded.levels(m), loaded.codebook_size(m), loaded.dim(m)) == tuple(book.shape)
    # A second save of what was loaded gives the same manifest (but its time) and the same tokens.
    strip = lambda manifest: {k: v for k, v in manifest.items() if k != "created"}  # noqa: E731
    assert strip(again.manifest) == strip(loaded.manifest)
    assert again.digest() == loaded.digest()


# ---------------------------------------------------------------------------------------------------------
# The rewards

FINITE = FLOATS32  # any finite float32, up to ±3.4e38
LARGE = st.floats(
    -float(np.float32(1e35)), float(np.float32(1e35)), width=32, allow_subnormal=False
)  # x 1e3 stays finite
ANY = st.one_of(FINITE, st.sampled_from([math.nan, math.inf, -math.inf]))
# Each registered reward's range, from its docstring: a cosine, a mean of cosines, or a mean of those.
BOUNDED = {
    "personalization_text": (-1.0, 1.0),
    "personalization_image": (-1.0, 1.0),
    "consistency": (-1.0, 1.0),
    "fidelity_text": (-1.0, 1.0),
    "fidelity_image": (-1.0, 1.0),
    "fidelity": (-1.0, 1.0),
}


def _tensor(draw, shape: tuple[int, ...], elements) -> torch.Tensor:
    return torch.from_numpy(draw(arrays(np.float32, shape, elements=elements)))


@st.composite
def reward_inputs(draw, elements=FINITE) -> RewardInputs:
    """Every field set, N rows, H history slots with at least one real item per row."""
    n, h, dt, p = (
        draw(st.integers(1, 4)),
        draw(st.integers(1, 4)),
        draw(st.integers(1, 4)),
        draw(st.integers(1, 4)),
    )
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n * h, max_size=n * h))).reshape(n, h)
    mask[:, 0] = True
    image_mask = mask & torch.tensor(draw(st.lists(st.booleans(), min_size=n * h, max_size=n * h))).reshape(
        n, h
    )
    image_mask[:, 0] = True
    return RewardInputs(
        gen_text_emb=_tensor(draw, (n, dt), elements),
        gen_text_scorer_emb=_tensor(draw, (n, p), elements),
        gen_image_emb=_tensor(draw, (n, p), elements),
        history_text_emb=_tensor(draw, (n, h, dt), elements),
        history_image_emb=_tensor(draw, (n, h, p), elements),
        history_mask=mask,
        history_image_mask=image_mask,
        target_text_emb=_tensor(draw, (n, dt), elements),
        target_scorer_text_emb=_tensor(draw, (n, p), elements),
        target_image_emb=_tensor(draw, (n, p), elements),
        target_image_mask=torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n))),
    )


@SETTINGS
@given(inputs=reward_inputs())
def test_rewards_of_finite_inputs_are_finite_and_within_their_bounds(inputs):
    n = inputs.num_rows
    for name, fn in REWARDS.items():
        value = fn(inputs)
        assert value.shape == (n,) and torch.isfinite(value).all(), (name, value)
        low, high = BOUNDED[name]
        assert (value >= low - COSINE_TOL).all() and (value <= high + COSINE_TOL).all(), (name, value)
    result = combine(inputs, DEFAULT_WEIGHTS)
    assert finite_mask(result).all()
    bound = sum(abs(w) for w in DEFAULT_WEIGHTS.values()) * (1 + COSINE_TOL)
    assert (result.total.abs() <= bound).all()


def _poison(inputs: RewardInputs, draw) -> tuple[RewardInputs, torch.Tensor]:
    """`inputs` with one non-finite value in a slot some reward reads; returns the row it is in."""
    used = {
        "gen_text_emb": None, "gen_text_scorer_emb": None, "gen_image_emb": None,
        "history_text_emb": inputs.history_mask, "history_image_emb": inputs.history_image_mask,
        "target_text_emb": None, "target_scorer_text_emb": None,
        "target_image_emb": inputs.target_image_mask,
    }  # fmt: skip
    name = draw(st.sampled_from(sorted(used)))
    value = getattr(inputs, name).clone()
    rows = torch.arange(len(value))
    if used[name] is not None:  # only real history items, only targets that have an image, are read
        real = used[name].bool()
        rows = rows[real.any(-1)] if real.dim() == 2 else rows[real]
    assume(len(rows))
    row = draw(st.sampled_from(rows.tolist()))
    index = [row]
    if value.dim() == 3:
        slots = torch.nonzero(used[name][row]).flatten().tolist()
        index.append(draw(st.sampled_from(slots)))
    index.append(draw(st.integers(0, value.shape[-1] - 1)))
    value[tuple(index)] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    setattr(inputs, name, value)
    return inputs, row


@SETTINGS
@given(inputs=reward_inputs(), data=st.data())
def test_a_non_finite_input_is_flagged_by_finite_mask_and_stays_in_its_row(inputs, data):
    clean = combine(inputs, DEFAULT_WEIGHTS)
    poisoned, row = _poison(inputs, data.draw)
    result = combine(poisoned, DEFAULT_WEIGHTS)
    ok = finite_mask(result)
    assert not ok[row], "a NaN or inf in a slot the rewards read gave a finite reward"
    others = torch.arange(len(ok)) != row
    assert ok[others].all()
    torch.testing.assert_close(result.total[others], clean.total[others])


@SETTINGS
@given(inputs=reward_inputs(), data=st.data())
def test_padding_and_missing_target_images_never_count_whatever_they_hold(inputs, data):
    """history_similarity: "padded positions never count, whatever they hold"; target_image_emb: rows without an
    image "carry any values"."""
    before = combine(inputs, DEFAULT_WEIGHTS)
    junk = st.sampled_from([math.nan, math.inf, -math.inf, 1e30])
    for name, mask in (
        ("history_text_emb", inputs.history_mask),
        ("history_image_emb", inputs.history_image_mask),
        ("target_image_emb", inputs.target_image_mask),
    ):
        value = getattr(inputs, name).clone()
        value[~mask.bool()] = data.draw(junk)
        setattr(inputs, name, value)
    after = combine(inputs, DEFAULT_WEIGHTS)
    torch.testing.assert_close(after.total, before.total)
    assert finite_mask(after).all()


@SETTINGS
@given(
    rewards=st.lists(ANY, min_size=1, max_size=12),
    data=st.data(),
)
def test_group_advantages_are_finite_zero_mean_z_scores(rewards, data):
    r = torch.tensor(rewards, dtype=torch.float32)
    groups = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=len(r), max_size=len(r))))
    adv = group_advantages(r, groups)
    assert torch.isfinite(adv).all()
    finite = torch.isfinite(r)
    assert (adv[~finite] == 0).all()  # a non-finite reward gets advantage 0
    for g in groups.unique():
        members = (groups == g) & finite
        k = int(members.sum())
        if k:
            # z-scores with the population std: they sum to 0 and none exceeds sqrt(k - 1) in size.
            assert abs(float(adv[members].double().sum())) <= 1e-3 * k
            assert (adv[members].abs() <= math.sqrt(max(k - 1, 0)) + 1e-3).all()


@SETTINGS
@given(
    personalization=st.floats(-1, 1), fidelity=st.floats(-1, 1), alpha=st.floats(0, 1),
)  # fmt: skip
def test_pmg_objective_is_finite_and_at_most_zero(personalization, fidelity, alpha):
    z = pmg_objective(personalization, fidelity, alpha)
    assert torch.isfinite(z) and float(z) <= 0


def test_every_registered_reward_has_a_stated_bound():
    """A new reward must state its range in BOUNDED, so that the bounds property covers it."""
    assert set(REWARDS) == set(BOUNDED)


@SETTINGS
@given(x=arrays(np.float32, (3, 4), elements=LARGE), scale=st.floats(1e-3, 1e3))
def test_rewards_compare_directions_at_any_magnitude(x, scale):
    """ "Embeddings need not be normalised": a vector is similar 1 to itself scaled, however long it is."""
    x = torch.from_numpy(x)
    assume(bool((x.double().norm(dim=-1) > 1e-6).all()))  # shorter ones meet COSINE_EPS, similar 0 by design
    inputs = RewardInputs(gen_text_scorer_emb=x, gen_image_emb=x * scale)
    torch.testing.assert_close(REWARDS["consistency"](inputs), torch.ones(3))
