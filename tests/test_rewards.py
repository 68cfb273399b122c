import math

import pytest
import torch

from dppmg.errors import DppmgError
from stage2_generation.rewards import (
    DEFAULT_WEIGHTS,
    METRIC_NAMES,
    REWARDS,
    RewardConfig,
    RewardInputs,
    RewardResult,
    check_weights,
    combine,
    finite_mask,
    group_advantages,
    history_similarity,
    pad_history,
    pmg_objective,
    register_reward,
    summarise,
)


def unit(angle_deg: float, scale: float = 1.0) -> torch.Tensor:
    """A 3-d vector in the x–y plane at `angle_deg` from the x axis: its cosine to e_x is cos(angle)."""
    a = math.radians(angle_deg)
    return scale * torch.tensor([math.cos(a), math.sin(a), 0.0])


E_X = unit(0)
COS60 = 0.5


def full_inputs() -> RewardInputs:
    """Two rollouts whose every similarity is known by construction.

    Row 0 generates e_x (text, twice scaled to check normalisation) and e_x (image); row 1 generates a text at
    90° and an image at 60°. Histories: row 0 has two valid items (0° and 60°) plus a padded slot full of
    garbage; row 1 has one valid item (0°).
    """
    gen_text = torch.stack([unit(0, 2.0), unit(90)])
    gen_image = torch.stack([unit(0), unit(60)])
    history = torch.stack(
        [
            torch.stack([unit(0), unit(60), torch.full((3,), 1e6)]),
            torch.stack([unit(0), torch.full((3,), float("nan")), unit(90)]),
        ]
    )  # (2, 3, 3)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    return RewardInputs(
        gen_text_emb=gen_text,
        gen_text_scorer_emb=torch.stack([unit(0), unit(0)]),
        gen_image_emb=gen_image,
        history_text_emb=history,
        history_image_emb=history.clone(),
        history_mask=mask,
        target_text_emb=torch.stack([unit(60), unit(90)]),
        target_scorer_text_emb=torch.stack([unit(0), unit(0)]),
        target_image_emb=torch.stack([unit(60), unit(90)]),  # row 1's is masked out: it has no image
        target_image_mask=torch.tensor([True, False]),
    )


# --------------------------------------------------------------------------------------------------
# Each reward


def test_personalization_text_is_mean_cosine_over_valid_history():
    got = REWARDS["personalization_text"](full_inputs())
    # row 0: mean(cos 0°, cos 60°) = 0.75 (the 1e6 padded slot ignored); row 1: cos 90° to its one item = 0
    torch.testing.assert_close(got, torch.tensor([0.75, 0.0]), atol=1e-6, rtol=0)


def test_personalization_image_ignores_padded_nan():
    got = REWARDS["personalization_image"](full_inputs())
    # row 1's padded slots hold NaN and a 90° vector; only its valid 0° item counts: cos 60° = 0.5
    torch.testing.assert_close(got, torch.tensor([0.75, COS60]), atol=1e-6, rtol=0)


def test_history_similarity_max_and_empty_history():
    gen = torch.stack([unit(0), unit(0)])
    history = torch.stack([torch.stack([unit(60), unit(0)]), torch.stack([unit(0), unit(0)])])
    mask = torch.tensor([[True, True], [False, False]])
    torch.testing.assert_close(history_similarity(gen, history, mask, reduce="max")[0], torch.tensor(1.0))
    assert torch.isnan(history_similarity(gen, history, mask, reduce="max")[1])
    assert torch.isnan(history_similarity(gen, history, mask, reduce="mean")[1])
    # no mask: every slot is real
    torch.testing.assert_close(history_similarity(gen, history), torch.tensor([0.75, 1.0]))
    with pytest.raises(DppmgError, match="reduce"):
        history_similarity(gen, history, mask, reduce="median")


def test_consistency_is_cosine_of_generated_text_and_image():
    got = REWARDS["consistency"](full_inputs())
    torch.testing.assert_close(got, torch.tensor([1.0, COS60]), atol=1e-6, rtol=0)


def test_fidelity_text():
    got = REWARDS["fidelity_text"](full_inputs())
    # row 0: 0° vs 60°; row 1: 90° vs 90°
    torch.testing.assert_close(got, torch.tensor([COS60, 1.0]), atol=1e-6, rtol=0)


def test_fidelity_image_averages_keywords_and_image_where_present():
    inputs = full_inputs()
    # row 0: keywords 0° → 1, image 60° → 0.5, mean 0.75; row 1 has no target image (its masked-out 90° row
    # would give cos 30°): keywords 0° vs 60° → 0.5
    torch.testing.assert_close(
        REWARDS["fidelity_image"](inputs), torch.tensor([0.75, 0.5]), atol=1e-6, rtol=0
    )
    inputs.target_image_emb = None
    torch.testing.assert_close(REWARDS["fidelity_image"](inputs), torch.tensor([1.0, 0.5]), atol=1e-6, rtol=0)


def test_fidelity_is_mean_of_available_terms():
    inputs = full_inputs()
    torch.testing.assert_close(
        REWARDS["fidelity"](inputs), torch.tensor([(0.5 + 0.75) / 2, (1.0 + 0.5) / 2]), atol=1e-6, rtol=0
    )
    inputs.gen_image_emb = None  # only the text term is left
    torch.testing.assert_close(REWARDS["fidelity"](inputs), REWARDS["fidelity_text"](inputs))


# --------------------------------------------------------------------------------------------------
# Errors


def test_missing_input_names_the_field():
    inputs = full_inputs()
    inputs.gen_text_scorer_emb = None
    with pytest.raises(DppmgError, match="gen_text_scorer_emb"):
        combine(inputs, {"consistency": 1.0})
    with pytest.raises(DppmgError, match="gen_text_emb.*target_text_emb"):
        REWARDS["fidelity"](RewardInputs(history_mask=torch.ones(2, 1, dtype=torch.bool)))


def test_unknown_reward_lists_registered_names():
    with pytest.raises(DppmgError, match="personalization_text") as err:
        combine(full_inputs(), {"persnalization": 1.0})
    assert "persnalization" in str(err.value)
    with pytest.raises(DppmgError, match="unknown"):
        RewardConfig(weights={"nope": 1.0})


def test_check_weights_names_the_unknown_reward_and_where_it_was_given():
    check_weights(DEFAULT_WEIGHTS)
    expected = "^stage2.rl.weights: unknown reward 'nope'; registered: consistency, fidelity, "
    with pytest.raises(DppmgError, match=expected):
        check_weights({"consistency": 1.0, "nope": 1.0})
    with pytest.raises(DppmgError, match="^eval.weights: unknown reward 'nope'"):
        check_weights({"nope": 1.0}, where="eval.weights")


def test_inputs_with_mismatched_rows_or_ranks_are_refused():
    with pytest.raises(DppmgError, match="rows"):
        RewardInputs(gen_text_emb=torch.zeros(2, 3), target_text_emb=torch.zeros(3, 3))
    with pytest.raises(DppmgError, match="history_text_emb"):
        RewardInputs(history_text_emb=torch.zeros(2, 3))
    with pytest.raises(DppmgError, match="history_mask"):
        RewardInputs(history_text_emb=torch.zeros(2, 4, 3), history_mask=torch.ones(2, 3, dtype=torch.bool))


def test_register_reward_adds_and_refuses_duplicates():
    name = "test_constant_reward"

    @register_reward(name)
    def constant(inputs: RewardInputs) -> torch.Tensor:
        return torch.full((inputs.num_rows,), 2.0)

    try:
        result = combine(full_inputs(), {name: 3.0})
        torch.testing.assert_close(result.total, torch.tensor([6.0, 6.0]))
        with pytest.raises(DppmgError, match="already registered"):
            register_reward(name)(constant)
    finally:
        del REWARDS[name]


def test_reward_config_validation():
    assert RewardConfig().weights == DEFAULT_WEIGHTS
    with pytest.raises(DppmgError, match="finite"):
        RewardConfig(weights={"consistency": float("nan")})
    with pytest.raises(DppmgError, match="all zero"):
        RewardConfig(weights={"consistency": 0.0})


# --------------------------------------------------------------------------------------------------
# combine, finite_mask, summarise


def test_combine_is_the_weighted_sum_of_components():
    inputs = full_inputs()
    weights = {"personalization_text": 1.0, "consistency": 2.0, "fidelity": 0.5, "fidelity_text": 0.0}
    result = combine(inputs, weights)
    assert list(result.components) == list(weights)
    expected = sum(w * REWARDS[n](inputs) for n, w in weights.items())
    torch.testing.assert_close(result.total, expected)
    # row 0 by hand: 0.75 + 2·1 + 0.5·0.625
    assert result.total[0].item() == pytest.approx(0.75 + 2.0 + 0.5 * 0.625, abs=1e-6)


def test_zero_weight_component_is_reported_but_cannot_poison_total():
    inputs = full_inputs()
    inputs.history_mask = torch.tensor([[True, True, False], [False, False, False]])  # row 1: no history
    result = combine(inputs, {"consistency": 1.0, "personalization_text": 0.0})
    assert torch.isnan(result.components["personalization_text"][1])
    assert torch.isfinite(result.total).all()
    assert finite_mask(result).tolist() == [True, False]


def test_finite_mask_flags_any_non_finite_entry():
    result = RewardResult(
        total=torch.tensor([1.0, float("inf"), 1.0, 1.0]),
        components={"a": torch.tensor([0.0, 0.0, float("nan"), 0.0])},
    )
    assert finite_mask(result).tolist() == [True, False, False, True]


def test_summarise_keys_and_means_over_finite_rows():
    weights = dict.fromkeys(METRIC_NAMES, 1.0)
    first = combine(full_inputs(), weights)
    second = RewardResult(
        total=torch.tensor([10.0, float("nan")]),
        components={n: torch.tensor([1.0, 5.0]) for n in METRIC_NAMES},
    )
    summary = summarise([first, second])
    assert list(summary) == [*METRIC_NAMES, "reward"]
    assert all(isinstance(v, float) for v in summary.values())
    # second's row 1 is non-finite, so each mean is over first's two rows and second's row 0
    for name in METRIC_NAMES:
        expected = (first.components[name].sum().item() + 1.0) / 3
        assert summary[name] == pytest.approx(expected, abs=1e-6)
    assert summary["reward"] == pytest.approx((first.total.sum().item() + 10.0) / 3, abs=1e-6)
    with pytest.raises(DppmgError):
        summarise([])


# --------------------------------------------------------------------------------------------------
# group_advantages


def test_group_advantages_zero_mean_unit_std_per_group():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, generator=g) * 3 + 5
    groups = torch.tensor([7, 7, 7, 7, 2, 2, 2, 9, 9, 9, 9, 9])
    adv = group_advantages(rewards, groups)
    assert adv.dtype == rewards.dtype
    for gid in groups.unique():
        a = adv[groups == gid]
        assert a.mean().item() == pytest.approx(0.0, abs=1e-5)
        assert a.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
        # normalisation within a group keeps its order
        r = rewards[groups == gid]
        assert torch.equal(a.argsort(), r.argsort())


def test_group_advantages_singleton_and_constant_groups_are_zero():
    rewards = torch.tensor([3.0, 0.1, 0.1, 0.1, 1.0, 2.0])
    groups = torch.tensor([0, 1, 1, 1, 2, 2])
    adv = group_advantages(rewards, groups)
    assert adv[0].item() == 0.0
    torch.testing.assert_close(adv[1:4], torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv[4:], torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)


def test_group_advantages_leave_non_finite_rows_out():
    rewards = torch.tensor([1.0, 3.0, float("nan"), 5.0])
    adv = group_advantages(rewards, torch.zeros(4, dtype=torch.long))
    assert adv[2].item() == 0.0
    torch.testing.assert_close(adv[[0, 1, 3]], group_advantages(rewards[[0, 1, 3]], torch.zeros(3)))
    with pytest.raises(DppmgError):
        group_advantages(rewards, torch.zeros(3))


# --------------------------------------------------------------------------------------------------
# pad_history


def test_pad_history_shapes_mask_and_truncation():
    histories = [torch.ones(3, 4), torch.zeros(0, 4), 2 * torch.ones(1, 4)]
    padded, mask = pad_history(histories)
    assert padded.shape == (3, 3, 4) and mask.shape == (3, 3)
    assert mask.tolist() == [[True, True, True], [False, False, False], [True, False, False]]
    assert torch.equal(padded[2, 0], 2 * torch.ones(4)) and not padded[2, 1:].any()
    recent = torch.arange(5.0)[:, None].expand(5, 2)
    padded, mask = pad_history([recent], max_len=2)
    assert torch.equal(padded[0, :, 0], torch.tensor([3.0, 4.0])) and mask.all()
    with pytest.raises(DppmgError, match="one D"):
        pad_history([torch.ones(2, 3), torch.ones(2, 4)])


def test_padded_history_feeds_personalization():
    histories = [torch.stack([unit(0), unit(60)]), torch.stack([unit(90)])]
    padded, mask = pad_history(histories)
    inputs = RewardInputs(
        gen_image_emb=torch.stack([unit(0), unit(0)]), history_image_emb=padded, history_mask=mask
    )
    torch.testing.assert_close(
        REWARDS["personalization_image"](inputs), torch.tensor([0.75, 0.0]), atol=1e-6, rtol=0
    )


# --------------------------------------------------------------------------------------------------
# pmg_objective


def test_pmg_objective_monotonic_in_both_terms():
    s = torch.linspace(-1, 1, 21)
    for alpha in (0.2, 0.5, 0.8):
        along_p = pmg_objective(s, 0.3, alpha)
        along_t = pmg_objective(0.3, s, alpha)
        assert torch.isfinite(along_p).all() and torch.isfinite(along_t).all()
        assert (along_p.diff() > 0).all() and (along_t.diff() > 0).all()
    # alpha weights the two terms: at alpha = 1 only personalization counts
    assert pmg_objective(0.5, -0.9, 1.0).item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert pmg_objective(1.0, 1.0, 0.5).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(DppmgError, match="alpha"):
        pmg_objective(0.0, 0.0, 1.5)
