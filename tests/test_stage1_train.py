"""Stage 1 end to end on the debug world: metrics contract, token checkpoint, resume, rerun rules."""

from pathlib import Path

import pytest
import torch

from dppmg.config import load_config
from dppmg.errors import DppmgError
from dppmg.io import read_json
from dppmg.tokens import TokenCheckpoint
from stage1_preference import train as train_mod
from stage1_preference.train import run_stage1

REPO = Path(__file__).resolve().parents[1]


def cfg_for(tmp: Path, *overrides):
    return load_config(
        REPO / "configs" / "debug.yaml",
        [
            f"data.root={tmp / 'data'}",
            f"features.cache_dir={tmp / 'cache'}",
            f"runs_dir={tmp / 'runs'}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s1")
    cfg = cfg_for(tmp)
    return tmp, cfg, run_stage1(cfg, progress=False)


def test_metrics_follow_the_contract(finished):
    _, cfg, out = finished
    m = read_json(out / "metrics.json")
    for key in ("recall@20", "ndcg@20", "recall@20_quantized", "ndcg@20_quantized", "codebook_usage",
                "unique_code_ratio", "epoch_seconds", "preference_recovery", "users_sharing_tuple"):  # fmt: skip
        assert key in m, key
    assert set(m["codebook_usage"]) == {"text", "image"}
    assert all(
        len(v) == cfg.stage1.vq_levels and all(0 < u <= 1 for u in v) for v in m["codebook_usage"].values()
    )
    assert 0 <= m["recall@20"] <= 1 and 0 < m["unique_code_ratio"] <= 1
    assert set(m["preference_recovery"]) == {"text", "image"}
    assert (out / "config.yaml").is_file() and (out / "history.json").is_file()


def test_token_checkpoint_matches_the_run(finished):
    _, cfg, out = finished
    ckpt = TokenCheckpoint.load(out / "tokens")
    assert sorted(ckpt.modalities) == ["image", "text"]
    assert ckpt.num_users == cfg.data.synthetic.n_users
    assert (
        ckpt.levels("text") == cfg.stage1.vq_levels
        and ckpt.codebook_size("text") == cfg.stage1.vq_codebook_size
    )
    toks = ckpt.user_tokens(0, "text")
    assert len(toks) == cfg.stage1.vq_levels and toks[0].startswith("<pt_0_")
    assert ckpt.user_tokens(0, "image")[0].startswith("<pi_0_")
    ds_meta = read_json(Path(ckpt.manifest["dataset"]["path"]) / "meta.json")
    ckpt.check_compatible(ds_meta["content_hash"])  # same dataset: no error
    with pytest.raises(DppmgError, match="hash"):
        ckpt.check_compatible("0" * 16)


def test_rerun_is_noop_and_other_config_needs_overwrite(finished):
    tmp, cfg, out = finished
    before = (out / "metrics.json").stat().st_mtime_ns
    run_stage1(cfg, progress=False)
    assert (out / "metrics.json").stat().st_mtime_ns == before
    with pytest.raises(DppmgError, match="overwrite"):
        run_stage1(cfg_for(tmp, "stage1.dim=16"), progress=False)


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    straight = run_stage1(cfg_for(tmp_path, "run_name=straight"), progress=False)

    calls = {"n": 0}
    real_validate = train_mod.Stage1Trainer.validate_with_codes

    def crash_after_four(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during epoch 4's evaluation
        return real_validate(self)

    monkeypatch.setattr(train_mod.Stage1Trainer, "validate_with_codes", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        run_stage1(cfg_for(tmp_path, "run_name=resumed"), progress=False)
    monkeypatch.setattr(train_mod.Stage1Trainer, "validate_with_codes", real_validate)
    ckpt = torch.load(tmp_path / "runs" / "resumed" / "stage1" / "checkpoint.pt", weights_only=False)
    assert ckpt["state"]["epoch"] == 3  # three epochs finished before the interruption
    resumed = run_stage1(cfg_for(tmp_path, "run_name=resumed"), progress=False)
    a, b = read_json(straight / "metrics.json"), read_json(resumed / "metrics.json")
    assert a["epochs_run"] == b["epochs_run"] == 6
    assert (
        a["recall@20"] == pytest.approx(b["recall@20"]) and a["unique_code_ratio"] == b["unique_code_ratio"]
    )
    ta, tb = TokenCheckpoint.load(straight / "tokens"), TokenCheckpoint.load(resumed / "tokens")
    assert torch.equal(ta.codes["text"], tb.codes["text"])


def test_too_few_epochs_for_the_quantizer(tmp_path):
    with pytest.raises(DppmgError, match="vq_warmup_epochs"):
        cfg_for(tmp_path, "stage1.epochs=2", "stage1.vq_warmup_epochs=5")


def test_tokens_cli_inspect_and_show(finished):
    import subprocess
    import sys

    _, _, out = finished
    run_dir = out.parent
    r = subprocess.run(
        [sys.executable, "-m", "dppmg", "tokens", "inspect", str(run_dir)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "text" in r.stdout and "image" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "dppmg", "tokens", "show", str(out / "tokens"), "--user", "user_00003"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "<pt_0_" in r.stdout and "<pi_0_" in r.stdout and "pref_text_style" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "dppmg", "tokens", "show", str(out / "tokens"), "--user", "nobody"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nobody" in r.stderr


def test_batch_grows_only_past_the_step_bound(finished):
    from dppmg.data.format import load_dataset
    from stage1_preference.train import Stage1Trainer

    tmp, cfg, _ = finished
    ds = load_dataset(cfg.data.processed_dir)
    n = len(ds.split("train"))
    small = Stage1Trainer(
        ds, cfg_for(tmp, "stage1.batch_size=64", "stage1.max_steps_per_epoch=1000").stage1, 0
    )
    assert small.batch_size == 64  # n / 64 steps is under the bound: the configured batch stands
    capped = Stage1Trainer(ds, cfg_for(tmp, "stage1.batch_size=8", "stage1.max_steps_per_epoch=4").stage1, 0)
    assert capped.batch_size == -(-n // 4) and -(-n // capped.batch_size) <= 4
    off = Stage1Trainer(ds, cfg_for(tmp, "stage1.batch_size=8", "stage1.max_steps_per_epoch=0").stage1, 0)
    assert off.batch_size == 8


def test_recency_halflife_weights_the_trainers_graph(finished):
    from dppmg.data.format import load_dataset
    from stage1_preference.graph import build_norm_adj, recency_weights
    from stage1_preference.train import Stage1Trainer

    tmp, cfg, _ = finished
    ds = load_dataset(cfg.data.processed_dir)
    binary = Stage1Trainer(ds, cfg_for(tmp).stage1, 0).adj.to_dense()
    recent = Stage1Trainer(ds, cfg_for(tmp, "stage1.recency_halflife=2").stage1, 0).adj.to_dense()
    train = ds.split("train")
    u, i = train["user_idx"].to_numpy(), train["item_idx"].to_numpy()
    w = torch.from_numpy(recency_weights(u, train["timestamp"].to_numpy(), 2.0))
    expected = build_norm_adj(ds.num_users, ds.num_items, torch.from_numpy(u), torch.from_numpy(i), w)
    torch.testing.assert_close(recent, expected.to_dense())
    assert torch.equal(recent != 0, binary != 0) and not torch.allclose(
        recent, binary
    )  # same edges, reweighted


def test_collision_level_gives_every_user_distinct_tokens(tmp_path):
    # One level of 16 codes cannot give 40 users distinct tuples (pigeonhole): the extra level must.
    out = run_stage1(
        cfg_for(
            tmp_path,
            "stage1.collision_level=true",
            "stage1.vq_levels=1",
            "stage1.vq_codebook_size=16",
            "stage1.dim=8",
        ),  # fmt: skip
        progress=False,
    )
    m = read_json(out / "metrics.json")
    assert m["users_sharing_tuple"]["text"] > 0  # collisions before the extra level
    ckpt = TokenCheckpoint.load(out / "tokens")
    assert ckpt.levels("text") == 2 and m["token_levels"]["text"] == 2
    for mod in ("text", "image"):
        assert len(torch.unique(ckpt.codes[mod], dim=0)) == ckpt.num_users


def test_collision_level_too_small_codebook_is_a_clear_error(tmp_path):
    # 40 users over 2 codes: some tuple holds at least 20 users, more than the 2 ranks the extra level can hold.
    with pytest.raises(DppmgError, match="vq_codebook_size"):
        run_stage1(
            cfg_for(
                tmp_path,
                "stage1.collision_level=true",
                "stage1.vq_levels=1",
                "stage1.vq_codebook_size=2",
                "stage1.dim=8",
            ),  # fmt: skip
            progress=False,
        )


def test_vq_sees_at_most_vq_users_per_step(finished):
    from dppmg.data.format import load_dataset
    from stage1_preference.train import Stage1Trainer

    tmp, cfg, _ = finished
    ds = load_dataset(cfg.data.processed_dir)
    tr = Stage1Trainer(ds, cfg_for(tmp, "stage1.vq_users_per_step=5", "stage1.vq_warmup_epochs=0").stage1, 0)
    tr._init_quantizer()
    seen = []
    real_forward = tr.quantizer.forward

    def recording(m, x):
        seen.append(len(x))
        return real_forward(m, x)

    tr.quantizer.forward = recording
    logs = tr.train_epoch(progress=False)
    assert seen and max(seen) == 5  # batches of 128 hold many more than 5 distinct users
    assert torch.isfinite(torch.tensor(logs["train/bpr_quantized"]))


def test_valid_users_ranks_a_fixed_sample_of_users(finished):
    from dppmg.data.format import load_dataset
    from stage1_preference.train import Stage1Trainer, stage1_fingerprint

    tmp, cfg, _ = finished
    ds = load_dataset(cfg.data.processed_dir)
    every = Stage1Trainer(ds, cfg.stage1, 0).validate()["valid/users_evaluated"]
    sampled = cfg_for(tmp, "stage1.valid_users=10")
    a, b = Stage1Trainer(ds, sampled.stage1, 0), Stage1Trainer(ds, sampled.stage1, 0)
    assert every > 10 and a.validate()["valid/users_evaluated"] == 10
    assert a.valid_interactions.equals(b.valid_interactions)  # drawn once from the seed
    kept = set(a.valid_interactions["user_idx"])
    # each sampled user keeps all of its splits (the ranking masks its training items)
    assert len(a.valid_interactions) == ds.interactions["user_idx"].isin(kept).sum()
    # the default leaves the fingerprint as it was before the key existed; another value changes it
    assert stage1_fingerprint(sampled, "h") != stage1_fingerprint(cfg, "h")
    with pytest.raises(DppmgError, match="stage1.valid_users must be >= 0"):
        cfg_for(tmp, "stage1.valid_users=-1")


def faulty_batch_loss(monkeypatch, bad, kind: str = "loss") -> None:
    """Make `_batch_loss` non-finite on the calls `bad(n)` picks (n from 1): a NaN loss ("loss") or a finite loss
    with a NaN gradient ("grad")."""
    real = train_mod.Stage1Trainer._batch_loss
    calls = {"n": 0}

    def batch_loss(self, *args, **kwargs):
        parts = real(self, *args, **kwargs)
        calls["n"] += 1
        if bad(calls["n"]):
            p = next(self.model.parameters())
            # sqrt(|0|) is 0 with an infinite slope: adds nothing to the loss, makes its gradient NaN (0 * inf)
            fault = torch.tensor(float("nan")) if kind == "loss" else (0 * p.sum()).abs().sqrt()
            parts["loss"] = parts["loss"] + fault
        return parts

    monkeypatch.setattr(train_mod.Stage1Trainer, "_batch_loss", batch_loss)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_a_non_finite_step_is_skipped_and_logged_and_training_continues(finished, monkeypatch, caplog, kind):
    from dppmg.data.format import load_dataset

    tmp, cfg, _ = finished
    tr = train_mod.Stage1Trainer(
        load_dataset(cfg.data.processed_dir), cfg_for(tmp, "stage1.batch_size=16").stage1, 0
    )
    before = [p.detach().clone() for p in tr.model.parameters()]
    faulty_batch_loss(monkeypatch, lambda n: n == 2, kind)  # one bad step among good ones
    logs = tr.train_epoch(progress=False)
    assert logs["train/skipped_steps"] == 1 and tr.skipped_in_a_row == 0
    assert all(torch.isfinite(torch.tensor(float(v))) for v in logs.values())
    after = list(tr.model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the good steps were applied
    assert "skipped 1 of" in caplog.text and "non-finite loss or gradient" in caplog.text


def test_repeated_non_finite_steps_stop_the_run_keeping_the_last_good_checkpoint(finished, monkeypatch):
    tmp = finished[0]
    cfg = cfg_for(tmp, "run_name=nan", "stage1.batch_size=16")
    from dppmg.data.format import load_dataset

    tr = train_mod.Stage1Trainer(load_dataset(cfg.data.processed_dir), cfg.stage1, 0)
    steps = -(-len(tr.train_users) // tr.batch_size)  # per epoch: one BPR triple per training interaction
    faulty_batch_loss(monkeypatch, lambda n: n > 2 * steps)  # from the first step of epoch 3 on
    out = tmp / "runs" / "nan" / "stage1"
    with pytest.raises(DppmgError) as e:
        run_stage1(cfg, progress=False)
    message = str(e.value)
    for text in (
        "stage 1 stopped in epoch 3", f"{train_mod.MAX_SKIPPED_IN_A_ROW} steps in a row",
        "non-finite loss or gradient", f"the last good checkpoint, {out / 'checkpoint.pt'} (epoch 2), is kept",
    ):  # fmt: skip
        assert text in message, message
    sd = torch.load(out / "checkpoint.pt", weights_only=False)
    assert sd["state"]["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in sd["model"].values() if v.is_floating_point())
    assert not (out / "metrics.json").exists()
