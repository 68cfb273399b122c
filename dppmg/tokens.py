"""The token checkpoint: stage 1's discrete preference tokens, the contract stage 2 and users load.

    <folder>/
        tokens.safetensors   codebook.<m>      float32 [L, K, d]  residual-VQ codebooks, level-major
                             codes.<m>         int64   [U, L]     every user's code tuple
                             user_vectors.<m>  float32 [U, d]     the continuous preference vectors
        manifest.json        sizes, token strings, user ids, dataset (name, path, content hash), config, metrics

A user's tokens for modality m are one string per level, `<{prefix}_{level}_{code}>`, e.g. `<pt_0_17>`
(text) or `<pi_2_250>` (image). Loading needs only json, safetensors and torch, never the stage-1 code,
so that a checkpoint can be shipped on its own.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dppmg import __version__
from dppmg.errors import DppmgError
from dppmg.io import commit_dir, staging_dir, write_json

FORMAT_VERSION = 1
KIND = "dppmg-preference-tokens"
TENSORS_FILE = "tokens.safetensors"
MANIFEST_FILE = "manifest.json"
TOKEN_PREFIX: dict[str, str] = {"text": "pt", "image": "pi"}
# Keys of the `expect` argument of TokenCheckpoint.check_compatible.
EXPECT_KEYS = ("modalities", "levels", "codebook_size", "dim")
# How much the text views print before they summarise the rest.
TOP_TUPLES = 5
NEAREST_CODES = 3
HISTORY_ROWS = 10
TEXT_WIDTH = 60
SAMPLE_IDS = 5


def token_string(prefix: str, level: int, code: int) -> str:
    return f"<{prefix}_{level}_{code}>"


def _tensor_names(modality: str) -> dict[str, str]:
    return {
        "codebook": f"codebook.{modality}",
        "codes": f"codes.{modality}",
        "user_vectors": f"user_vectors.{modality}",
    }


# ---------------------------------------------------------------------------------------------------------
# Writing


def save_token_checkpoint(
    folder: Path,
    *,
    codebooks: dict[str, torch.Tensor],
    codes: dict[str, torch.Tensor],
    user_vectors: dict[str, torch.Tensor],
    user_ids: list[str],
    dataset: dict[str, Any],
    config: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> None:
    """Write a token checkpoint to `folder` atomically (built in a staging folder, then renamed).

    Args:
        codebooks: modality -> float [L, K, d], the residual-VQ codebooks.
        codes: modality -> int [U, L], each user's code per level, in [0, K).
        user_vectors: modality -> float [U, d], the continuous preference vectors that were quantized.
        user_ids: the source ids of the U users, in row order (users.parquet `user_id`).
        dataset: name, path (the processed dataset folder), content_hash, num_users, num_items.
        config: the resolved config that trained the tokens.
        metrics: stage 1's metrics, stored for `inspect`.

    Inconsistent inputs are a bug in the caller, so they raise ValueError.
    """
    modalities = list(codebooks)
    if not modalities:
        raise ValueError("no modalities to save")
    if set(codes) != set(modalities) or set(user_vectors) != set(modalities):
        raise ValueError(
            f"codebooks, codes and user_vectors must have the same modalities, got "
            f"{sorted(codebooks)}, {sorted(codes)}, {sorted(user_vectors)}"
        )
    user_ids = [str(u) for u in user_ids]
    if len(set(user_ids)) != len(user_ids):
        raise ValueError("user_ids must be unique")
    missing = [k for k in ("name", "path", "content_hash") if k not in dataset]
    if missing:
        raise ValueError(f"dataset lacks {missing}")

    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    for m in modalities:
        if m not in TOKEN_PREFIX:
            raise ValueError(f"unknown modality {m!r}; expected one of {list(TOKEN_PREFIX)}")
        book = codebooks[m].detach().to("cpu", torch.float32).contiguous()
        code = codes[m].detach().to("cpu", torch.int64).contiguous()
        vecs = user_vectors[m].detach().to("cpu", torch.float32).contiguous()
        _check_shapes(m, book, code, vecs, len(user_ids), ValueError)
        levels, size, dim = book.shape
        names = _tensor_names(m)
        tensors |= {names["codebook"]: book, names["codes"]: code, names["user_vectors"]: vecs}
        entries[m] = {
            "prefix": TOKEN_PREFIX[m],
            "levels": levels,
            "codebook_size": size,
            "dim": dim,
            "token_strings": _all_token_strings(TOKEN_PREFIX[m], levels, size),
            "tensors": names,
        }

    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "modalities": entries,
        "users": {"count": len(user_ids), "ids": user_ids},
        "dataset": {k: str(v) if isinstance(v, Path) else v for k, v in dataset.items()},
        "config": config,
        "metrics": metrics or {},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dppmg_version": __version__,
    }
    folder = Path(folder)
    stage = staging_dir(folder)
    try:
        # The metadata lets a bare safetensors reader tell what the file is.
        save_file(
            tensors, str(stage / TENSORS_FILE), metadata={"kind": KIND, "format_version": str(FORMAT_VERSION)}
        )
        write_json(stage / MANIFEST_FILE, manifest)
        commit_dir(stage, folder)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _all_token_strings(prefix: str, levels: int, size: int) -> list[str]:
    """All L*K token strings, level-major: level 0's K codes first."""
    return [token_string(prefix, level, code) for level in range(levels) for code in range(size)]


def _check_shapes(
    modality: str,
    codebook: torch.Tensor,
    codes: torch.Tensor,
    user_vectors: torch.Tensor,
    num_users: int,
    error: type[Exception],
    where: str = "",
) -> None:
    """Check that the three tensors of a modality agree with each other and with the user count."""
    names = _tensor_names(modality)
    if codebook.ndim != 3:
        raise error(f"{where}{names['codebook']}: expected shape [L, K, d], got {list(codebook.shape)}")
    levels, size, dim = codebook.shape
    if tuple(codes.shape) != (num_users, levels):
        raise error(
            f"{where}{names['codes']}: expected shape [{num_users}, {levels}] (users, levels), got {list(codes.shape)}"
        )
    if tuple(user_vectors.shape) != (num_users, dim):
        raise error(
            f"{where}{names['user_vectors']}: expected shape [{num_users}, {dim}] (users, dim), got {list(user_vectors.shape)}"
        )
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= size):
        raise error(
            f"{where}{names['codes']}: codes must be in [0, {size}), found {int(codes.min())}..{int(codes.max())}"
        )


# ---------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class TokenCheckpoint:
    """A loaded token checkpoint. Tensors are keyed by modality ("text", "image").

    Args:
        path: the checkpoint folder.
        manifest: the parsed manifest.json.
        codebooks: modality -> float32 [L, K, d].
        codes: modality -> int64 [U, L].
        user_vectors: modality -> float32 [U, d].
    """

    path: Path
    manifest: dict[str, Any]
    codebooks: dict[str, torch.Tensor]
    codes: dict[str, torch.Tensor]
    user_vectors: dict[str, torch.Tensor]

    @classmethod
    def load(cls, folder: str | Path) -> TokenCheckpoint:
        """Read and validate a checkpoint folder; every inconsistency is a DppmgError naming the file."""
        folder = Path(folder)
        manifest_path, tensors_path = folder / MANIFEST_FILE, folder / TENSORS_FILE
        if not folder.is_dir():
            raise DppmgError(f"token checkpoint {folder} does not exist; run stage 1 first")
        for p in (manifest_path, tensors_path):
            if not p.is_file():
                raise DppmgError(f"{folder}: incomplete token checkpoint, {p.name} is missing")
        manifest = _read_manifest(manifest_path)
        try:
            tensors = load_file(str(tensors_path))
        except (SafetensorError, OSError) as e:
            raise DppmgError(f"{tensors_path}: cannot read safetensors file: {e}") from None

        num_users = len(manifest["users"]["ids"])
        if manifest["users"].get("count", num_users) != num_users:
            raise DppmgError(
                f"{manifest_path}: users.count is {manifest['users']['count']} but users.ids has {num_users} entries"
            )
        codebooks, codes, vectors = {}, {}, {}
        for m, entry in manifest["modalities"].items():
            names = entry["tensors"]
            absent = [names[k] for k in ("codebook", "codes", "user_vectors") if names[k] not in tensors]
            if absent:
                raise DppmgError(
                    f"{tensors_path}: manifest lists tensor(s) {absent} for {m!r}, but the file lacks them"
                )
            book, code, vecs = (
                tensors[names["codebook"]],
                tensors[names["codes"]],
                tensors[names["user_vectors"]],
            )
            if code.dtype != torch.int64:
                raise DppmgError(f"{tensors_path}: {names['codes']} must be int64, got {code.dtype}")
            want = [entry["levels"], entry["codebook_size"], entry["dim"]]
            if list(book.shape) != want:
                raise DppmgError(
                    f"{tensors_path}: {names['codebook']} has shape {list(book.shape)}, but {MANIFEST_FILE} says "
                    f"[levels, codebook_size, dim] = {want}"
                )
            _check_shapes(m, book, code, vecs, num_users, DppmgError, where=f"{tensors_path}: ")
            for name, t in ((names["codebook"], book), (names["user_vectors"], vecs)):
                bad = ~torch.isfinite(t)
                if bad.any():
                    raise DppmgError(
                        f"{tensors_path}: {name} holds {int(bad.sum())} NaN or infinite value(s), first at index "
                        f"{[int(i) for i in bad.nonzero()[0]]}; expected finite vectors (rerun stage 1)"
                    )
            if len(entry["token_strings"]) != entry["levels"] * entry["codebook_size"]:
                raise DppmgError(
                    f"{manifest_path}: modalities.{m}.token_strings has {len(entry['token_strings'])} entries, "
                    f"expected levels × codebook_size = {entry['levels'] * entry['codebook_size']}"
                )
            codebooks[m], codes[m], vectors[m] = book, code, vecs
        return cls(folder, manifest, codebooks, codes, vectors)

    # --- sizes ------------------------------------------------------------------------------------------

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest["modalities"])

    @property
    def user_ids(self) -> list[str]:
        return self.manifest["users"]["ids"]

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def content_hash(self) -> str:
        return str(self.manifest["dataset"].get("content_hash"))

    def digest(self) -> str:
        """sha256 of what the tokens are (user ids, and every tensor's name, dtype, shape and values).

        Not of the files: safetensors writes its header in hash-map order, so equal tokens can be unequal bytes.
        """
        h = hashlib.sha256(json.dumps(self.user_ids).encode())
        for kind, tensors in (
            ("codebook", self.codebooks),
            ("codes", self.codes),
            ("vectors", self.user_vectors),
        ):
            for m in sorted(tensors):
                t = tensors[m].detach().cpu().contiguous()
                h.update(f"{kind}.{m}:{t.dtype}:{list(t.shape)}".encode())
                h.update(t.numpy().tobytes())
        return h.hexdigest()

    def _entry(self, modality: str) -> dict[str, Any]:
        try:
            return self.manifest["modalities"][modality]
        except KeyError:
            raise DppmgError(
                f"{self.path}: no tokens for modality {modality!r}; the checkpoint has {self.modalities}"
            ) from None

    def levels(self, modality: str) -> int:
        return int(self._entry(modality)["levels"])

    def codebook_size(self, modality: str) -> int:
        return int(self._entry(modality)["codebook_size"])

    def dim(self, modality: str) -> int:
        return int(self._entry(modality)["dim"])

    def prefix(self, modality: str) -> str:
        return str(self._entry(modality)["prefix"])

    # --- tokens -----------------------------------------------------------------------------------------

    def token_strings(self, modality: str) -> list[str]:
        """All L*K token strings of a modality, level-major (index = level * K + code)."""
        return list(self._entry(modality)["token_strings"])

    def user_index(self, user: str | int) -> int:
        """A user's row: an int is a row index; a string is a user id, or a row index if it is digits
        that are not an id (ids win, so `"5"` on a dataset whose ids are numbers means user id 5)."""
        if isinstance(user, int) and not isinstance(user, bool):
            if not 0 <= user < self.num_users:
                raise DppmgError(f"user index {user} out of range [0, {self.num_users})")
            return user
        index = self.find_user(str(user))
        if index is not None:
            return index
        raise DppmgError(
            f"unknown user {str(user)!r} in {self.path}: {nearest_ids_hint(str(user), self.user_ids)}; expected one "
            f"of {self.num_users} user ids or a row index in [0, {self.num_users})"
        )

    def find_user(self, user: str) -> int | None:
        """`user_index` of a user id (or a row index in digits), or None when there is no such user."""
        index = self._id_index.get(user)
        if index is not None:
            return index
        return int(user) if user.isdigit() and int(user) < self.num_users else None

    @cached_property
    def _id_index(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.user_ids)}

    def user_tokens(self, user_idx: int, modality: str) -> list[str]:
        """The user's token strings for a modality, one per level, e.g. ["<pt_0_17>", "<pt_1_3>"]."""
        return self.code_tokens(modality, self.codes[modality][self.user_index(user_idx)].tolist())

    def code_tokens(self, modality: str, codes: Sequence[int]) -> list[str]:
        """The token strings of one code per level: [3, 0] → ["<pt_0_3>", "<pt_1_0>"]."""
        prefix = self.prefix(modality)
        return [token_string(prefix, level, code) for level, code in enumerate(codes)]

    def user_prompt(self, user_idx: int, modality: str) -> str:
        """The user's tokens joined without spaces, ready to put in a prompt: "<pt_0_17><pt_1_3>"."""
        return "".join(self.user_tokens(user_idx, modality))

    def population_codes(self, modality: str, users: Sequence[int] | None = None) -> list[int]:
        """The cold-start fallback's codes: at each level, the code most of `users` (rows; all by default) hold.

        The population's mode, level by level (ties go to the lower code): each is the most used token of its
        level, so the one whose row grounding and RL trained on the most users. It needs nothing but the
        checkpoint, and with stage1.collision_level the extra level's mode is 0, the code of a unique tuple.
        """
        codes = self.codes[modality]
        if users is not None:
            codes = codes[torch.as_tensor(list(users), dtype=torch.long)]
        if len(codes) == 0:
            raise DppmgError(f"{self.path}: no users to take the population's {modality} tokens from")
        # argmax returns the first maximum: the lower code on a tie.
        return code_counts(codes, self.codebook_size(modality)).argmax(dim=1).tolist()

    def population_prompt(self, modality: str, users: Sequence[int] | None = None) -> str:
        """`population_codes` as a prompt, like `user_prompt`: "<pt_0_3><pt_1_0>"."""
        return "".join(self.code_tokens(modality, self.population_codes(modality, users)))

    def decoded(self, modality: str) -> torch.Tensor:
        """The users' vectors as the tokens encode them: the sum over levels of the chosen codes. [U, d]"""
        book, codes = self.codebooks[modality], self.codes[modality]
        levels = torch.arange(book.shape[0])
        return book[levels, codes].sum(dim=1)  # [U, L, d] -> [U, d]

    # --- the stage-1 -> stage-2 contract ----------------------------------------------------------------

    def check_compatible(self, content_hash: str, expect: dict[str, Any] | None = None) -> None:
        """Refuse a checkpoint that does not fit: DppmgError listing every difference.

        Args:
            content_hash: the dataset's content hash (meta.json) the caller is about to use.
            expect: optional {"modalities": [m, ...], "levels": {m: L}, "codebook_size": {m: K}, "dim": {m: d}}.
        """
        expect = expect or {}
        unknown = set(expect) - set(EXPECT_KEYS)
        if unknown:
            raise ValueError(f"unknown keys in expect: {sorted(unknown)}; allowed: {list(EXPECT_KEYS)}")
        problems = []
        if self.content_hash != content_hash:
            problems.append(
                f"dataset hash {self.content_hash} != {content_hash}: the tokens were learned on another dataset "
                f"({self.manifest['dataset'].get('name')}); rerun stage 1"
            )
        missing = [m for m in expect.get("modalities", []) if m not in self.modalities]
        if missing:
            problems.append(
                f"modalities: the checkpoint has {self.modalities}, expected {list(expect['modalities'])} "
                f"(missing {missing})"
            )
        for key in ("levels", "codebook_size", "dim"):
            for m, want in expect.get(key, {}).items():
                if m not in self.modalities:
                    if m not in missing:
                        problems.append(
                            f"{key}: no modality {m!r} in the checkpoint (it has {self.modalities})"
                        )
                    continue
                have = int(self._entry(m)[key])
                if have != want:
                    problems.append(f"{key} of {m}: checkpoint has {have}, expected {want}")
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise DppmgError(f"token checkpoint {self.path} does not match:\n{lines}")


def nearest_ids_hint(user: str, ids: Sequence[str], n: int = SAMPLE_IDS) -> str:
    """ "the nearest ids are 'u12', 'u21'" (difflib's closest to `user`), or some of `ids` when none is close."""
    close = difflib.get_close_matches(user, ids, n=n, cutoff=0.6)
    if close:
        return "the nearest ids are " + ", ".join(repr(c) for c in close)
    return "no id is close to it (the ids look like " + ", ".join(repr(i) for i in ids[:n]) + ")"


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DppmgError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        kind = manifest.get("kind") if isinstance(manifest, dict) else type(manifest).__name__
        raise DppmgError(f"{path}: kind is {kind!r}, expected {KIND!r}; not a DPPMG token manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        hint = " (written by a newer dppmg: upgrade to read it)" if newer else ""
        raise DppmgError(f"{path}: format_version is {version!r}, expected {FORMAT_VERSION}{hint}")
    for key in ("modalities", "users", "dataset"):
        if not isinstance(manifest.get(key), dict):
            raise DppmgError(f"{path}: missing or malformed key {key!r}")
    if not manifest["modalities"]:
        raise DppmgError(f"{path}: lists no modalities")
    if not isinstance(manifest["users"].get("ids"), list):
        raise DppmgError(f"{path}: users.ids must be a list of user ids")
    for m, entry in manifest["modalities"].items():
        needed = ("prefix", "levels", "codebook_size", "dim", "token_strings", "tensors")
        absent = [k for k in needed if k not in entry]
        if absent:
            raise DppmgError(f"{path}: modalities.{m} lacks {absent}")
        names = entry["tensors"]
        if not isinstance(names, dict) or any(k not in names for k in ("codebook", "codes", "user_vectors")):
            raise DppmgError(f"{path}: modalities.{m}.tensors must name codebook, codes and user_vectors")
    return manifest


# ---------------------------------------------------------------------------------------------------------
# Statistics of codes: the one copy (stage 1 uses them too), here so that inspecting needs no stage-1 code


def level_usage(codes: torch.Tensor, codebook_size: int) -> list[float]:
    """Share of the K codes used at least once, per level. codes: [U, L]."""
    return [torch.unique(codes[:, level]).numel() / codebook_size for level in range(codes.shape[1])]


def code_counts(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """How many users hold each code, per level: int64 [L, K]. codes: [U, L]."""
    return torch.stack(
        [torch.bincount(codes[:, level], minlength=codebook_size) for level in range(codes.shape[1])]
    )


def unique_tuple_ratio(codes: torch.Tensor) -> float:
    """Distinct code tuples / users; 1.0 means no two users share all their tokens. codes: [U, L]."""
    if codes.shape[0] == 0:
        return 0.0
    return torch.unique(codes, dim=0).shape[0] / codes.shape[0]


def users_sharing_tuple(codes: torch.Tensor) -> int:
    """How many rows of codes [N, L] have a tuple that at least one other row also has (collisions)."""
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    return int((counts[inverse] > 1).sum())


# ---------------------------------------------------------------------------------------------------------
# Text views for `dppmg tokens inspect` and `dppmg tokens show`


def _table(rows: list[list[Any]], indent: str = "  ") -> list[str]:
    """Left-aligned columns; the first row is the header."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(max(len(r) for r in cells))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _scalar_metrics(metrics: dict[str, Any]) -> list[list[Any]]:
    return [[k, v] for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def inspect_text(ckpt: TokenCheckpoint, top: int = TOP_TUPLES) -> str:
    """A readable summary: sizes, dataset, codebook usage per level, tuple uniqueness, common tuples."""
    ds = ckpt.manifest["dataset"]
    lines = [
        f"token checkpoint  {ckpt.path}",
        f"dataset           {ds.get('name')}  hash {ds.get('content_hash')}  "
        f"({ds.get('num_users', '?')} users, {ds.get('num_items', '?')} items)  at {ds.get('path')}",
        f"users             {ckpt.num_users}",
        f"created           {ckpt.manifest.get('created', '?')} by dppmg {ckpt.manifest.get('dppmg_version', '?')}",
        "",
    ]
    rows: list[list[Any]] = [
        ["modality", "prefix", "levels × K", "dim", "unique tuples", "users sharing a tuple"]
    ]
    for m in ckpt.modalities:
        codes = ckpt.codes[m]
        size = f"{ckpt.levels(m)} × {ckpt.codebook_size(m)}"
        rows.append(
            [
                m,
                ckpt.prefix(m),
                size,
                ckpt.dim(m),
                f"{unique_tuple_ratio(codes):.3f}",
                users_sharing_tuple(codes),
            ]
        )
    lines += _table(rows, indent="")

    max_levels = max(ckpt.levels(m) for m in ckpt.modalities)
    lines += ["", "codebook usage (share of codes used, per level)"]
    usage_rows: list[list[Any]] = [["modality", *[f"level {lv}" for lv in range(max_levels)]]]
    for m in ckpt.modalities:
        usage = level_usage(ckpt.codes[m], ckpt.codebook_size(m))
        usage_rows.append([m, *[f"{u:.3f}" for u in usage], *[""] * (max_levels - len(usage))])
    lines += _table(usage_rows)

    for m in ckpt.modalities:
        lines += ["", f"most common {m} tuples"]
        counts = Counter(tuple(row) for row in ckpt.codes[m].tolist())
        tuple_rows: list[list[Any]] = [["tokens", "users"]]
        for codes, n in counts.most_common(top):
            tuple_rows.append(["".join(token_string(ckpt.prefix(m), lv, c) for lv, c in enumerate(codes)), n])
        lines += _table(tuple_rows)

    scalars = _scalar_metrics(ckpt.manifest.get("metrics", {}))
    if scalars:
        lines += ["", "metrics (stage 1)"] + _table([["metric", "value"], *scalars])
    return "\n".join(lines) + "\n"


def show_user_text(
    ckpt: TokenCheckpoint,
    user: str | int,
    dataset: str | Path | None = None,
    neighbours: int = NEAREST_CODES,
    history: int = HISTORY_ROWS,
) -> str:
    """One user's tokens per modality, the nearest other codes at each level, and their train history.

    `dataset` is the processed dataset folder; by default the one named in the manifest (dataset.path).
    """
    u = ckpt.user_index(user)
    user_id = ckpt.user_ids[u]
    lines = [f"user {user_id}  (row {u} of {ckpt.num_users})  in {ckpt.path}", ""]
    for m in ckpt.modalities:
        lines += _user_modality_lines(ckpt, u, m, neighbours)
        lines.append("")
    folder = Path(dataset) if dataset is not None else _manifest_dataset_path(ckpt)
    lines += _history_lines(ckpt, user_id, folder, history)
    return "\n".join(lines) + "\n"


def _user_modality_lines(ckpt: TokenCheckpoint, u: int, m: str, neighbours: int) -> list[str]:
    codes = ckpt.codes[m]
    same = int((codes == codes[u]).all(dim=1).sum()) - 1
    book = ckpt.codebooks[m]  # [L, K, d]
    vec = ckpt.user_vectors[m][u]
    decoded = book[torch.arange(book.shape[0]), codes[u]].sum(dim=0)  # [d]
    error = float((vec - decoded).norm())
    lines = [
        f"{m} tokens  {ckpt.user_prompt(u, m)}",
        f"  other users with the same tuple: {same};  quantization error |v - decoded| = {error:.4g}"
        f"  (|v| = {float(vec.norm()):.4g})",
        "  nearest other codes in each level's codebook (Euclidean distance to the user's code):",
    ]
    rows: list[list[Any]] = [["level", "code", *[f"#{i + 1}" for i in range(neighbours)]]]
    for level, code in enumerate(codes[u].tolist()):
        dist = torch.cdist(book[level, code][None], book[level])[0]  # [K]
        dist[code] = float("inf")  # the code itself is not a neighbour
        k = min(neighbours, book.shape[1] - 1)
        near = torch.topk(dist, k, largest=False)
        cells = [
            f"{token_string(ckpt.prefix(m), level, int(c))} {float(d):.3f}"
            for d, c in zip(near.values, near.indices)
        ]
        rows.append([level, token_string(ckpt.prefix(m), level, code), *cells])
    return lines + _table(rows, indent="    ")


def _manifest_dataset_path(ckpt: TokenCheckpoint) -> Path | None:
    path = ckpt.manifest["dataset"].get("path")
    return Path(path) if path else None


def _history_lines(ckpt: TokenCheckpoint, user_id: str, folder: Path | None, limit: int) -> list[str]:
    needed = ("items.parquet", "interactions.parquet", "users.parquet")
    if folder is None or not all((folder / f).is_file() for f in needed):
        where = f"at {folder}" if folder is not None else "named in the manifest"
        return [f"history: no processed dataset {where}; pass the dataset folder to see the user's items"]
    import pandas as pd  # only here: loading and inspecting a checkpoint need no pandas

    users = pd.read_parquet(folder / "users.parquet")
    match = users.index[users["user_id"].astype(str) == user_id]
    if len(match) == 0:
        return [f"history: user {user_id} is not in {folder}/users.parquet (a different dataset?)"]
    row = users.loc[match[0]]
    inter = pd.read_parquet(folder / "interactions.parquet")
    items = pd.read_parquet(folder / "items.parquet")
    train = inter[(inter["user_idx"] == row["user_idx"]) & (inter["split"] == "train")].sort_values(
        "timestamp"
    )
    train = train.merge(items[["item_idx", "item_id", "keywords", "text"]], on="item_idx", how="left")

    lines = []
    hash_note = _hash_note(ckpt, folder)
    if hash_note:
        lines.append(hash_note)
    lines.append(f"history: {len(train)} train items (from {folder})")
    rows: list[list[Any]] = [["item_id", "keywords", "text"]]
    for _, it in train.head(limit).iterrows():
        rows.append([it["item_id"], it["keywords"], _shorten(str(it["text"]), TEXT_WIDTH)])
    lines += _table(rows)
    if len(train) > limit:
        lines.append(f"  ... and {len(train) - limit} more")

    prefs = [c for c in users.columns if c.startswith("pref_")]
    if prefs:  # the synthetic world's ground truth
        lines += ["", "true preferences (synthetic world)"] + _table(
            [["column", "value"], *[[c, row[c]] for c in prefs]]
        )
    return lines


def _hash_note(ckpt: TokenCheckpoint, folder: Path) -> str | None:
    meta = folder / "meta.json"
    if not meta.is_file():
        return None
    try:
        found = json.loads(meta.read_text(encoding="utf-8")).get("content_hash")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if found is None or found == ckpt.content_hash:
        return None
    return f"note: {folder} has hash {found}, the tokens were learned on {ckpt.content_hash}; the history may not match"


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
