"""`dppmg eval` on the debug world: every method, the metric list, intervals, outputs, cache, ablations, contract."""

import copy
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import FakeWandb, text_token_checkpoint

from dppmg.cli import main
from dppmg.config import load_config, to_dict
from dppmg.device import sampling_precision
from dppmg.errors import DppmgError
from dppmg.io import read_json
from dppmg.tokens import TokenCheckpoint
from stage1_preference.train import run_stage1
from stage2_generation.evaluation import run as run_mod
from stage2_generation.evaluation.methods import TokenMethod, continuous_checkpoint, variant_weights
from stage2_generation.evaluation.metrics import Judges, diversity, judge_consistency
from stage2_generation.evaluation.run import diversity_groups, run_eval
from stage2_generation.pipeline import TOKENS_FILE, load_components, run_stage2
from stage2_generation.policy import Pair

REPO = Path(__file__).resolve().parents[1]


def cfg_for(tmp: Path, *overrides):
    paths = [f"data.root={tmp / 'data'}", f"features.cache_dir={tmp / 'cache'}", f"runs_dir={tmp / 'runs'}"]
    return load_config(REPO / "configs" / "debug.yaml", [*paths, *overrides])


@pytest.fixture(scope="module")
def fake_wandb() -> FakeWandb:
    """What the three jobs of `evaluated` sent to W&B."""
    return FakeWandb()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, fake_wandb):
    """The debug world after stage 1, stage 2 and eval, with the configs/debug.yaml settings only.

    The three jobs track to `fake_wandb` (tracking.mode=offline, with the fake in place of the wandb module), so
    this one pipeline run also shows what each job logs. Tracking is in no fingerprint, so `cfg` (tracking
    disabled, as every test runs) names the same run.
    """
    tmp = tmp_path_factory.mktemp("eval")
    cfg = cfg_for(tmp)
    tracked = cfg_for(tmp, "tracking.mode=offline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "wandb", fake_wandb)
        run_stage1(tracked, progress=False)
        run_stage2(tracked, progress=False)
        out = run_eval(tracked, progress=False)
    return tmp, cfg, out


def test_eval_scores_every_method_on_the_same_pairs(evaluated):
    _, cfg, out = evaluated
    r = read_json(out / "results.json")
    assert list(r["methods"]) == cfg.eval.methods  # the synthetic world has the oracle too
    assert r["pairs"] == 4 and r["seeds"] == [0, 1, 2]
    assert r["precision"] == sampling_precision(cfg.stage2.generation.precision)
    for name, row in r["methods"].items():
        for metric in ("personalization", "consistency", "fidelity", "hit_image", "judge_consistency"):
            i = row[metric]
            assert i["low"] <= i["mean"] <= i["high"] and len(i["seed_means"]) == 3, (name, metric)
            # the pooled mean is the mean of the per-seed means (every seed scores the same pairs)
            assert i["mean"] == pytest.approx(np.mean(i["seed_means"]), abs=1e-9), (name, metric)
        assert 0 <= row["diversity_image"]["mean"] <= 2
    # paired differences against dppmg, each marked significant exactly when its interval excludes 0
    assert set(r["differences"]) == {f"dppmg_minus_{m}" for m in cfg.eval.methods if m != "dppmg"}
    for diffs in r["differences"].values():
        for i in diffs.values():
            if np.isfinite(i["mean"]):
                assert i["significant"] == (i["low"] > 0 or i["high"] < 0)
    # the oracle is catalogue items with the users' tastes: the attribute judge sees them
    assert r["methods"]["oracle"]["hit_image"]["mean"] >= 0.75
    # the same tokens as stage 2 and seed 0 as stage 2's own seed: dppmg reproduces heldout.rl
    s2 = read_json(cfg.run_dir / "stage2" / "metrics.json")
    rl = s2["heldout"]["rl"]
    seed0 = r["methods"]["dppmg"]["personalization_text"]["seed_means"][0]
    assert seed0 == pytest.approx(rl["personalization_text"], abs=1e-5)
    assert r["methods"]["dppmg_sft"]["fidelity"]["seed_means"][0] == pytest.approx(
        s2["heldout"]["grounded"]["fidelity"], abs=1e-5
    )
    assert r["pmg"]["extractor"].startswith("stand-in") and r["pmg"]["samples"]


def test_eval_writes_the_table_the_plots_and_the_page(evaluated):
    _, cfg, out = evaluated
    md = (out / "results.md").read_text()
    assert "| DPPMG |" in md and "| PMG |" in md and "dppmg −" in md
    assert f"Images sampled in {read_json(out / 'results.json')['precision']} " in md
    for png in ("metrics.png", "tradeoff.png"):
        data = (out / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    r = read_json(out / "results.json")
    assert [p["alpha"] for p in r["tradeoff"]["pmg"]] == cfg.eval.tradeoff_alphas
    assert sorted(p["fidelity_weight"] for p in r["tradeoff"]["dppmg"]) == [0.5, 2.0]
    page = (out / "index.html").read_text()
    assert page.count('class="plot"') == 2 and "DPPMG" in page and "PMG" in page
    # Offline: everything inline. (Inline images' base64 may hold "http" by chance, so they are left out.)
    assert "http" not in re.sub(r"data:[^\"']*", "", page).replace("http-equiv", "")


def test_a_rerun_reuses_the_cached_generations(evaluated, monkeypatch):
    _, cfg, out = evaluated
    before = read_json(out / "results.json")["methods"]
    from stage2_generation import pmg as pmg_mod
    from stage2_generation.evaluation import methods as methods_mod

    monkeypatch.setattr(methods_mod, "generate_with_tokens", lambda *a, **k: pytest.fail("generated again"))
    monkeypatch.setattr(pmg_mod, "train_soft_preference", lambda *a, **k: pytest.fail("PMG trained again"))
    run_eval(cfg, progress=False)
    after = read_json(out / "results.json")["methods"]
    assert after["dppmg"]["personalization"] == before["dppmg"]["personalization"]


def test_cache_keys_name_the_precision_sampling_resolves_to(evaluated, monkeypatch):
    """bf16 generations get keys of their own; fp32 ones keep the keys they had before the precision key."""
    _, cfg, _ = evaluated
    pipe = SimpleNamespace(device=torch.device("cpu"))
    ev = SimpleNamespace(
        cfg=copy.deepcopy(cfg),
        components=SimpleNamespace(policy=SimpleNamespace(gen=SimpleNamespace(pipe=pipe))),
    )
    before = to_dict(cfg.stage2.generation)
    del before["precision"]
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    ev.cfg.stage2.generation.precision = "auto"
    assert run_mod.generation_key(ev) == before
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert run_mod.generation_key(ev) == {**before, "precision": "bf16"}
    ev.cfg.stage2.generation.precision = "fp32"
    assert run_mod.generation_key(ev) == before


def test_the_one_prompt_ablations_are_their_sources_composed(evaluated):
    """text_tokens_only = dppmg's texts + none's images (and the converse), exactly as generating them would give."""
    _, cfg, out = evaluated
    ev = run_mod._open(cfg, progress=False)
    for name, text, image in [("text_tokens_only", True, False), ("image_tokens_only", False, True)]:
        composed = run_mod.build_method(ev, name, progress=False)
        policy, generation = ev.components.policy, cfg.stage2.generation
        direct = TokenMethod(name, policy, generation, ev.stage2 / TOKENS_FILE, text, image)
        a, b = composed.generate(ev.pairs, 1, progress=False), direct.generate(ev.pairs, 1, progress=False)
        assert a.texts == b.texts
        np.testing.assert_array_equal(a.images, b.images)
    r = read_json(out / "results.json")["methods"]
    for name, text_from, image_from in [
        ("text_tokens_only", "dppmg", "none"),
        ("image_tokens_only", "none", "dppmg"),
    ]:
        assert r[name]["personalization_text"]["mean"] == r[text_from]["personalization_text"]["mean"]
        assert r[name]["personalization_image"]["mean"] == r[image_from]["personalization_image"]["mean"]


def test_best_of_n_keeps_the_candidate_pmg_would_keep(evaluated):
    """dppmg_best_of_n: dppmg's texts; among N images from PMG's candidate noise, the one with the highest z."""
    from stage2_generation.generators import encode_prompts
    from stage2_generation.pmg import generate_candidates, score_candidates
    from stage2_generation.rewards import pmg_objective

    _, cfg, _ = evaluated
    ev = run_mod._open(cfg_for(evaluated[0], "eval.pmg.candidates=3", "eval.pmg.alpha=0.7"), progress=False)
    pairs = ev.pairs[:5]
    best = run_mod.build_method(ev, "dppmg_best_of_n", progress=False)
    assert (best.candidates, best.alpha) == (3, 0.7)
    g = best.generate(pairs, 2, progress=False)
    plain = run_mod.build_method(ev, "dppmg", progress=False).generate(pairs, 2, progress=False)
    assert g.texts == plain.texts
    # The same candidates drawn again, with the dppmg tokens loaded: the kept image is the argmax of z.
    policy = ev.components.policy
    with torch.no_grad():
        states = encode_prompts(policy.gen.pipe, policy.image_prompts(pairs, True))
        negative = encode_prompts(policy.gen.pipe, [""])
    g_cfg = cfg.stage2.generation
    candidates = generate_candidates(
        policy.gen.pipe, states, negative, 3, g_cfg.image_steps, g_cfg.guidance, 2, g_cfg.batch_size, False,
        g_cfg.precision,
    )  # fmt: skip
    scores = score_candidates(ev.components.rewarder, pairs, candidates)
    assert not np.array_equal(candidates[:, 0], candidates[:, 1])  # the candidates differ: a real choice
    z = pmg_objective(torch.nan_to_num(scores.personalization), torch.nan_to_num(scores.fidelity), 0.7)
    chosen = np.asarray(g.info["chosen"])
    assert np.array_equal(chosen, z.argmax(dim=1).numpy())
    np.testing.assert_array_equal(g.images, candidates[np.arange(len(pairs)), chosen])
    # In eval its texts are dppmg's cached ones, not sampled again.
    from stage2_generation.evaluation import methods as methods_mod

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(methods_mod, "token_texts", lambda *a, **k: pytest.fail("texts sampled again"))
        cached, _ = run_mod._cached(ev, best, 0, progress=False)
    assert cached.texts == run_mod._cached(ev, run_mod.build_method(ev, "dppmg"), 0, progress=False)[0].texts
    # Not a default method: eval runs it only when eval.methods names it.
    assert "dppmg_best_of_n" not in cfg.eval.methods


def test_downstream_reports_recall_with_and_without_the_generated_features(evaluated):
    _, cfg, out = evaluated
    d = read_json(out / "results.json")["downstream"]
    assert list(d["methods"]) == cfg.eval.downstream_methods and d["k"] == 20
    s1 = d["stage1_only"]
    assert 0 <= s1["low"] <= s1["mean"] <= s1["high"] <= 1
    for name, rows in d["methods"].items():
        assert set(rows) == {"image", "text+image"}, name
        for r in rows.values():
            assert r["weight"] in cfg.eval.downstream_weights
            assert [p["weight"] for p in r["valid_curve"]] == cfg.eval.downstream_weights
            diff = r["difference"]["mean"]
            assert r["with"]["mean"] == pytest.approx(s1["mean"] + diff, abs=1e-9)
    # the generations it used have no target: nothing of a held-out pair's target item reaches the ranking
    with np.load(next((out / "cache" / "dppmg").glob("downstream-*.npz"))) as z:
        assert z["images"].shape[0] == len({p.user for p in run_mod._open(cfg, False).pairs})


def test_downstream_ranks_with_a_feature_that_knows_the_held_out_items(evaluated, monkeypatch):
    """A feature that marks each user's valid and test items: the weight chosen on valid is > 0, test recall 1."""
    from stage2_generation.evaluation import downstream as ds_mod

    _, cfg, _ = evaluated
    ev = run_mod._open(cfg, progress=False)
    users = [p.user for p in ds_mod.downstream_pairs(ev.pairs)]
    inter = ev.components.ds.interactions
    known = torch.zeros(len(users), ev.components.ds.num_items)
    for row, u in enumerate(users):
        held = inter[(inter["user_idx"] == u) & inter["split"].isin(["valid", "test"])]["item_idx"]
        known[row, held.tolist()] = 10.0
    monkeypatch.setattr(ds_mod, "feature_scores", lambda rewarder, g: {"image": known})
    g = run_mod.Generation([""] * len(users), np.zeros((len(users), 4, 4, 3), np.uint8))
    d = ds_mod.downstream_recall(ev, {"oracle_feature": g}, progress=False)
    r = d["methods"]["oracle_feature"]["image"]
    assert r["weight"] > 0 and r["with"]["mean"] == 1.0
    assert r["difference"]["mean"] == pytest.approx(1.0 - d["stage1_only"]["mean"])


def test_max_pairs_evaluates_the_first_held_out_pairs(evaluated):
    tmp, cfg, _ = evaluated
    full = run_mod._open(cfg, progress=False).pairs
    some = run_mod._open(cfg_for(tmp, "eval.max_pairs=2"), progress=False).pairs
    assert len(full) > 2 and some == full[:2]


def test_the_reward_ablation_trains_on_a_reward_without_consistency(evaluated):
    _, cfg, out = evaluated
    weights = [read_json(p) for p in (out / "variants").glob("no_consistency-*/weights.json")]
    assert weights == [{k: v for k, v in cfg.stage2.rl.weights.items() if k != "consistency"}]
    assert variant_weights(cfg, set_={"fidelity": 2.0})["fidelity"] == 2.0
    with pytest.raises(DppmgError, match="no term left"):
        variant_weights(cfg, drop=list(cfg.stage2.rl.weights))


def test_the_metrics_do_not_depend_on_the_rl_weights(evaluated):
    _, cfg, _ = evaluated
    c = load_components(cfg, progress=False)
    pairs = [Pair(0, "lamp", 0), Pair(1, "chair", 1)]
    texts, images = ["a red lamp", "a chair"], np.full((2, 16, 16, 3), 120, dtype=np.uint8)
    a = Judges(c.rewarder).score(pairs, texts, images)
    c.rewarder.weights = {"consistency": 1.0}
    b = Judges(c.rewarder).score(pairs, texts, images, reward_weights=c.rewarder.weights)
    for m in a:
        np.testing.assert_allclose(a[m], b[m])
    np.testing.assert_allclose(b["reward"], b["consistency"])  # the reward is exactly the one term left


def test_eval_before_stage2_and_with_another_config_is_refused(evaluated):
    tmp, _, _ = evaluated
    with pytest.raises(DppmgError, match="no finished stage 2"):
        run_eval(cfg_for(tmp, "run_name=nothing-yet"), progress=False)
    with pytest.raises(DppmgError, match="another configuration"):
        run_eval(cfg_for(tmp, "stage2.rl.lr_text=0.5"), progress=False)
    assert main(["eval", str(REPO / "configs" / "debug.yaml"), f"runs_dir={tmp / 'none'}", "-q"]) != 0


def test_stage2_refuses_tokens_of_other_sizes_naming_the_difference(evaluated):
    """The stage-1 -> stage-2 contract: the checkpoint must have the sizes this config's stage 1 makes."""
    _, cfg, _ = evaluated
    other = cfg_for(Path(cfg.runs_dir).parent, "stage1.vq_codebook_size=8", "run_name=" + cfg.run_name)
    with pytest.raises(DppmgError, match=r"codebook_size of text: checkpoint has 16, expected 8"):
        load_components(other, progress=False)


# --- units ----------------------------------------------------------------------------------------------


def test_judge_consistency_compares_what_the_text_says_with_what_the_image_shows():
    judge = SimpleNamespace(vocab={"category": ["lamp", "chair"], "colour": ["red", "blue"]})
    seen_image = {"category": ["lamp", "lamp", "chair"], "colour": ["red", "red", "blue"]}
    seen_text = {"category": ["lamp", "chair", "chair"]}
    texts = ["a red lamp", "a chair in blue", "a plain chair"]
    got = judge_consistency(judge, seen_image, seen_text, texts)
    # pair 0: category and colour agree; pair 1: neither; pair 2: the category, and no colour stated
    np.testing.assert_allclose(got, [1.0, 0.0, 1.0])


def test_diversity_is_zero_for_identical_generations_and_positive_otherwise():
    class Enc:
        def encode(self, texts, progress=False):
            return np.asarray([[1.0, 0.0] if t == "a" else [0.0, 1.0] for t in texts], dtype=np.float32)

    class Scorer:
        def encode_images(self, images):
            return torch.from_numpy(images.reshape(len(images), -1).astype(np.float32))

    rewarder = SimpleNamespace(text_encoder=Enc(), scorer=Scorer())
    images = np.stack(
        [np.eye(2, dtype=np.uint8)[[0]].reshape(1, 2, 1)] * 2
        + [np.eye(2, dtype=np.uint8)[[1]].reshape(1, 2, 1)]
    )
    d = diversity(rewarder, [[0, 1], [1, 2]], ["a", "a", "b"], images)
    np.testing.assert_allclose(d["diversity_text"], [0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(d["diversity_image"], [0.0, 1.0], atol=1e-12)


def test_diversity_groups_share_a_target_across_different_users():
    pairs = [Pair(u, f"t{u % 3}", u % 3) for u in range(12)]
    groups = diversity_groups(pairs)
    for g in groups:
        assert len({p.keywords for p in g}) == 1 and len({p.user for p in g}) == len(g) > 1
    assert len(groups) == 3


def test_the_continuous_checkpoint_gives_every_user_their_own_vector(tmp_path):
    codes = [[0, 1], [1, 0], [2, 2], [0, 0], [1, 1]]
    ckpt = text_token_checkpoint(tmp_path, levels=2, size=3, dim=4, codes=codes, content_hash="h")
    cont = continuous_checkpoint(ckpt)
    assert cont.levels("text") == 1 and cont.codebook_size("text") == ckpt.num_users == 5
    torch.testing.assert_close(cont.decoded("text"), ckpt.user_vectors["text"].float())
    assert cont.user_tokens(3, "text") == [f"<{ckpt.prefix('text')}c_0_3>"]
    assert not set(cont.token_strings("text")) & set(ckpt.token_strings("text"))
    cont.check_compatible("h")  # a valid checkpoint for injection: same dataset


def test_run_eval_counts_pairs_and_seeds(evaluated):
    _, cfg, out = evaluated
    cached = sorted((out / "cache" / "dppmg").glob("seed*.npz"))
    assert len(cached) == len(cfg.eval.seeds)
    # diversity is measured once, at the first seed, for every method
    for name in cfg.eval.methods:
        assert [p.name[:16] for p in (out / "cache" / name).glob("diversity-*")] == ["diversity-seed0-"], name
    with np.load(cached[0]) as z:
        assert z["images"].shape[0] == 4 and json.loads(str(z["meta"]))["texts"]
    assert run_mod.REFERENCE == "dppmg"


# --- what each job sends to W&B ---------------------------------------------------------------------------


def test_every_job_tracks_its_config_metrics_media_and_tokens(evaluated, fake_wandb):
    tmp, cfg, out = evaluated
    run_dir = cfg.run_dir
    assert [r.init["job_type"] for r in fake_wandb.runs] == ["stage1", "stage2", "eval"]
    for r in fake_wandb.runs:
        assert (
            r.init["mode"] == "offline" and r.init["dir"] == str(run_dir) and r.init["group"] == cfg.run_name
        )
        assert (
            r.init["config"]["stage1"]["vq_codebook_size"] == cfg.stage1.vq_codebook_size
        )  # the resolved config
        assert r.finished == 1

    s1 = fake_wandb.run("stage1")
    ckpt = TokenCheckpoint.load(run_dir / "stage1" / "tokens")
    losses = [step for step, d in s1.logs if "train/loss" in d]
    assert losses == list(range(1, read_json(run_dir / "stage1" / "metrics.json")["epochs_run"] + 1))
    assert "recall@20" in s1.summary
    size = cfg.stage1.vq_codebook_size
    for m in ckpt.modalities:
        per_epoch = s1.logged(f"codes/{m}/level_0")  # every validated epoch with a trained quantizer
        assert per_epoch and all(
            h.counts.sum() == ckpt.num_users and len(h.counts) == size for h in per_epoch
        )
        for level in range(ckpt.levels(m)):
            (final,) = s1.logged(f"tokens/{m}/level_{level}")
            assert final.counts.tolist() == torch.bincount(ckpt.codes[m][:, level], minlength=size).tolist()
    (art,) = s1.artifacts
    assert art.type == "tokens" and art.entries == {".": run_dir / "stage1" / "tokens"}
    assert art.metadata["digest"] == ckpt.digest()

    s2 = fake_wandb.run("stage2")
    keys = s2.keys()
    assert {"grounded/reward", "rl/text/reward", "rl/image/reward", "rl/seconds"} <= keys  # per RL iteration
    assert [step for step, d in s2.logs if "rl/text/reward" in d] == list(
        range(1, cfg.stage2.rl.iterations + 1)
    )
    shown = cfg.stage2.generation.gallery_users
    for cond in ("none", "grounded", "rl"):  # before and after RL, the gallery's pairs
        (images,) = s2.logged(f"generations/{cond}")
        assert len(images) == shown and images[0].data.dtype == np.uint8 and images[0].data.ndim == 3
        assert all(":" in i.caption for i in images)  # "user: target"
    (table,) = s2.logged("generations/table")
    assert table.columns[:5] == ["user", "target", "condition", "text", "image"] and "reward" in table.columns
    pairs = read_json(run_dir / "stage2" / "metrics.json")["heldout_pairs"]
    assert len(table.data) == 3 * pairs and isinstance(table.data[0][4], FakeWandb.Image)
    assert "heldout/rl/reward" in s2.summary
    (art,) = s2.artifacts
    assert set(art.entries) == {"tokens.safetensors", "tokens_grounded.safetensors", "export"}

    ev = fake_wandb.run("eval")
    results = read_json(out / "results.json")
    (table,) = ev.logged("results")
    assert [row[0] for row in table.data] == list(results["methods"])
    col = table.columns.index("consistency")
    assert table.data[0][col] == pytest.approx(results["methods"][table.data[0][0]]["consistency"]["mean"])
    assert {f"plots/{p.stem}" for p in (out / "plots").glob("*.png")} <= ev.keys()
    assert ev.logged("plots/metrics")[0][0].data.ndim == 3
    (samples,) = ev.logged("samples")
    assert len(samples.data) == len(results["methods"]) * min(cfg.eval.sample_users, results["pairs"])
    assert not ev.artifacts
