"""Stage 2's rewards and generation metrics: pure functions of precomputed embeddings, behind a registry.

Every reward has one signature, `RewardFn = Callable[[RewardInputs], Tensor]`: it reads the embeddings it
needs from a `RewardInputs` (one row per (user, target) rollout) and returns one float per row, higher is
better, with no side effects. The caller embeds generated texts and images once (MiniLM for text–text
similarity, the scorer's towers for anything that touches an image), so the same numbers serve as the RL
reward and as the held-out metrics of `stage2/metrics.json`. The registered rewards (DESIGN.md, "Metrics"):

    personalization_text   mean_h cos(gen_text_emb,  history_text_emb[h])     MiniLM, over the valid history
    personalization_image  mean_h cos(gen_image_emb, history_image_emb[h])    scorer image tower
    consistency            cos(gen_text_scorer_emb, gen_image_emb)            scorer text vs image tower
    fidelity_text          cos(gen_text_emb, target_text_emb)                 MiniLM, target keywords
    fidelity_image         cos(gen_image_emb, target_scorer_text_emb), averaged with
                           cos(gen_image_emb, target_image_emb) on rows whose target has an image
    fidelity               mean of fidelity_text and fidelity_image, whichever have their inputs

Personalization averages over the history (`HISTORY_REDUCE`): the mean rewards resembling the user's taste as
a whole, where the max would reward copying one past item. `history_similarity(..., reduce="max")` gives
the other reading. A user with no valid history gets NaN, which `finite_mask` flags.

`combine` weights named rewards into a total (the RL reward); `group_advantages` normalises rewards within
groups of rollouts that share a user or prompt, as DDPO's per-prompt stat tracking and GRPO's
group-relative advantages do; `summarise` turns results into the `heldout.*` entries of metrics.json.
A custom reward is one decorated function:

    @register_reward("my_reward")
    def my_reward(inputs: RewardInputs) -> Tensor: ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dppmg.errors import DppmgError

Reduce = Literal["mean", "max"]
HISTORY_REDUCE: Reduce = "mean"  # how the registered personalization rewards reduce over the history
# The stage-2 objective of DESIGN.md: both personalizations, consistency, and target fidelity at half weight
# so that the tokens move the generation towards the user without drifting off the target.
DEFAULT_WEIGHTS: dict[str, float] = {
    "personalization_text": 1.0,
    "personalization_image": 1.0,
    "consistency": 1.0,
    "fidelity": 0.5,
}
# The components every `heldout.*` entry of stage2/metrics.json reports, next to the total under "reward".
METRIC_NAMES = ("personalization_text", "personalization_image", "consistency", "fidelity")
TOTAL_KEY = "reward"
# PMG's objective takes logs of scores in (0, 1]; a similarity of exactly -1 maps to 0, so it is floored here.
PMG_MIN_SCORE = 1e-6
COSINE_EPS = 1e-8  # F.cosine_similarity's default: an all-zero vector has similarity 0 to everything


# --------------------------------------------------------------------------------------------------
# Inputs, results, registry


@dataclass
class RewardInputs:
    """Precomputed embeddings of N rollouts, one row per (user, target); any field a reward needs may be None.

    Text–text similarities use the text encoder (MiniLM, width Dt); anything involving an image uses the
    scorer's shared space (width P). Embeddings need not be normalised: rewards take cosines.

    Args:
        gen_text_emb: [N, Dt] text-encoder embedding of the generated text.
        gen_text_scorer_emb: [N, P] scorer text-tower embedding of the generated text.
        gen_image_emb: [N, P] scorer image-tower embedding of the generated image.
        history_text_emb: [N, H, Dt] text-encoder embeddings of the user's history item texts (padded).
        history_image_emb: [N, H, P] scorer embeddings of the user's history item images (padded).
        history_mask: bool [N, H], True at real history items (see `pad_history`); None means no padding.
        history_image_mask: bool [N, H], True at history items that have an image; None means `history_mask`
            (set it when some items have no image, so that they do not count in image personalization).
        target_text_emb: [N, Dt] text-encoder embedding of the target keywords.
        target_scorer_text_emb: [N, P] scorer text-tower embedding of the target keywords.
        target_image_emb: [N, P] scorer embedding of the target item's image.
        target_image_mask: bool [N], True where the target has an image (rows without one carry any
            values in `target_image_emb`); None means every row has one.
    """

    gen_text_emb: Tensor | None = None
    gen_text_scorer_emb: Tensor | None = None
    gen_image_emb: Tensor | None = None
    history_text_emb: Tensor | None = None
    history_image_emb: Tensor | None = None
    history_mask: Tensor | None = None
    history_image_mask: Tensor | None = None
    target_text_emb: Tensor | None = None
    target_scorer_text_emb: Tensor | None = None
    target_image_emb: Tensor | None = None
    target_image_mask: Tensor | None = None

    def __post_init__(self) -> None:
        # Rank of every field; all share N, and the two history tensors share H with the mask.
        ranks = {f.name: 2 for f in fields(self)}
        ranks.update(history_text_emb=3, history_image_emb=3, target_image_mask=1)
        rows: dict[str, int] = {}
        for name, rank in ranks.items():
            value = getattr(self, name)
            if value is None:
                continue
            if value.dim() != rank:
                raise DppmgError(
                    f"RewardInputs.{name}: expected {rank} dimensions, got shape {tuple(value.shape)}"
                )
            rows[name] = value.shape[0]
        if len(set(rows.values())) > 1:
            raise DppmgError(f"RewardInputs: fields disagree on the number of rows N: {rows}")
        for name in ("history_text_emb", "history_image_emb"):
            history = getattr(self, name)
            if (
                history is not None
                and self.history_mask is not None
                and history.shape[:2] != self.history_mask.shape
            ):
                raise DppmgError(
                    f"RewardInputs.{name} has shape {tuple(history.shape)}, but history_mask is "
                    f"{tuple(self.history_mask.shape)}; expected [N, H, D] with mask [N, H]"
                )

    @property
    def num_rows(self) -> int:
        """N, the number of rollouts (0 when no field is set)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                return value.shape[0]
        return 0


RewardFn = Callable[[RewardInputs], Tensor]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator that adds a `RewardFn` to `REWARDS` under `name`; a name can be registered once."""

    def add(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise DppmgError(f"reward {name!r} is already registered (by {REWARDS[name].__qualname__})")
        REWARDS[name] = fn
        return fn

    return add


@dataclass
class RewardResult:
    """Rewards of N rollouts: the weighted `total` [N] and every named component [N] (weighted or not)."""

    total: Tensor
    components: dict[str, Tensor]


@dataclass
class RewardConfig:
    """Which registered rewards make the RL reward, and their weights.

    A weight of 0 keeps a component in the results (and the metrics) without letting it move the total.
    """

    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))

    def __post_init__(self) -> None:
        _check_names(self.weights)
        bad = {
            k: w for k, w in self.weights.items() if not isinstance(w, (int, float)) or not math.isfinite(w)
        }
        if bad:
            raise DppmgError(f"reward weights must be finite numbers, got {bad}")
        if not any(w != 0 for w in self.weights.values()):
            raise DppmgError(
                f"reward weights are all zero: {dict(self.weights)}; the RL reward would be constant"
            )


def check_weights(weights: Mapping[str, float], where: str = "stage2.rl.weights") -> None:
    """Refuse a weight for a reward that is not registered; `where` names the weights in the message."""
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise DppmgError(f"{where}: unknown reward {unknown[0]!r}; registered: {', '.join(sorted(REWARDS))}")


def _check_names(names: Sequence[str] | Mapping[str, float]) -> None:
    if not names:
        raise DppmgError(f"no rewards named; registered rewards: {', '.join(sorted(REWARDS))}")
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise DppmgError(f"unknown reward(s) {unknown}; registered rewards: {', '.join(sorted(REWARDS))}")


# --------------------------------------------------------------------------------------------------
# Similarity helpers


def _require(inputs: RewardInputs, reward: str, *names: str) -> list[Tensor]:
    """The named fields of `inputs`, or a DppmgError that names every missing one."""
    missing = [n for n in names if getattr(inputs, n) is None]
    if missing:
        raise DppmgError(
            f"reward {reward!r} needs {', '.join('RewardInputs.' + n for n in missing)}, missing (None) here"
        )
    return [getattr(inputs, n) for n in names]


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine over the last dimension, returned in float32.

    Computed in float64: in float32 the squared norm of a vector with entries above ~1e19 overflows, and the
    cosine of such a vector with itself comes out 0 instead of 1 (a silently wrong reward, not a NaN).
    """
    return F.cosine_similarity(a.double(), b.double(), dim=-1, eps=COSINE_EPS).float()


def _paired_cosine(a: Tensor, b: Tensor, what: str) -> Tensor:
    """Row-wise cosine of (N, D) × (N, D) → (N,), in float32 whatever the embeddings' dtype."""
    if a.shape != b.shape:
        raise DppmgError(f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ; expected two [N, D]")
    return _cosine(a, b)


def history_similarity(
    gen: Tensor, history: Tensor, mask: Tensor | None = None, reduce: Reduce = HISTORY_REDUCE
) -> Tensor:
    """Cosine of each generation to the user's history items, reduced over the valid ones.

    Args:
        gen: [N, D] embeddings of the generations.
        history: [N, H, D] embeddings of each row's history items, padded.
        mask: bool [N, H], True at real items; padded positions never count, whatever they hold.
        reduce: "mean" or "max" over the valid items.
    Returns:
        [N] float32; NaN for a row without any valid history item.
    """
    if history.shape[0] != gen.shape[0] or history.shape[-1] != gen.shape[-1]:
        raise DppmgError(
            f"history_similarity: generation {tuple(gen.shape)} and history {tuple(history.shape)} "
            "do not match; expected [N, D] and [N, H, D]"
        )
    if mask is None:
        mask = torch.ones(history.shape[:2], dtype=torch.bool, device=history.device)
    mask = mask.bool()
    cos = _cosine(gen[:, None, :], history)  # (N, H)
    count = mask.sum(-1)  # (N,)
    if reduce == "mean":
        # where(), not multiplication: a NaN in a padded slot would survive `0 * nan`.
        out = torch.where(mask, cos, 0.0).sum(-1) / count  # 0/0 = NaN for an empty history
    elif reduce == "max":
        out = (
            torch.where(mask, cos, -torch.inf).amax(-1)
            if cos.shape[1]
            else cos.new_full(count.shape, -torch.inf)
        )
        out = torch.where(count > 0, out, torch.nan)
    else:
        raise DppmgError(f"history_similarity: reduce must be 'mean' or 'max', got {reduce!r}")
    return out


# --------------------------------------------------------------------------------------------------
# The registered rewards


@register_reward("personalization_text")
def personalization_text(inputs: RewardInputs) -> Tensor:
    """Text-encoder similarity of the generated text to the user's history texts, [N]."""
    gen, history = _require(inputs, "personalization_text", "gen_text_emb", "history_text_emb")
    return history_similarity(gen, history, inputs.history_mask)


@register_reward("personalization_image")
def personalization_image(inputs: RewardInputs) -> Tensor:
    """Scorer similarity of the generated image to the user's history images, [N]."""
    gen, history = _require(inputs, "personalization_image", "gen_image_emb", "history_image_emb")
    mask = inputs.history_mask if inputs.history_image_mask is None else inputs.history_image_mask
    return history_similarity(gen, history, mask)


@register_reward("consistency")
def consistency(inputs: RewardInputs) -> Tensor:
    """Scorer similarity between the generated text and the generated image of the same rollout, [N]."""
    text, image = _require(inputs, "consistency", "gen_text_scorer_emb", "gen_image_emb")
    return _paired_cosine(text, image, "consistency")


@register_reward("fidelity_text")
def fidelity_text(inputs: RewardInputs) -> Tensor:
    """Text-encoder similarity of the generated text to the target keywords, [N]."""
    gen, target = _require(inputs, "fidelity_text", "gen_text_emb", "target_text_emb")
    return _paired_cosine(gen, target, "fidelity_text")


@register_reward("fidelity_image")
def fidelity_image(inputs: RewardInputs) -> Tensor:
    """Scorer similarity of the generated image to the target keywords, averaged with its similarity to the
    target's own image on rows that have one, [N]."""
    gen, keywords = _require(inputs, "fidelity_image", "gen_image_emb", "target_scorer_text_emb")
    to_keywords = _paired_cosine(gen, keywords, "fidelity_image (target keywords)")
    if inputs.target_image_emb is None:
        return to_keywords
    to_image = _paired_cosine(gen, inputs.target_image_emb, "fidelity_image (target image)")
    has_image = inputs.target_image_mask
    if has_image is None:
        return (to_keywords + to_image) / 2
    return torch.where(has_image.bool(), (to_keywords + to_image) / 2, to_keywords)


# Each fidelity term with the fields it needs: `fidelity` averages those whose fields are all present.
_FIDELITY_TERMS: dict[str, tuple[RewardFn, tuple[str, ...]]] = {
    "fidelity_text": (fidelity_text, ("gen_text_emb", "target_text_emb")),
    "fidelity_image": (fidelity_image, ("gen_image_emb", "target_scorer_text_emb")),
}


@register_reward("fidelity")
def fidelity(inputs: RewardInputs) -> Tensor:
    """Mean of the fidelity terms (text, image) whose inputs are present, [N]."""
    terms = [
        fn(inputs)
        for fn, needs in _FIDELITY_TERMS.values()
        if all(getattr(inputs, n) is not None for n in needs)
    ]
    if not terms:
        options = " or ".join(f"({' and '.join(needs)})" for _, needs in _FIDELITY_TERMS.values())
        raise DppmgError(f"reward 'fidelity' needs RewardInputs {options}; none of these pairs is set")
    return torch.stack(terms).mean(0)


# --------------------------------------------------------------------------------------------------
# Combining, advantages, summaries


def combine(inputs: RewardInputs, weights: Mapping[str, float]) -> RewardResult:
    """The weighted sum of the named registered rewards, with every component kept.

    Components of weight 0 are computed and reported but left out of the total, so a metric-only term
    cannot turn the reward into NaN. Non-finite values are returned as they are: see `finite_mask`.

    Args:
        inputs: the rollouts' embeddings (N rows).
        weights: reward name → weight, e.g. `RewardConfig().weights`.
    Returns:
        RewardResult with `total` [N] float32 and `components[name]` [N] float32.
    """
    _check_names(weights)
    n = inputs.num_rows
    components: dict[str, Tensor] = {}
    total: Tensor | None = None
    for name, weight in weights.items():
        value = REWARDS[name](inputs)
        if value.shape != (n,):
            raise DppmgError(f"reward {name!r} returned shape {tuple(value.shape)}; expected ({n},)")
        components[name] = value = value.float()
        if weight != 0:
            total = weight * value if total is None else total + weight * value
    if total is None:  # every weight is 0: the total is defined, and constant
        total = torch.zeros(n, device=next(iter(components.values())).device)
    return RewardResult(total=total, components=components)


def finite_mask(result: RewardResult) -> Tensor:
    """bool [N]: True where the total and every component are finite (the RL step's NaN/inf guard)."""
    ok = torch.isfinite(result.total)
    for value in result.components.values():
        ok = ok & torch.isfinite(value)
    return ok


def group_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """Rewards normalised within their group: (r − mean_g) / (std_g + eps), [N].

    Groups are rollouts that share a user or a prompt (DDPO's per-prompt stat tracking, GRPO's group-relative
    advantages). The std is the population std (ddof 0), as DDPO's tracker takes it. A group of one and a
    constant group get advantage 0: there is nothing to compare them with. Non-finite rewards get
    advantage 0 and are left out of their group's mean and std, so one bad rollout cannot poison its group.

    Args:
        rewards: [N] float.
        group_ids: [N] integer group of each rollout (any values; only equality matters).
        eps: added to the std; keeps a near-constant group's advantages bounded.
    Returns:
        [N] advantages in the dtype of `rewards`.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise DppmgError(
            f"group_advantages: rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} "
            "must both be [N]"
        )
    # float64 so that a constant group's mean equals its values exactly enough for (r − mean)/eps to stay ~0.
    r = rewards.double()
    finite = torch.isfinite(r)
    r = torch.where(finite, r, 0.0)
    _, group = torch.unique(group_ids, return_inverse=True)  # (N,) in 0..G-1
    num_groups = int(group.max()) + 1 if group.numel() else 0
    count = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add_(0, group, finite.double())
    total = torch.zeros_like(count).index_add_(0, group, r)
    mean = total / count.clamp(min=1)
    dev = torch.where(finite, r - mean[group], 0.0)
    var = torch.zeros_like(count).index_add_(0, group, dev**2) / count.clamp(min=1)
    # A group of one has dev = 0 exactly, a constant group only float64 rounding (~1e-17 / eps): advantage 0.
    return (dev / (var.sqrt()[group] + eps)).to(rewards.dtype)


def pad_history(histories: Sequence[Tensor], max_len: int | None = None) -> tuple[Tensor, Tensor]:
    """Stack per-user history embeddings of different lengths, padding with zeros at the end.

    Args:
        histories: N tensors [h_i, D] (h_i may be 0), ordered oldest to newest.
        max_len: keep at most this many items per user, the most recent ones; None keeps all.
    Returns:
        (padded [N, H, D], mask bool [N, H]) with H = the longest kept history.
    """
    if not histories:
        raise DppmgError("pad_history: no histories given")
    dims = {h.shape[-1] if h.dim() == 2 else None for h in histories}
    if len(dims) != 1 or None in dims:
        shapes = sorted({tuple(h.shape) for h in histories})[:5]
        raise DppmgError(f"pad_history: expected N tensors [h_i, D] with one D, got shapes such as {shapes}")
    if max_len is not None:
        if max_len < 1:
            raise DppmgError(f"pad_history: max_len must be at least 1, got {max_len}")
        histories = [h[-max_len:] for h in histories]
    padded = torch.nn.utils.rnn.pad_sequence(list(histories), batch_first=True)  # (N, H, D)
    lengths = torch.tensor([len(h) for h in histories], device=padded.device)
    mask = torch.arange(padded.shape[1], device=padded.device)[None, :] < lengths[:, None]  # (N, H)
    return padded, mask


def summarise(results: Sequence[RewardResult]) -> dict[str, float]:
    """Means of every component and of the total (under "reward") over all rows of `results`.

    Only rows where `finite_mask` holds are averaged, so every number describes the same pairs; count
    the others with `finite_mask` and log them. With `weights` covering `METRIC_NAMES`, the keys are
    personalization_text, personalization_image, consistency, fidelity and reward: one `heldout.*` entry.
    """
    if not results:
        raise DppmgError("summarise: no reward results given")
    names = list(results[0].components)
    for r in results[1:]:
        if list(r.components) != names:
            raise DppmgError(
                f"summarise: results have different components: {names} and {list(r.components)}"
            )
    keep = torch.cat([finite_mask(r).cpu() for r in results])
    columns = {name: torch.cat([r.components[name].detach().cpu() for r in results]) for name in names}
    columns[TOTAL_KEY] = torch.cat([r.total.detach().cpu() for r in results])
    # An all-non-finite column has no mean: NaN says so (json writes it as NaN).
    return {k: float(v[keep].double().mean()) if keep.any() else float("nan") for k, v in columns.items()}


def pmg_objective(personalization: Tensor | float, fidelity: Tensor | float, alpha: float) -> Tensor:
    """PMG's trade-off between personalization and target fidelity: z = α·log d_p + (1 − α)·log d_t.

    From "PMG: Personalized Multimodal Generation with Large Language Models" (Shen et al., WWW 2024), where
    d_p scores the generation against the user's preferences and d_t against the target, both in (0, 1].
    Cosine similarities s in [−1, 1] are mapped to d = (s + 1) / 2, floored at `PMG_MIN_SCORE` so that
    the log stays finite. Strictly increasing in both similarities when 0 < α < 1.

    Args:
        personalization: similarity to the user's history, a float or [N].
        fidelity: similarity to the target, a float or [N].
        alpha: weight of personalization, in [0, 1].
    Returns:
        z, a float32 tensor of the broadcast shape (≤ 0; 0 only when both similarities are 1).
    """
    if not 0.0 <= alpha <= 1.0:
        raise DppmgError(f"pmg_objective: alpha must be in [0, 1], got {alpha}")

    def score(s: Tensor | float) -> Tensor:
        return ((torch.as_tensor(s, dtype=torch.float32) + 1) / 2).clamp(PMG_MIN_SCORE, 1.0)

    return alpha * score(personalization).log() + (1 - alpha) * score(fidelity).log()


def relative_change(new: float, old: float) -> float:
    """Relative change of a cosine similarity, on PMG's score scale d = (s + 1) / 2 in [0, 1].

    Cosines of generated content can sit near 0 or below, where (new - old) / |old| explodes or flips sign;
    d is positive, so the ratio means what "x % better" says (PMG scores its similarities the same way).
    """
    d_new, d_old = (new + 1) / 2, (old + 1) / 2
    return (d_new - d_old) / d_old if d_old > 0 else float("nan")
