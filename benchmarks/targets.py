"""The issues' targets, checked against a run's stage2/metrics.json: thresholds live here, not in the library.

issue_targets(heldout)    the stage-2 issue's: reward and consistency after RL above grounding, personalization
                          +8 % over `none` (PMG's headline), fidelity within 5 % of `none`
judge_targets(diffs)      the real-data issue's, on the paired differences rl − none with their 95 % intervals:
                          image personalization on the image judge above 0 with the interval above 0, text
                          personalization above 0
"""

from __future__ import annotations

from typing import Any

from stage2_generation.rewards import TOTAL_KEY, relative_change

PERSONALIZATION_GAIN_TARGET = (
    0.08  # PMG's headline: +8 % personalization over the non-personalized generators
)
FIDELITY_DROP_LIMIT = 0.05


def issue_targets(heldout: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Each target with its value, its threshold and whether it was met."""
    none, grounded, rl = heldout["none"], heldout["grounded"], heldout["rl"]
    pers_none = (none["personalization_text"] + none["personalization_image"]) / 2
    pers_rl = (rl["personalization_text"] + rl["personalization_image"]) / 2
    gain = f">= {PERSONALIZATION_GAIN_TARGET}"
    out = {
        "reward_rl_over_grounded": {"value": rl[TOTAL_KEY] - grounded[TOTAL_KEY], "target": "> 0"},
        "consistency_rl_over_grounded": {
            "value": rl["consistency"] - grounded["consistency"],
            "target": "> 0",
        },
        "personalization_gain_over_none": {"value": relative_change(pers_rl, pers_none), "target": gain},
        "personalization_text_gain_over_none": {
            "value": relative_change(rl["personalization_text"], none["personalization_text"]),
            "target": gain,
        },
        "personalization_image_gain_over_none": {
            "value": relative_change(rl["personalization_image"], none["personalization_image"]),
            "target": gain,
        },
        "fidelity_change_over_none": {
            "value": relative_change(rl["fidelity"], none["fidelity"]),
            "target": f">= -{FIDELITY_DROP_LIMIT}",
        },
    }
    for entry in out.values():
        op, threshold = entry["target"].split(" ")
        value = entry["value"]
        entry["met"] = bool(value > float(threshold)) if op == ">" else bool(value >= float(threshold))
    return out


def judge_targets(diffs: dict[str, Any]) -> dict[str, Any]:
    """The real-data targets on metrics.json's heldout_differences (with an image judge only)."""
    d = diffs["rl_minus_none"]
    out = {}
    for key, metric, significant in (
        ("judge_personalization_rl_over_none", "judge_history_all", True),
        ("judge_personalization_last5_rl_over_none", "judge_history_last5", True),
        ("personalization_text_rl_over_none", "personalization_text", False),
    ):
        if metric not in d:
            continue
        i = d[metric]
        out[key] = {
            "value": i["mean"], "ci": [i["low"], i["high"]],
            "target": "> 0 with the 95 % interval above 0" if significant else "> 0",
            "met": bool(i["low"] > 0) if significant else bool(i["mean"] > 0),
        }  # fmt: skip
    return out


def stage2_targets(metrics: dict[str, Any]) -> dict[str, Any]:
    """Every stage-2 target a metrics.json can be checked against."""
    return {**issue_targets(metrics["heldout"]), **judge_targets(metrics["heldout_differences"])}
