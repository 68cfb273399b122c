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


EVAL_PERSONALIZATION_GAIN = 0.08  # issue #12: dppmg over none on personalization, on PMG's score scale
EVAL_HIT_TEXT, EVAL_HIT_IMAGE = 0.45, 0.65  # issue #12: the attribute judge's hit rates for dppmg
EVAL_SECONDS = 20 * 60  # issue #12: `make eval` on the default world after the stages


def eval_targets(results: dict[str, Any], seconds: float | None = None) -> dict[str, Any]:
    """Issue #12's targets on eval/results.json: value, threshold, met. A target whose methods did not run is absent."""
    m, d = results["methods"], results["differences"]
    out: dict[str, Any] = {}

    def diff(name: str, metric: str) -> dict[str, Any] | None:
        return d.get(f"dppmg_minus_{name}", {}).get(metric)

    def significant_above(key: str, name: str, metric: str) -> None:
        i = diff(name, metric)
        if i is not None:
            out[key] = {"value": i["mean"], "ci": [i["low"], i["high"]], "target": "> 0, 95 % interval above 0",
                        "met": bool(i["low"] > 0)}  # fmt: skip

    if "dppmg" in m and "none" in m:
        gain = relative_change(m["dppmg"]["personalization"]["mean"], m["none"]["personalization"]["mean"])
        out["personalization_gain_over_none"] = {
            "value": gain, "target": f">= {EVAL_PERSONALIZATION_GAIN}", "met": bool(gain >= EVAL_PERSONALIZATION_GAIN)
        }  # fmt: skip
        fid = relative_change(m["dppmg"]["fidelity"]["mean"], m["none"]["fidelity"]["mean"])
        out["fidelity_change_over_none"] = {
            "value": fid, "target": f">= -{FIDELITY_DROP_LIMIT}", "met": bool(fid >= -FIDELITY_DROP_LIMIT)
        }  # fmt: skip
        for metric in ("hit_image", "hit_text", "judge_history_all"):
            significant_above(f"judge_{metric}_over_none", "none", metric)
    for metric in ("personalization", "consistency", "judge_history_all"):
        significant_above(f"{metric}_over_pmg", "pmg", metric)
    significant_above("judge_consistency_over_sft", "dppmg_sft", "judge_consistency")
    i = diff("dppmg_sft", "personalization")
    if i is not None:
        out["personalization_not_below_sft"] = {"value": i["mean"], "ci": [i["low"], i["high"]],
                                                "target": "95 % interval not below 0", "met": bool(i["high"] >= 0)}  # fmt: skip
    if "dppmg" in m:
        for metric, threshold in (("hit_text", EVAL_HIT_TEXT), ("hit_image", EVAL_HIT_IMAGE)):
            if metric in m["dppmg"]:
                v = m["dppmg"][metric]["mean"]
                out[f"dppmg_{metric}"] = {
                    "value": v,
                    "target": f">= {threshold}",
                    "met": bool(v >= threshold),
                }
    if seconds is not None:
        out["eval_seconds"] = {
            "value": seconds,
            "target": f"<= {EVAL_SECONDS}",
            "met": bool(seconds <= EVAL_SECONDS),
        }
    return out
