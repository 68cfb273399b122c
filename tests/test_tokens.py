import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from dppmg.data.format import write_meta, write_tables
from dppmg.errors import DppmgError
from dppmg.tokens import (
    MANIFEST_FILE,
    TENSORS_FILE,
    TokenCheckpoint,
    inspect_text,
    level_usage,
    save_token_checkpoint,
    show_user_text,
    unique_tuple_ratio,
)

REPO = Path(__file__).resolve().parents[1]
U = 6
SIZES = {"text": (2, 8, 4), "image": (3, 5, 6)}  # modality -> (levels, codebook size, dim)
USER_IDS = [f"user{i:05d}" for i in range(U)]
HASH = "abc123abc123abc1"


def _tensors(seed: int = 0) -> tuple[dict, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    books, codes, vecs = {}, {}, {}
    for m, (levels, size, dim) in SIZES.items():
        books[m] = torch.randn(levels, size, dim, generator=g)
        codes[m] = torch.randint(0, size, (U, levels), generator=g)
        vecs[m] = torch.randn(U, dim, generator=g)
    # Text level 0: code c is the point (c, 0, 0, 0), so code 3's neighbours are 2 and 4 at distance 1.
    books["text"][0] = 0
    books["text"][0, :, 0] = torch.arange(8.0)
    codes["text"][0] = torch.tensor([3, 1])
    codes["text"][1] = torch.tensor([3, 1])  # users 0 and 1 share their text tuple
    codes["text"][2:] = torch.tensor([[0, 4], [5, 5], [6, 0], [7, 1]])
    return books, codes, vecs


def _save(folder: Path, dataset_path: Path | None = None, seed: int = 0, **extra) -> tuple[dict, dict, dict]:
    books, codes, vecs = _tensors(seed)
    save_token_checkpoint(
        folder,
        codebooks=books,
        codes=codes,
        user_vectors=vecs,
        user_ids=USER_IDS,
        dataset={
            "name": "tiny",
            "path": str(dataset_path or folder / "no-such-dataset"),
            "content_hash": HASH,
            "num_users": U,
            "num_items": 5,
        },
        config={"stage1": {"dim": 4}},
        metrics={"recall@20": 0.25, "codebook_usage": {"text": [0.5, 0.25]}},
        **extra,
    )
    return books, codes, vecs


@pytest.fixture
def ckpt_dir(tmp_path) -> Path:
    _save(tmp_path / "tokens")
    return tmp_path / "tokens"


# --- save and load ------------------------------------------------------------------------------------


def test_roundtrip_keeps_tensors_sizes_and_strings(tmp_path):
    books, codes, vecs = _save(tmp_path / "tokens")
    ckpt = TokenCheckpoint.load(tmp_path / "tokens")
    assert ckpt.modalities == ["text", "image"]
    for m, (levels, size, dim) in SIZES.items():
        assert (ckpt.levels(m), ckpt.codebook_size(m), ckpt.dim(m)) == (levels, size, dim)
        assert torch.equal(ckpt.codebooks[m], books[m])
        assert torch.equal(ckpt.codes[m], codes[m]) and ckpt.codes[m].dtype == torch.int64
        assert torch.equal(ckpt.user_vectors[m], vecs[m])
        assert len(ckpt.token_strings(m)) == levels * size
    assert ckpt.token_strings("text")[8 + 3] == "<pt_1_3>"  # level-major: index = level * K + code
    assert ckpt.token_strings("image")[0] == "<pi_0_0>"
    assert ckpt.user_tokens(0, "text") == ["<pt_0_3>", "<pt_1_1>"]
    assert ckpt.user_prompt(0, "text") == "<pt_0_3><pt_1_1>"
    assert ckpt.user_ids == USER_IDS
    m = json.loads((tmp_path / "tokens" / MANIFEST_FILE).read_text())
    assert m["kind"] == "dppmg-preference-tokens" and m["format_version"] == 1
    assert m["modalities"]["image"]["tensors"] == {
        "codebook": "codebook.image",
        "codes": "codes.image",
        "user_vectors": "user_vectors.image",
    }
    assert m["users"]["count"] == U and m["dataset"]["content_hash"] == HASH
    assert m["metrics"]["recall@20"] == 0.25 and "created" in m and "dppmg_version" in m


def test_save_replaces_old_checkpoint_and_leaves_no_staging(tmp_path):
    _save(tmp_path / "tokens", seed=0)
    books, _, _ = _save(tmp_path / "tokens", seed=1)
    assert torch.equal(TokenCheckpoint.load(tmp_path / "tokens").codebooks["image"], books["image"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens"]
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == [MANIFEST_FILE, TENSORS_FILE]


def test_digest_follows_the_tokens_not_the_file_bytes(tmp_path):
    _save(tmp_path / "a", seed=0)
    _save(tmp_path / "b", seed=0)
    _save(tmp_path / "c", seed=1)
    a, b, c = (TokenCheckpoint.load(tmp_path / x) for x in "abc")
    assert a.digest() == b.digest()  # same tensors, written twice (the manifests' creation times may differ)
    assert a.digest() != c.digest()
    b.codes["image"][0, 0] = (b.codes["image"][0, 0] + 1) % SIZES["image"][1]
    assert a.digest() != b.digest()  # one code of one user is enough


def test_save_rejects_inconsistent_inputs(tmp_path):
    books, codes, vecs = _tensors()
    bad = {**codes, "text": codes["text"] + 8}  # codes must be < K = 8
    common = {"user_ids": USER_IDS, "dataset": {"name": "t", "path": "p", "content_hash": HASH}, "config": {}}
    with pytest.raises(ValueError, match=r"codes.text.*\[0, 8\)"):
        save_token_checkpoint(tmp_path / "a", codebooks=books, codes=bad, user_vectors=vecs, **common)
    with pytest.raises(ValueError, match="same modalities"):
        save_token_checkpoint(
            tmp_path / "b", codebooks=books, codes={"text": codes["text"]}, user_vectors=vecs, **common
        )
    short = {**common, "user_ids": USER_IDS[:-1]}
    with pytest.raises(ValueError, match=r"codes.text: expected shape \[5, 2\]"):
        save_token_checkpoint(tmp_path / "c", codebooks=books, codes=codes, user_vectors=vecs, **short)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / MANIFEST_FILE
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def _edit_tensors(folder: Path, edit) -> None:
    path = folder / TENSORS_FILE
    t = load_file(str(path))
    edit(t)
    save_file(t, str(path))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda d: (d / MANIFEST_FILE).unlink(), "manifest.json is missing"),
        (lambda d: (d / TENSORS_FILE).unlink(), "tokens.safetensors is missing"),
        (lambda d: (d / MANIFEST_FILE).write_text("{not json"), "manifest.json: not valid JSON"),
        (lambda d: (d / TENSORS_FILE).write_bytes(b"garbage"), "tokens.safetensors: cannot read"),
        (lambda d: _edit_manifest(d, lambda m: m.update(kind="something-else")), "kind is 'something-else'"),
        (
            lambda d: _edit_manifest(d, lambda m: m.update(format_version=2)),
            "format_version is 2, expected 1.*newer",
        ),
        (
            lambda d: _edit_manifest(d, lambda m: m["modalities"]["text"].update(levels=3)),
            r"codebook.text has shape \[2, 8, 4\], but manifest.json says .* = \[3, 8, 4\]",
        ),
        (
            lambda d: _edit_manifest(d, lambda m: m["modalities"]["image"].update(codebook_size=6)),
            r"codebook.image has shape \[3, 5, 6\].*\[3, 6, 6\]",
        ),
        (
            lambda d: _edit_manifest(d, lambda m: m["users"].update(ids=m["users"]["ids"][:-1], count=U - 1)),
            r"codes.text: expected shape \[5, 2\] \(users, levels\), got \[6, 2\]",
        ),
        (
            lambda d: _edit_manifest(d, lambda m: m["users"].update(count=99)),
            "users.count is 99 but users.ids has 6",
        ),
        (
            lambda d: _edit_tensors(d, lambda t: t["codes.image"].__setitem__((2, 1), 5)),
            r"codes.image: codes must be in \[0, 5\), found 0..5",
        ),
        (
            lambda d: _edit_tensors(d, lambda t: t.update({"user_vectors.text": torch.zeros(U, 3)})),
            r"user_vectors.text: expected shape \[6, 4\]",
        ),
        (
            lambda d: _edit_tensors(d, lambda t: t.pop("codebook.image")),
            r"lacks them.*codebook.image|codebook.image.*lacks",
        ),
        (
            lambda d: _edit_tensors(d, lambda t: t.update({"codes.text": t["codes.text"].int()})),
            "codes.text must be int64",
        ),
    ],
)
def test_load_names_what_is_wrong(ckpt_dir, corrupt, message):
    corrupt(ckpt_dir)
    with pytest.raises(DppmgError, match=message):
        TokenCheckpoint.load(ckpt_dir)


def test_load_of_a_missing_folder_says_so(tmp_path):
    with pytest.raises(DppmgError, match="does not exist; run stage 1"):
        TokenCheckpoint.load(tmp_path / "nowhere")


def test_loads_without_stage1_code(ckpt_dir):
    # None in sys.modules makes any import of these packages fail, so loading must not touch them.
    script = f"""
import sys
for name in ("stage1_preference", "torch_geometric", "vector_quantize_pytorch", "pandas"):
    sys.modules[name] = None
from dppmg.tokens import TokenCheckpoint, inspect_text
ckpt = TokenCheckpoint.load({str(ckpt_dir)!r})
print(ckpt.user_prompt(0, "text"), ckpt.codes["image"].shape[0])
inspect_text(ckpt)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["<pt_0_3><pt_1_1>", str(U)]


# --- the stage-2 contract -----------------------------------------------------------------------------


def test_check_compatible_accepts_matching_and_names_every_difference(ckpt_dir):
    ckpt = TokenCheckpoint.load(ckpt_dir)
    ckpt.check_compatible(
        HASH, {"modalities": ["text"], "levels": {"text": 2}, "codebook_size": {"image": 5}}
    )
    ckpt.check_compatible(HASH)
    with pytest.raises(
        DppmgError, match=f"dataset hash {HASH} != def: the tokens were learned on another dataset"
    ):
        ckpt.check_compatible("def")
    with pytest.raises(DppmgError) as e:
        ckpt.check_compatible("def", {"levels": {"text": 3}, "codebook_size": {"image": 256}})
    msg = str(e.value)
    assert "rerun stage 1" in msg
    assert "levels of text: checkpoint has 2, expected 3" in msg
    assert "codebook_size of image: checkpoint has 5, expected 256" in msg


def test_check_compatible_reports_a_missing_modality(tmp_path):
    books, codes, vecs = _tensors()
    save_token_checkpoint(
        tmp_path / "t",
        codebooks={"text": books["text"]},
        codes={"text": codes["text"]},
        user_vectors={"text": vecs["text"]},
        user_ids=USER_IDS,
        dataset={"name": "t", "path": "p", "content_hash": HASH},
        config={},
    )
    ckpt = TokenCheckpoint.load(tmp_path / "t")
    with pytest.raises(
        DppmgError, match=r"has \['text'\], expected \['text', 'image'\] \(missing \['image'\]\)"
    ):
        ckpt.check_compatible(HASH, {"modalities": ["text", "image"], "levels": {"image": 3}})
    with pytest.raises(DppmgError, match="no tokens for modality 'image'"):
        ckpt.levels("image")
    with pytest.raises(ValueError, match="unknown keys"):
        ckpt.check_compatible(HASH, {"level": {"text": 2}})


# --- statistics ---------------------------------------------------------------------------------------


def test_decoded_is_the_sum_of_the_chosen_codes(ckpt_dir):
    ckpt = TokenCheckpoint.load(ckpt_dir)
    book, codes = ckpt.codebooks["image"], ckpt.codes["image"]
    expected = torch.stack([sum(book[lv, codes[u, lv]] for lv in range(book.shape[0])) for u in range(U)])
    assert torch.allclose(ckpt.decoded("image"), expected)


def test_level_usage_and_unique_tuple_ratio():
    codes = torch.tensor([[0, 1], [0, 1], [2, 1], [3, 0]])
    assert level_usage(codes, 4) == [0.75, 0.5]
    assert unique_tuple_ratio(codes) == 0.75


# --- text views ---------------------------------------------------------------------------------------


def test_inspect_text_reports_sizes_usage_and_common_tuples(ckpt_dir):
    text = inspect_text(TokenCheckpoint.load(ckpt_dir))
    lines = text.splitlines()
    assert HASH in text and "tiny" in text
    header = next(line for line in lines if line.startswith("modality  prefix"))
    row = next(line for line in lines if line.startswith("text "))
    # Columns line up: each value starts where its header does.
    assert row.index("2 × 8") == header.index("levels × K")
    # 6 users, 5 distinct text tuples; users 0 and 1 share one.
    assert row.split()[-2:] == ["0.833", "2"]
    usage = lines[lines.index("codebook usage (share of codes used, per level)") + 2]
    assert usage.split() == ["text", "0.625", "0.500"]  # level 0 uses {0, 3, 5, 6, 7}, level 1 {0, 1, 4, 5}
    common = lines[lines.index("most common text tuples") + 2]
    assert common.split() == ["<pt_0_3><pt_1_1>", "2"]
    assert "recall@20" in text


def test_show_user_by_id_or_index(ckpt_dir):
    ckpt = TokenCheckpoint.load(ckpt_dir)
    by_id = show_user_text(ckpt, "user00000")
    assert by_id == show_user_text(ckpt, 0) == show_user_text(ckpt, "0")
    assert "text tokens  <pt_0_3><pt_1_1>" in by_id
    assert "other users with the same tuple: 1" in by_id
    # Level 0 of the text codebook lies on a line: code 3's nearest codes are 2 and 4 at distance 1, then 1 or 5.
    cells = next(line.split() for line in by_id.splitlines() if line.split()[:2] == ["0", "<pt_0_3>"])
    assert sorted(cells[2:6:2]) == ["<pt_0_2>", "<pt_0_4>"] and cells[3] == cells[5] == "1.000"
    assert cells[7] == "2.000"
    assert "no processed dataset" in by_id


def test_population_codes_are_the_most_common_code_per_level(ckpt_dir):
    """The cold-start fallback: text codes [[3, 1], [3, 1], [0, 4], [5, 5], [6, 0], [7, 1]]."""
    ckpt = TokenCheckpoint.load(ckpt_dir)
    assert ckpt.population_codes("text") == [3, 1]
    assert ckpt.population_prompt("text") == "<pt_0_3><pt_1_1>"
    assert ckpt.population_codes("text", users=[2, 3]) == [0, 4]  # ties go to the lower code
    with pytest.raises(DppmgError, match="no users to take the population's text tokens from"):
        ckpt.population_codes("text", users=[])


def test_show_unknown_user_lists_valid_ids(ckpt_dir):
    ckpt = TokenCheckpoint.load(ckpt_dir)
    with pytest.raises(DppmgError, match=r"unknown user 'nobody'.*no id is close.*'user00000', 'user00001'"):
        show_user_text(ckpt, "nobody")
    with pytest.raises(DppmgError, match=r"unknown user 'usr00003'.*the nearest ids are 'user00003', "):
        show_user_text(ckpt, "usr00003")  # a typo
    with pytest.raises(DppmgError, match=r"user index 6 out of range \[0, 6\)"):
        show_user_text(ckpt, 6)


def _tiny_dataset(folder: Path, content_hash: str) -> None:
    items = pd.DataFrame(
        {
            "item_idx": range(5),
            "item_id": [f"item{i}" for i in range(5)],
            "text": [f"A {'very ' * 30}long description of item {i}." for i in range(5)],
            "keywords": [f"keyword{i}" for i in range(5)],
            "image": [None] * 5,
        }
    )
    interactions = pd.DataFrame(
        {
            "user_idx": [0, 0, 0, 0, 1],
            "item_idx": [2, 0, 4, 1, 3],
            "timestamp": [20, 10, 30, 40, 5],
            "split": ["train", "train", "valid", "test", "train"],
        }
    )
    users = pd.DataFrame(
        {"user_idx": range(U), "user_id": USER_IDS, "pref_image_colour": ["crimson"] + ["blue"] * (U - 1)}
    )
    folder.mkdir(parents=True)
    write_tables(folder, items, interactions, users)
    write_meta(folder, {"content_hash": content_hash})


def test_show_user_lists_train_history_and_true_preferences(tmp_path):
    _tiny_dataset(tmp_path / "ds", HASH)
    _save(tmp_path / "tokens", dataset_path=tmp_path / "ds")
    text = show_user_text(TokenCheckpoint.load(tmp_path / "tokens"), "user00000")
    history = text[text.index("history:") :]
    assert "history: 2 train items" in history
    # Train items in time order; valid and test items are not history.
    assert history.index("item0") < history.index("item2")
    assert "item4" not in history and "item1" not in history
    assert "keyword0" in history and "…" in history  # long texts are shortened
    assert max(len(line) for line in history.splitlines()) < 120
    assert "pref_image_colour  crimson" in history
    assert "note:" not in text


def test_show_user_warns_when_the_dataset_changed(tmp_path):
    _tiny_dataset(tmp_path / "ds", "0000000000000000")
    _save(tmp_path / "tokens")
    text = show_user_text(TokenCheckpoint.load(tmp_path / "tokens"), 1, dataset=tmp_path / "ds")
    assert f"has hash 0000000000000000, the tokens were learned on {HASH}" in text
    assert "history: 1 train items" in text and "item3" in text
