"""From a `RawDataset` to indexed, filtered and split tables: the same steps for every source.

Steps, in order (each recorded in `report`):
    1. unknown items    interactions whose item is not in the items table: error or drop
    2. threshold        keep rating >= data.rating_threshold (implicit feedback)
    3. dedupe           repeated (user, item) pairs: keep the first or last by time, or all
    4. images           items whose image file is missing or does not decode: error or drop
    5. k-core           drop users and items below the minimum counts until both minimums hold
    6. index            items in source order and users in source order, only those with interactions
    7. split            leave_last_out, random (seeded), or the source's own (given)

Everything works on integer codes with numpy (no Python loop over interactions): ml-25m's 25M ratings
go through in well under a minute on a laptop. Ties in time are broken by the source's row order, so
the result depends only on the input and the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dppmg.config import DataConfig
from dppmg.data.format import SPLITS
from dppmg.data.images import check_images
from dppmg.data.raw import RawDataset
from dppmg.errors import DppmgError

TRAIN, VALID, TEST = 0, 1, 2  # split codes; names in SPLITS
GIVEN_SPLIT_NAMES = {"train": TRAIN, "valid": VALID, "test": TEST, "0": TRAIN, "1": VALID, "2": TEST}
MAX_EXAMPLES = 5  # offending rows / ids named in an error message


@dataclass
class ProcessedTables:
    """The processed tables, ready for `dppmg.data.format.write_tables`.

    items:        item_idx (0..I-1), item_id, text, keywords, image (source path or None), + raw extras
    interactions: user_idx, item_idx, timestamp (int64), split (categorical train/valid/test), (+ rating);
                  sorted by user_idx, then timestamp
    users:        user_idx (0..U-1), user_id, + extra columns of raw.users
    item_rows:    int64 [I], the row in raw.items of each kept item (to subset raw.features / raw.images)
    report:       what each step read, dropped and why, and the final counts
    """

    items: pd.DataFrame
    interactions: pd.DataFrame
    users: pd.DataFrame
    item_rows: np.ndarray
    report: dict[str, Any]


def process(raw: RawDataset, cfg: DataConfig, seed: int, progress: bool = True) -> ProcessedTables:
    """Filter, index and split `raw` as `cfg` says; deterministic for a given `seed`."""
    _check_raw(raw, cfg)
    report: dict[str, Any] = {"read": {"items": len(raw.items), "interactions": len(raw.interactions)}}
    _nonempty(len(raw.interactions), "reading the source", "the source has no interactions")
    frame, user_ids = _encode(raw, cfg, report)
    frame = _threshold(frame, cfg.rating_threshold, report)
    frame = _dedupe(frame, cfg.dedupe, len(raw.items), report)
    frame = _filter_images(frame, raw, cfg.image_policy, progress, report)
    frame = _kcore(frame, cfg.min_user_interactions, cfg.min_item_interactions, report)
    items, users, interactions, item_rows = _index(frame, raw, user_ids, report)
    interactions["split"] = _split(frame, cfg, seed)
    interactions = interactions[["user_idx", "item_idx", "timestamp", "split", *_extra(interactions)]]
    counts = interactions["split"].value_counts()
    report["split"] = {"rule": cfg.split, **{s: int(counts.get(s, 0)) for s in SPLITS}}
    if cfg.split == "random":
        report["split"]["ratios"] = list(cfg.split_ratios)
    report["final"] = {"users": len(users), "items": len(items), "interactions": len(interactions)}
    return ProcessedTables(items, interactions, users, item_rows, report)


def _extra(interactions: pd.DataFrame) -> list[str]:
    return [c for c in interactions.columns if c not in ("user_idx", "item_idx", "timestamp", "split")]


# ----------------------------------------------------------------------------------------------
# Checks and encoding


def _check_raw(raw: RawDataset, cfg: DataConfig) -> None:
    where = f"{raw.source} source"
    for name, frame, cols in (
        ("items", raw.items, ("item_id", "text", "keywords", "image")),
        ("interactions", raw.interactions, ("user_id", "item_id", "timestamp")),
    ):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise DppmgError(f"{where}: the {name} table lacks column(s) {missing}; expected {list(cols)}")
    for col in ("user_id", "item_id", "timestamp"):
        null = raw.interactions[col].isna().to_numpy()
        if null.any():
            raise DppmgError(f"{_inter_source(raw)}: row {_rows(null)}: {col} is missing")
    dup = raw.items["item_id"].duplicated(keep=False).to_numpy()
    if dup.any():
        ids = pd.unique(raw.items["item_id"][dup])
        raise DppmgError(
            f"{raw.info.get('items_file', where + ' items')}: {len(ids)} item id(s) occur more than once, "
            f"e.g. {list(ids[:MAX_EXAMPLES])}; item ids must be unique"
        )
    if cfg.rating_threshold is not None and "rating" not in raw.interactions:
        raise DppmgError(
            f"data.rating_threshold={cfg.rating_threshold} needs ratings, but {_inter_source(raw)} has no rating column"
        )
    if cfg.split == "given" and "split" not in raw.interactions:
        raise DppmgError(
            f"data.split=given needs the source's own split, but {_inter_source(raw)} has no split column"
        )


def _inter_source(raw: RawDataset) -> str:
    return str(raw.info.get("interactions_file", f"{raw.source} interactions"))


def _rows(mask: np.ndarray) -> str:
    """'3, 8, 9' : the first offending rows, 1-based as a user counts data rows."""
    return ", ".join(str(int(r) + 1) for r in np.flatnonzero(mask)[:MAX_EXAMPLES])


def _encode(raw: RawDataset, cfg: DataConfig, report: dict) -> tuple[pd.DataFrame, np.ndarray]:
    """Interactions as integer codes, sorted by (user, time, source row); also the user id of each code.

    Columns: u (user code), i (row in raw.items), t (int64 seconds), [rating], [split code].
    User codes follow raw.users' row order when there is a users table, else the order of first
    appearance in the interactions. Step 1 (unknown items) happens here, where the item codes are made.
    """
    inter = raw.interactions
    # Factorize first, then look up the few distinct ids: far cheaper than hashing every row twice.
    item_codes, item_uniques = pd.factorize(inter["item_id"])
    item_row = pd.Index(raw.items["item_id"]).get_indexer(item_uniques)[item_codes]
    if raw.users is not None:
        u, user_ids = _users_from_table(raw)
    else:
        u, uniques = pd.factorize(inter["user_id"])
        user_ids = np.asarray(uniques, dtype=object)
    report["read"]["users"] = len(_present(u)) if raw.users is not None else len(user_ids)
    frame = pd.DataFrame({"u": u.astype(np.int64), "i": item_row.astype(np.int64)})
    frame["t"] = inter["timestamp"].to_numpy().astype(np.int64)
    if "rating" in inter:
        frame["rating"] = inter["rating"].to_numpy().astype(np.float32)
    if cfg.split == "given":
        frame["split"] = _given_split_codes(inter["split"], raw)
    frame = _unknown_items(frame, inter, raw, cfg.unknown_items, report)
    return frame.iloc[_sort_order(frame["u"].to_numpy(), frame["t"].to_numpy())], user_ids


def _users_from_table(raw: RawDataset) -> tuple[np.ndarray, np.ndarray]:
    users = raw.users
    assert users is not None
    if "user_id" not in users:
        raise DppmgError(f"{raw.source} source: the users table lacks column 'user_id'")
    if users["user_id"].duplicated().any():
        raise DppmgError(f"{raw.source} source: user ids occur more than once in the users table")
    codes, uniques = pd.factorize(raw.interactions["user_id"])
    u = pd.Index(users["user_id"]).get_indexer(uniques)[codes]
    unknown = u < 0
    if unknown.any():
        raise DppmgError(
            f"{_inter_source(raw)}: row {_rows(unknown)}: user id(s) "
            f"{list(pd.unique(raw.interactions['user_id'][unknown])[:MAX_EXAMPLES])} are not in the users table"
        )
    return u, users["user_id"].to_numpy(dtype=object)


def _given_split_codes(values: pd.Series, raw: RawDataset) -> np.ndarray:
    """The source's split column as codes; accepts train/valid/test and 0/1/2."""
    codes, uniques = pd.factorize(values.astype("str").str.strip().str.lower())
    known = np.array([GIVEN_SPLIT_NAMES.get(v, -1) for v in uniques], dtype=np.int8)
    out = known[codes] if len(uniques) else np.zeros(0, dtype=np.int8)
    bad = (codes < 0) | (out < 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DppmgError(
            f"{_inter_source(raw)}: row {row + 1}: split {values.iat[row]!r} is not one of "
            "train, valid, test (or 0, 1, 2)"
        )
    return out


def _unknown_items(
    frame: pd.DataFrame, inter: pd.DataFrame, raw: RawDataset, policy: str, report: dict
) -> pd.DataFrame:
    unknown = frame["i"].to_numpy() < 0
    n = int(unknown.sum())
    report["unknown_items"] = {"policy": policy, "dropped_interactions": n if policy == "drop" else 0}
    if not n:
        return frame
    ids = list(pd.unique(inter["item_id"][unknown])[:MAX_EXAMPLES])
    if policy == "error":
        items_file = raw.info.get("items_file", "the items table")
        raise DppmgError(
            f"{_inter_source(raw)}: {n} interaction(s) name items that are not in {items_file}: "
            f"row(s) {_rows(unknown)} (item ids {ids}). Set data.unknown_items=drop to drop them"
        )
    report["unknown_items"]["examples"] = ids
    _nonempty(
        len(frame) - n, "dropping unknown items", "every interaction names an item not in the items table"
    )
    return frame[~unknown]


def _sort_order(u: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Positions that sort by (u, t), ties kept in input order (a stable sort)."""
    if not len(u):
        return np.zeros(0, dtype=np.int64)
    t_span = int(t.max()) - int(t.min())
    if t_span < 2**32 and int(u.max()) < 2**31:
        # One int64 key (user in the high bits, time offset in the low bits) sorts ~15x faster than lexsort.
        key = (u.astype(np.int64) << 32) | (t - t.min()).astype(np.int64)
        return np.argsort(key, kind="stable")
    return np.lexsort((t, u))


def _present(codes: np.ndarray) -> np.ndarray:
    """The distinct values of non-negative integer codes, ascending (np.unique, but O(n) by counting)."""
    return np.flatnonzero(np.bincount(codes)) if len(codes) else np.zeros(0, dtype=np.int64)


def _nonempty(n: int, step: str, why: str) -> None:
    if n == 0:
        raise DppmgError(f"no interactions left after {step}: {why}")


# ----------------------------------------------------------------------------------------------
# Filters: each keeps a subset of rows (the order stays sorted by user, time)


def _threshold(frame: pd.DataFrame, threshold: float | None, report: dict) -> pd.DataFrame:
    if threshold is None:
        return frame
    keep = frame["rating"].to_numpy() >= threshold  # a missing rating (NaN) fails the test
    report["rating_threshold"] = {"threshold": threshold, "dropped_interactions": int((~keep).sum())}
    _nonempty(int(keep.sum()), "the rating threshold", f"no rating is >= data.rating_threshold={threshold}")
    return frame[keep]


def _dedupe(frame: pd.DataFrame, policy: str, n_items: int, report: dict) -> pd.DataFrame:
    """Keep one interaction per (user, item): the earliest ("first") or latest ("last"); "none" keeps all."""
    if policy == "none":
        report["dedupe"] = {"policy": policy, "dropped_interactions": 0}
        return frame
    pair = frame["u"].to_numpy() * n_items + frame["i"].to_numpy()
    # frame is sorted by (user, time, row); a stable sort by pair keeps that order inside each pair.
    order = np.argsort(pair, kind="stable")
    sorted_pair = pair[order]
    if policy == "first":
        boundary = np.r_[True, sorted_pair[1:] != sorted_pair[:-1]]
    else:
        boundary = np.r_[sorted_pair[1:] != sorted_pair[:-1], True]
    keep = np.zeros(len(frame), dtype=bool)
    keep[order[boundary]] = True
    report["dedupe"] = {"policy": policy, "dropped_interactions": int((~keep).sum())}
    return frame[keep]


def _filter_images(
    frame: pd.DataFrame, raw: RawDataset, policy: str, progress: bool, report: dict
) -> pd.DataFrame:
    """Check the image files of the items still in use; only for sources with image paths."""
    paths = raw.items["image"]
    if raw.images is not None or not paths.notna().any():
        return frame
    used = _present(frame["i"].to_numpy())
    result = check_images(
        [None if pd.isna(p) else p for p in paths.to_numpy(dtype=object)[used]],
        policy,
        item_ids=raw.items["item_id"].to_numpy(dtype=object)[used].tolist(),
        progress=progress,
    )
    bad_items = used[~result.ok]
    keep = ~np.isin(frame["i"].to_numpy(), bad_items)
    report["images"] = {
        "policy": policy,
        "checked": len(used),
        "missing": result.missing,
        "unreadable": result.unreadable,
        "dropped_items": len(bad_items),
        "dropped_interactions": int((~keep).sum()),
        "examples": result.examples,
        "converted_to_rgb": result.converted,
        "sizes": result.sizes,
    }
    _nonempty(
        int(keep.sum()),
        "checking images",
        f"none of the {len(used)} items in use has a readable image (data.image_policy={policy}), "
        f"e.g. {result.examples[:2]}",
    )
    return frame[keep]


def _kcore(frame: pd.DataFrame, min_user: int, min_item: int, report: dict) -> pd.DataFrame:
    """Drop users with < min_user and items with < min_item interactions, repeatedly, to a fixed point."""
    report["kcore"] = {"min_user_interactions": min_user, "min_item_interactions": min_item}
    if min_user <= 1 and min_item <= 1:
        report["kcore"].update(rounds=0, dropped_interactions=0)
        return frame  # every user and item in the table has at least one interaction already
    u, i = frame["u"].to_numpy(), frame["i"].to_numpy()
    keep = np.ones(len(frame), dtype=bool)
    rounds = 0
    while True:
        rounds += 1
        user_n = np.bincount(u[keep], minlength=int(u.max()) + 1 if len(u) else 0)
        item_n = np.bincount(i[keep], minlength=int(i.max()) + 1 if len(i) else 0)
        new_keep = keep & (user_n[u] >= min_user) & (item_n[i] >= min_item)
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    report["kcore"].update(rounds=rounds, dropped_interactions=int((~keep).sum()))
    _nonempty(
        int(keep.sum()),
        "k-core filtering",
        f"no user has >= data.min_user_interactions={min_user} interactions with items that have "
        f">= data.min_item_interactions={min_item} (from {len(frame)} interactions)",
    )
    return frame[keep]


# ----------------------------------------------------------------------------------------------
# Indexing and splitting


def _index(
    frame: pd.DataFrame, raw: RawDataset, user_ids: np.ndarray, report: dict
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Dense indices for the users and items still in use, in their source order."""
    u, i = frame["u"].to_numpy(), frame["i"].to_numpy()
    item_rows = _present(i)  # ascending = the items table's order
    user_codes = _present(u)  # ascending = users table order, or first appearance
    report["unused_items_dropped"] = len(raw.items) - len(item_rows)

    items = raw.items.iloc[item_rows].reset_index(drop=True)
    items.insert(0, "item_idx", np.arange(len(items), dtype=np.int64))
    extra = [c for c in items.columns if c not in ("item_idx", "item_id", "text", "keywords", "image")]
    items = items[["item_idx", "item_id", "text", "keywords", "image", *extra]]

    if raw.users is not None:
        users = raw.users.iloc[user_codes].reset_index(drop=True)
        users = users[["user_id", *[c for c in users.columns if c != "user_id"]]]
    else:
        users = pd.DataFrame({"user_id": pd.Series(user_ids[user_codes], dtype="str")})
    users.insert(0, "user_idx", np.arange(len(users), dtype=np.int64))

    interactions = pd.DataFrame(
        {
            # Both maps are monotone, so the (user, time) order carries over to the new indices.
            "user_idx": np.searchsorted(user_codes, u).astype(np.int64),
            "item_idx": np.searchsorted(item_rows, i).astype(np.int64),
            "timestamp": frame["t"].to_numpy(),
        }
    )
    if "rating" in frame:
        interactions["rating"] = frame["rating"].to_numpy()
    return items, users, interactions, item_rows.astype(np.int64)


def _split(frame: pd.DataFrame, cfg: DataConfig, seed: int) -> pd.Categorical:
    """One split name per interaction of `frame` (sorted by user, time).

    Categorical rather than strings: 1 byte a row instead of a Python string, which matters at 25M rows.
    """
    u = frame["u"].to_numpy()
    if cfg.split == "given":
        codes = frame["split"].to_numpy()
    elif cfg.split == "leave_last_out":
        codes = leave_last_out_codes(u)
    else:
        codes = random_split_codes(u, cfg.split_ratios, seed)
    return pd.Categorical.from_codes(codes.astype(np.int8), categories=list(SPLITS))


def position_in_group(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For `groups` sorted ascending: each row's 0-based position in its group, and its group's size."""
    n = len(groups)
    starts = np.r_[True, groups[1:] != groups[:-1]] if n else np.zeros(0, dtype=bool)
    start_pos = np.flatnonzero(starts)
    group_of_row = np.cumsum(starts) - 1
    sizes = np.diff(np.r_[start_pos, n])
    return np.arange(n) - start_pos[group_of_row], sizes[group_of_row]


def leave_last_out_codes(u: np.ndarray) -> np.ndarray:
    """u: user codes, sorted by (user, time). Last interaction -> test, second-last -> valid.

    Users with >= 3 interactions get one test and one valid; with 2, train and test; with 1, train.
    """
    pos, size = position_in_group(u)
    from_end = size - 1 - pos
    codes = np.full(len(u), TRAIN, dtype=np.int8)
    codes[(from_end == 0) & (size >= 2)] = TEST
    codes[(from_end == 1) & (size >= 3)] = VALID
    return codes


def random_split_codes(u: np.ndarray, ratios: list[float], seed: int) -> np.ndarray:
    """u: user codes, sorted. Each user's interactions in a seeded random order, cut by `ratios`.

    The interaction at rank r of n goes to the split whose cumulative ratio first exceeds (r + 0.5) / n
    (rounding each user's counts to the nearest), and rank 0 always goes to train, so that every user
    keeps a training interaction.
    """
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 2**32, size=len(u), dtype=np.int64)
    # Sorting by (user, noise) keeps users grouped and shuffles inside each user.
    if len(u) and int(u.max()) < 2**31:
        order = np.argsort((u.astype(np.int64) << 32) | noise, kind="stable")
    else:
        order = np.lexsort((noise, u))
    rank_sorted, size_sorted = position_in_group(u[order])
    rank, size = np.empty_like(rank_sorted), np.empty_like(size_sorted)
    rank[order], size[order] = rank_sorted, size_sorted
    share = (rank + 0.5) / size
    cut_train, cut_valid = ratios[0], ratios[0] + ratios[1]
    codes = np.where(share < cut_train, TRAIN, np.where(share < cut_valid, VALID, TEST)).astype(np.int8)
    codes[rank == 0] = TRAIN
    return codes
