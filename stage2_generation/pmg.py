"""PMG (Shen et al., "PMG: Personalized Multimodal Generation with Large Language Models", WWW 2024) on the
same generators as DPPMG, as a baseline.

PMG in four steps, one section each below:

1. History as natural language. A user's last `history_items` training items become one sentence, "The user
   recently interacted with: <item>; <item>; ...", followed by the cue "Keywords for this user's taste:" (the start
   of the assistant's answer when the LLM has a chat template). The oldest items are dropped until it fits the LLM.
2. Explicit keywords by likelihood. Each word w of a candidate vocabulary (the catalogue's most frequent content
   words) is scored as the continuation of that prompt:

       score(w) = log p(w | history prompt) / |w|  -  log p(w | history-free prompt) / |w|     (|w| = its tokens)

   the pointwise mutual information between the word and the history: a bias correction in the spirit of PMG's
   bias-corrected LLM, without which the words that any prompt makes likely would win for every user. The best
   `num_keywords` are the user's keywords.
3. Implicit soft embeddings. `soft_tokens` trainable vectors placed after the prompt are read by the frozen LLM;
   its last hidden states there, mapped into the image generator's text-encoder space, are extra conditioning rows
   [B, K, D] for the UNet's cross-attention. Only that soft module trains, on the diffusion loss of training
   users' held-back items.
4. Generation with candidates. The image prompt is the target keywords with the preference keywords before them;
   its encoder states are followed by the soft rows. N candidates per pair start from different noise, and the one
   with the highest z = α·log d_p + (1 − α)·log d_t (`rewards.pmg_objective`) is kept, d_p and d_t being the
   scorer's image personalization and fidelity. The text is the stage-2 text generator's, with the preference
   keywords where DPPMG puts its tokens (the warm-start's hint copies taught it to use words there).

Where this differs from the paper, and why:
- The LLM is frozen and reads text only (the paper tunes a bias-corrected LLM with multimodal tokens). The only
  LLM that ships offline here is SmolLM2-135M-Instruct; when it is not installed the stage-2 text generator stands
  in, and `load_extractor_lm` names which one ran.
- Keywords are chosen from a closed vocabulary by likelihood rather than generated: no sampling, and every
  keyword is a catalogue word.
- The soft embeddings are input-level prompt tuning (Lester et al., 2021) with a learned output map, not P-Tuning
  v2's trainable prefixes in every layer. Those prefixes come before the prompt, so every training step would run
  the LLM forward and backward over the whole history (~250 tokens for SmolLM2 on MovieLens); soft tokens after
  the prompt attend to its key/value cache (`Prefix`), computed once, so a step runs the LLM on K tokens per row.

Everything here leaves DPPMG's injected tokens alone: no prompt contains a preference token, the LLM (which may be
the stage-2 text generator, injected rows included) and the UNet are frozen only for the duration of a call and
given back as they were, and the text encoder only ever runs without gradients.
"""

from __future__ import annotations

import importlib.util
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from dppmg.config import GenerationConfig, PMGConfig, WarmStartConfig
from dppmg.data.format import ProcessedDataset
from dppmg.data.imageio import load_image_array
from dppmg.device import sampling_autocast
from dppmg.errors import DppmgError
from dppmg.models import HUB_ID, load_causal_lm, packaged, resolve_causal_lm
from stage2_generation.evaluate import Rewarder, user_histories
from stage2_generation.generators import Generators, encode_prompts, generate_texts, image_shape
from stage2_generation.policy import Pair, samples_to_uint8
from stage2_generation.prompts import chat_prompt, fill_prompt
from stage2_generation.rewards import fidelity_image, personalization_image, pmg_objective
from stage2_generation.training import (
    loss_summary,
    make_optimizer,
    max_positions,
    scheduled_step,
    states_diffusion_loss,
)

STAND_IN = "stand-in"  # the eval.pmg.llm that asks for the stand-in (the stage-2 text generator) by name
HISTORY_LEAD = "The user recently interacted with: "
NO_HISTORY = "The user has no recorded interactions yet."
CHAT_REQUEST = "Describe this user's taste in a few keywords."
KEYWORD_CUE = "Keywords for this user's taste:"
ITEM_WORDS = 8  # each history item is its text's first words: ten items stay near 100 tokens
MIN_WORD_LETTERS = 3
MAX_ITEM_SHARE = 0.5  # a word in more of the items than this is left out of the vocabulary
# A small English stopword list (the catalogue vocabulary's filter); numbers never pass `str.isalpha`.
STOPWORDS = frozenset(
    """
    about above after again against all also and any are because been before being below between both but can
    could did does doing down during each either else ever every few for from further had has have having her here
    hers herself him himself his how into its itself just like made make more most much must neither nor not now
    off once only other our ours ourselves out over own same she should since some such than that the their theirs
    them themselves then there these they this those through too under until upon very was were what when where
    which while who whom whose why will with within without would yet you your yours yourself yourselves
    """.split()  # noqa: SIM905 - a block of words reads better than 120 quoted strings
)
# Keyword scoring: prompts per LLM call, and candidate tokens packed after each (logits [8, 128, 49152] for SmolLM2).
USER_GROUP = 8
PACKED_TOKENS = 128
PREFIX_BATCH = 8  # prompts per LLM call when reading histories
WARMUP = 0.05  # share of the soft training's steps with a rising learning rate
MAX_GRAD_NORM = 1.0


# ---------------------------------------------------------------------------------------------------------
# 1. History as natural language


def item_phrase(ds: ProcessedDataset, item: int, words: int = ITEM_WORDS) -> str:
    """The item's text cut to its first `words` words (its keywords when it has no text)."""
    for column in ("text", "keywords"):
        value = ds.items[column].iat[item]
        if isinstance(value, str) and value.strip():
            return " ".join(value.split()[:words]).rstrip(".,;:!?")
    return f"item {item}"


def describe_history(ds: ProcessedDataset, items: Sequence[int]) -> str:
    """ "The user recently interacted with: a; b; c." for items oldest first (NO_HISTORY for none)."""
    if len(items) == 0:
        return NO_HISTORY
    return HISTORY_LEAD + "; ".join(item_phrase(ds, int(i)) for i in items) + "."


def preference_prompt(message: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """The LLM's context: the history sentence, then the keyword cue (as the answer's start in a chat template)."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return chat_prompt(tokenizer, f"{message}\n{CHAT_REQUEST}") + KEYWORD_CUE
    return f"{message} {KEYWORD_CUE}"


def items_prompt(
    ds: ProcessedDataset,
    items: Sequence[int],
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_tokens: int | None = None,
) -> str:
    """`preference_prompt` of these items, dropping the oldest until it is at most `max_tokens` tokens."""
    items = [int(i) for i in items]
    while True:
        prompt = preference_prompt(describe_history(ds, items), tokenizer)
        if tokenizer is None or max_tokens is None or len(tokenizer(prompt)["input_ids"]) <= max_tokens:
            return prompt
        if not items:
            raise DppmgError(
                f"PMG's history-free prompt {prompt!r} is longer than the {max_tokens} tokens the LLM has room for"
            )
        items = items[1:]


def history_prompt(
    ds: ProcessedDataset,
    user: int,
    n: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
    histories: dict[int, np.ndarray] | None = None,
    max_tokens: int | None = None,
) -> str:
    """The prompt of the user's last `n` training items (`histories`: `evaluate.user_histories(ds)`, oldest first)."""
    if histories is None:
        histories = user_histories(ds)
    history = histories.get(int(user), np.zeros(0, dtype=np.int64))
    return items_prompt(ds, history[-n:] if n > 0 else [], tokenizer, max_tokens)


# ---------------------------------------------------------------------------------------------------------
# The frozen LLM's state after a prompt


@dataclass
class Prefix:
    """A frozen LLM's state after one prompt, computed once and read by the keyword scores and the soft tokens.

    layers: per layer, keys and values [1, H, T, d] (after any rotary embedding: positions 0..T-1).
    next_log_probs: float32 [V], log p(next token | prompt).
    """

    layers: list[tuple[Tensor, Tensor]]
    next_log_probs: Tensor

    @property
    def length(self) -> int:
        return int(self.layers[0][0].shape[2])


@torch.no_grad()  # not inference_mode: the soft tokens' backward later reads these tensors
def encode_prefixes(
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    room: int = 0,
    batch_size: int = PREFIX_BATCH,
    progress: bool = False,
) -> list[Prefix]:
    """The LLM's `Prefix` after each prompt, read in left-padded batches and cut back to each prompt's tokens.

    Positions are `cumsum(mask) - 1`, so the real tokens' keys and values are those of the prompt read alone.
    `room`: the tokens the caller will append; a prompt that leaves fewer within the LLM's positions is an error.
    """
    device = next(lm.parameters()).device
    limit = max_positions(lm, tokenizer) - room
    out: list[Prefix] = []
    starts = range(0, len(prompts), batch_size)
    with frozen(lm):
        for start in tqdm(starts, desc="PMG: read histories", disable=not progress or len(starts) <= 1):
            chunk = list(prompts[start : start + batch_size])
            batch = tokenizer(chunk, padding=True, padding_side="left", return_tensors="pt").to(device)
            mask = batch["attention_mask"]
            if mask.shape[1] > limit:
                longest = chunk[int(mask.sum(dim=1).argmax())]
                raise DppmgError(
                    f"PMG: the prompt {longest!r} is {mask.shape[1]} tokens; with {room} more it exceeds the "
                    f"LLM's {limit + room} positions"
                )
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            result = lm(
                input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1,
            )  # fmt: skip
            log_probs = torch.log_softmax(result.logits[:, -1].float(), dim=-1)  # [B, V]
            layers = [(k, v) for k, v, *_ in result.cache]
            for b, length in enumerate(mask.sum(dim=1).tolist()):
                rows = [
                    (k[b : b + 1, :, -length:].clone(), v[b : b + 1, :, -length:].clone()) for k, v in layers
                ]
                out.append(Prefix(rows, log_probs[b].clone()))
    return out


@dataclass
class PrefixBatch:
    """Several prefixes left-padded to one length T: per-layer keys and values [B, H, T, d], mask [B, T], lengths [B].

    `cache()` gives a fresh `DynamicCache` of them, which the LLM then extends (by new tensors). Built
    from plain per-layer tensors, it suits models whose layers all attend to the whole context (GPT-2, Llama); a
    sliding-window model would need the cache built from its config.
    """

    layers: list[tuple[Tensor, Tensor]]
    mask: Tensor
    lengths: Tensor

    @classmethod
    def stack(cls, prefixes: Sequence[Prefix]) -> PrefixBatch:
        lengths = torch.tensor([p.length for p in prefixes])
        width = int(lengths.max())
        layers = [
            tuple(torch.cat([_left_pad(p.layers[i][j], width) for p in prefixes]) for j in (0, 1))
            for i in range(len(prefixes[0].layers))
        ]
        mask = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()
        device = layers[0][0].device
        return cls(layers, mask.to(device), lengths.to(device))  # type: ignore[arg-type]

    def cache(self) -> DynamicCache:
        return DynamicCache(self.layers)


def _left_pad(x: Tensor, width: int) -> Tensor:
    """[1, H, T, d] → [1, H, width, d] with zeros before the T real positions."""
    return torch.nn.functional.pad(x, (0, 0, width - x.shape[2], 0))


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Inside the block the modules are in eval mode and none of their parameters requires gradients.

    Both are given back afterwards. The stand-in LLM is the stage-2 text generator, whose injected token rows train
    in DPPMG: gradients through it must not reach (or even accumulate on) them.
    """
    params = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    modes = [(m, m.training) for m in modules]
    for p, _ in params:
        p.requires_grad_(False)
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for p, flag in params:
            p.requires_grad_(flag)
        for m, training in modes:
            m.train(training)


# ---------------------------------------------------------------------------------------------------------
# 2. Explicit keywords


def content_words(text: Any) -> list[str]:
    """Lowercase alphabetic words of at least MIN_WORD_LETTERS letters that are not stopwords."""
    if not isinstance(text, str):
        return []
    words = re.findall(r"[a-z0-9']+", text.lower())
    return [w for w in words if w.isalpha() and len(w) >= MIN_WORD_LETTERS and w not in STOPWORDS]


def keyword_vocabulary(ds: ProcessedDataset, size: int) -> list[str]:
    """The catalogue's `size` most frequent content words (item texts and keywords), most frequent first.

    Words in more than MAX_ITEM_SHARE of the items are the catalogue's format, not a taste ("genres" in every
    MovieLens text): every history contains them, so PMI would rank them high for everyone. They are left out.
    Ties go alphabetically, so the vocabulary is a function of the catalogue alone.
    """
    counts: Counter[str] = Counter()
    items: Counter[str] = Counter()  # in how many items each word occurs
    for text, keywords in zip(ds.items["text"], ds.items["keywords"], strict=True):
        words = content_words(text) + content_words(keywords)
        counts.update(words)
        items.update(set(words))
    common = MAX_ITEM_SHARE * len(ds.items)
    ranked = sorted(((w, n) for w, n in counts.items() if items[w] <= common), key=lambda kv: (-kv[1], kv[0]))
    return [w for w, _ in ranked[:size]]


@dataclass
class Keywords:
    """Preference keywords per user, best first, with their scores [U, k] (PMI in nats per token)."""

    words: list[list[str]]
    scores: Tensor


class KeywordExtractor:
    """Scores a candidate vocabulary as continuations of a history prompt under a frozen causal LM.

    Args:
        lm, tokenizer: the LLM and its tokenizer.
        vocabulary: the candidate keywords C (each is scored as " " + word, the continuation of the cue).
        num_keywords: how many keywords `extract` keeps per user.

    Cost: one forward pass of each prompt (`encode_prefixes`, shared with the soft embeddings), whose next-token
    distribution scores every candidate's first token; the later tokens of the longer candidates are packed after
    the cached prompt (`_packed`), so one LLM call scores them all. Measured on one CPU thread (the other core
    busy), 64 prompts × 300 candidates: 0.8 s with the tiny GPT-2 of tests/test_pmg.py (1 layer, 32 dims; ~66-token
    prompts; 226 candidates of several tokens), 1.9 s with stage 2's default tiny GPT-2 (2 layers, 64 dims).
    SmolLM2-135M on MovieLens (246-token chat prompts, 59 of 300 candidates of several tokens): 1.5 s a prompt
    to read it, 0.6 s to score its candidates (4.0 s before packing, with a cache copy per candidate). Two torch
    threads on a loaded machine were 4-8 times slower than one.
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        vocabulary: Sequence[str],
        num_keywords: int,
    ):
        if not 1 <= num_keywords <= len(vocabulary):
            raise DppmgError(f"PMG: num_keywords={num_keywords} with a vocabulary of {len(vocabulary)} words")
        self.lm, self.tokenizer = lm, tokenizer
        self.vocabulary = list(vocabulary)
        self.num_keywords = num_keywords
        self.candidate_ids = [
            tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in self.vocabulary
        ]
        empty = [w for w, ids in zip(self.vocabulary, self.candidate_ids, strict=True) if not ids]
        if empty:
            raise DppmgError(f"PMG: the LLM's tokenizer encodes the keyword {empty[0]!r} as no tokens")
        self.first_ids = torch.tensor([ids[0] for ids in self.candidate_ids])  # [C]
        self.lengths = torch.tensor([len(ids) for ids in self.candidate_ids], dtype=torch.float32)  # [C]
        self._baseline: Tensor | None = None

    @property
    def max_candidate_tokens(self) -> int:
        return max(len(ids) for ids in self.candidate_ids)

    def prefixes(self, prompts: Sequence[str], room: int = 0, progress: bool = False) -> list[Prefix]:
        """The prompts' `Prefix`es, with room for every candidate (and `room` tokens more, e.g. soft tokens)."""
        room = max(room, self.max_candidate_tokens - 1)
        return encode_prefixes(self.lm, self.tokenizer, prompts, room=room, progress=progress)

    @torch.no_grad()
    def log_probs(self, prefixes: Sequence[Prefix], progress: bool = False) -> Tensor:
        """float32 [U, C]: log p(candidate | prompt) / its number of tokens, for every prompt and candidate.

        A candidate's first token is read from the prompt's own next-token distribution. The rest of the longer
        candidates are packed one after another after the cached prompt (`_packed`): one call per USER_GROUP
        prompts and PACKED_TOKENS candidate tokens, without copying a prompt's cache for each candidate.
        """
        if not prefixes:
            return torch.zeros(0, len(self.vocabulary))
        total = torch.stack([p.next_log_probs for p in prefixes]).cpu()[:, self.first_ids]  # [U, C]
        packs = _packs([len(ids) - 1 for ids in self.candidate_ids], PACKED_TOKENS)
        groups = range(0, len(prefixes), USER_GROUP)
        with frozen(self.lm):
            for g in tqdm(groups, desc="PMG: keywords", disable=not progress or len(groups) <= 1):
                batch = PrefixBatch.stack(prefixes[g : g + USER_GROUP])
                for pack in packs:
                    total[g : g + len(batch.lengths), pack] += self._packed(batch, pack)
        return total / self.lengths

    def baseline(self) -> Tensor:
        """float32 [C]: the same under the history-free prompt (computed once)."""
        if self._baseline is None:
            prompt = preference_prompt(NO_HISTORY, self.tokenizer)
            self._baseline = self.log_probs(self.prefixes([prompt]))[0]
        return self._baseline

    def scores(self, prefixes: Sequence[Prefix], progress: bool = False) -> Tensor:
        """float32 [U, C]: the PMI of every candidate with every prompt's history."""
        return self.log_probs(prefixes, progress) - self.baseline()

    def extract(self, prefixes: Sequence[Prefix], progress: bool = False) -> Keywords:
        """The `num_keywords` best candidates of each prompt by PMI."""
        best = self.scores(prefixes, progress).topk(self.num_keywords, dim=1)
        words = [[self.vocabulary[c] for c in row] for row in best.indices.tolist()]
        return Keywords(words, best.values)

    def _packed(self, batch: PrefixBatch, pack: list[int]) -> Tensor:
        """float32 [B, len(pack)]: log p(tokens 2.. of each candidate | prompt, its first token), for B prompts.

        The candidates' tokens but their last sit one after another after the prompt, L in all, each at the
        position it would have right after the prompt; a 4D mask [B, 1, L, T + L] lets each token see the prompt
        and its own candidate's earlier tokens only, so the L outputs are those of the candidates read one by one.
        """
        ids = [self.candidate_ids[c] for c in pack]
        inputs = torch.tensor([t for x in ids for t in x[:-1]])  # [L]
        targets = torch.tensor([t for x in ids for t in x[1:]])  # [L]
        owner = torch.tensor(
            [k for k, x in enumerate(ids) for _ in x[1:]]
        )  # [L], the candidate of each token
        offset = torch.tensor([j for x in ids for j in range(len(x) - 1)])  # [L], its place in the candidate
        device = batch.mask.device
        b, width = batch.mask.shape
        own = (owner[:, None] == owner[None, :]) & (offset[None, :] <= offset[:, None])  # [L, L]
        allowed = torch.cat(
            [batch.mask.bool()[:, None, :].expand(-1, len(inputs), -1), own.to(device).expand(b, -1, -1)],
            dim=2,
        )  # [B, L, T + L]
        dtype = next(self.lm.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
        logits = self.lm(
            input_ids=inputs.to(device).expand(b, -1), cache=batch.cache(), use_cache=True,
            position_ids=batch.lengths[:, None] + offset.to(device)[None, :], attention_mask=mask[:, None],
        ).logits  # fmt: skip
        picked = torch.log_softmax(logits.float(), dim=-1).gather(
            -1, targets.to(device).expand(b, -1)[..., None]
        )
        return torch.zeros(b, len(pack)).index_add_(1, owner, picked.squeeze(-1).cpu())


def _packs(extra: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of the candidates with `extra` > 0 tokens after their first, in groups of at most `budget` tokens
    (a longer candidate gets a group of its own)."""
    packs: list[list[int]] = []
    used = budget
    for c, n in enumerate(extra):
        if n == 0:
            continue
        if used + n > budget:
            packs.append([])
            used = 0
        packs[-1].append(c)
        used += n
    return packs


def load_extractor_lm(
    name: str,
    cache_dir: str | Path | None,
    fallback_lm: PreTrainedModel,
    fallback_tokenizer: PreTrainedTokenizerBase,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """(lm, tokenizer, what ran): the named LLM when it is installed, else the stage-2 text generator, named so.

    Never downloads: a packaged model counts as installed when its package is, a file or folder when it exists,
    and a hub id only when the local Hugging Face cache holds it (it then loads from that snapshot folder).
    """
    location = None if name == STAND_IN else installed_lm(name)
    if location is None:
        why = "asked for by name" if name == STAND_IN else f"{name} is not installed"
        return fallback_lm, fallback_tokenizer, f"stand-in: the stage-2 text generator ({why})"
    lm, tokenizer = load_causal_lm(location, cache_dir=cache_dir)
    return lm.requires_grad_(False), tokenizer, name


def installed_lm(name: str) -> str | None:
    """What to load for the named LLM without a download (the name itself, or a cached snapshot), or None."""
    model = packaged(name, "causal_lm")
    if model is not None:
        return name if importlib.util.find_spec(model.module) is not None else None
    path = Path(name).expanduser()
    if path.exists():
        resolve_causal_lm(name)  # a DppmgError for a file that is not a model
        return name
    if not HUB_ID.match(name):
        return None
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(name, "config.json")
    return str(Path(config).parent) if isinstance(config, str) else None


# ---------------------------------------------------------------------------------------------------------
# 3. Implicit soft embeddings


class SoftPreference(nn.Module):
    """K soft tokens read by a frozen LLM after the history prompt, mapped into the image text-encoder space.

        e_u = LayerNorm(W · h_L(prompt_u, p_1..p_K) + b)      [B, K, D]

    p_k [E] are trainable input vectors (initialised as the embeddings of random vocabulary tokens, the scale the
    LLM expects), h_L the LLM's last hidden states at their positions, W [D, H] and b the map into the text
    encoder's output space (D = the UNet's cross-attention width); the LayerNorm puts the rows on the scale of a
    CLIP-style encoder's normalised output states. This is input-level prompt tuning, not P-Tuning v2 (module
    docstring). The LLM is held outside the module's parameters: `parameters()` and `state_dict()` are the soft
    module's alone.

    Args:
        lm: the frozen LLM (its input embeddings give E and the initial vectors).
        num_tokens: K.
        out_dim: D, `pipe.text_encoder.config.hidden_size`.
        base_vocab: the tokenizer's own vocabulary size (`tokenizer.vocab_size`): initial tokens are drawn below it,
            never among tokens added later (DPPMG's preference tokens).
        seed: draws the initial tokens and the map's initial weights.
    """

    def __init__(self, lm: PreTrainedModel, num_tokens: int, out_dim: int, base_vocab: int, seed: int = 0):
        super().__init__()
        if num_tokens < 1:
            raise DppmgError(f"PMG: soft_tokens must be at least 1, got {num_tokens}")
        self._lm = (lm,)  # a tuple, so that nn.Module does not register the LLM as a submodule
        table = lm.get_input_embeddings().weight
        hidden = int(lm.config.get_text_config().hidden_size)
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(min(base_vocab, table.shape[0]), (num_tokens,), generator=g)
        self.tokens = nn.Parameter(table.detach()[ids.to(table.device)].float().clone())  # [K, E]
        self.proj = nn.Linear(hidden, out_dim)
        with torch.no_grad():
            bound = 1 / hidden**0.5  # nn.Linear's default init, drawn from the seeded generator
            self.proj.weight.uniform_(-bound, bound, generator=g)
            self.proj.bias.uniform_(-bound, bound, generator=g)
        self.norm = nn.LayerNorm(out_dim)
        self.to(table.device)

    @property
    def lm(self) -> PreTrainedModel:
        return self._lm[0]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def forward(self, prefixes: Sequence[Prefix]) -> Tensor:
        """[B, K, D] soft preference embeddings, one row block per prefix (differentiable in the soft parameters)."""
        batch = PrefixBatch.stack(prefixes)
        mask, lengths = batch.mask, batch.lengths
        b, k = len(prefixes), self.num_tokens
        limit = getattr(self.lm.config, "max_position_embeddings", None)
        if limit is not None and int(lengths.max()) + k > limit:
            raise DppmgError(
                f"PMG: a {int(lengths.max())}-token history prompt and {k} soft tokens exceed the LLM's {limit} "
                "positions (encode the prompts with room for the soft tokens)"
            )
        dtype = self.lm.get_input_embeddings().weight.dtype
        embeds = self.tokens.to(dtype)[None].expand(b, -1, -1)  # [B, K, E]
        positions = lengths[:, None] + torch.arange(k, device=lengths.device)[None, :]
        with frozen(self.lm):
            hidden = self.lm.base_model(
                inputs_embeds=embeds,
                cache=batch.cache(),
                use_cache=True,
                position_ids=positions,
                attention_mask=torch.cat([mask, mask.new_ones(b, k)], dim=1),
            ).last_hidden_state  # [B, K, H], after the LLM's final norm
        return self.norm(self.proj(hidden.float()))

    def extra_repr(self) -> str:
        return f"tokens={self.num_tokens}, lm={type(self.lm).__name__}"


# ---------------------------------------------------------------------------------------------------------
# 4a. Conditioning and training


def image_prompt(template: str, target_keywords: str, preference: Sequence[str]) -> str:
    """The image prompt: the target keywords with the preference keywords in the {tokens} slot.

    Preference words already in the target keywords are left out ("lamp" before "red lamp" says nothing new).
    """
    return fill_prompt(template, target_keywords, preference_slot(target_keywords, preference))


def preference_slot(target_keywords: str, preference: Sequence[str]) -> str:
    """What goes in a template's {tokens} slot: the preference words not already in the target, and a space."""
    taken = set(str(target_keywords).lower().split())
    words = [w for w in preference if w not in taken]
    return " ".join(words) + " " if words else ""


def conditioning(states: Tensor, soft: Tensor) -> Tensor:
    """[B, S + K, D]: the prompt's encoder states [B, S, D] followed by the soft rows [B, K, D]."""
    return torch.cat([states, soft.to(states.dtype)], dim=1)


@torch.no_grad()
def unconditional(pipe: StableDiffusionPipeline, num_soft: int) -> Tensor:
    """[1, S + K, D]: the negative states of classifier-free guidance, as long as the conditional ones.

    encode("") followed by K copies of its last row, a padding position's state: "" is what the warm-start trained
    the unconditional prediction on, so the negative branch sees its usual input with a longer run of padding,
    and guidance pushes along both the prompt and the soft rows. (Zeros would be an input the UNet never saw, and
    K soft rows of the same user would take the soft embeddings out of what guidance amplifies.)
    """
    empty = encode_prompts(pipe, [""])  # [1, S, D]
    return torch.cat([empty, empty[:, -1:].expand(1, num_soft, -1)], dim=1)


@dataclass
class SoftTrainingData:
    """The soft module's training rows, one per (training user, held-back item).

    prefixes: the LLM's state after each row's history prompt (the items before the held-back one).
    states: [N, S, D] text-encoder states of each row's image prompt (target + preference keywords), no gradients.
    pixels: [N, 3, H, W] the held-back items' images in [-1, 1] at the pipeline's shape.
    """

    users: list[int]
    items: list[int]
    keywords: Keywords
    prefixes: list[Prefix]
    states: Tensor
    pixels: Tensor

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class SoftTrainResult:
    """The soft training's diffusion loss over its first and last 10 % of steps (`training.loss_summary`)."""

    loss_first: float
    loss_last: float
    steps: int
    seconds: float
    rows: int


def training_rows(
    ds: ProcessedDataset, histories: dict[int, np.ndarray], users: Sequence[int]
) -> list[tuple[int, list[int], int]]:
    """(user, history, held-back item) per user: the last training item with an image, and the items before it
    (oldest first), as a held-out user's test item follows their training history. Users without one are skipped."""
    has_image = ds.items["image"].notna().to_numpy()
    rows = []
    for u in users:
        history = [int(i) for i in histories.get(int(u), [])]
        with_image = [k for k, i in enumerate(history) if has_image[i]]
        if not with_image or with_image[-1] == 0:
            continue
        last = with_image[-1]
        rows.append((int(u), history[:last], history[last]))
    return rows


def soft_diffusion_loss(
    soft: SoftPreference,
    pipe: StableDiffusionPipeline,
    data: SoftTrainingData,
    rows: Tensor,
    generator: torch.Generator,
) -> Tensor:
    """The diffusion loss of the data's `rows` conditioned on their prompts and soft embeddings."""
    embeddings = soft([data.prefixes[i] for i in rows.tolist()])  # [B, K, D]
    states = conditioning(data.states[rows].to(embeddings.device), embeddings)
    with frozen(pipe.unet):
        return states_diffusion_loss(pipe, states, data.pixels[rows], generator)


def train_soft_preference(
    soft: SoftPreference,
    pipe: StableDiffusionPipeline,
    data: SoftTrainingData,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
) -> SoftTrainResult:
    """AdamW (weight decay 0, warm-up then cosine decay) on the soft module alone, `steps` steps of the diffusion
    loss on rows drawn with replacement by a generator seeded by `seed`. The LLM and the UNet do not change."""
    if len(data) == 0:
        raise DppmgError(
            "PMG: no training rows for the soft embeddings (no training user has an item with an image)"
        )
    params = list(soft.parameters())
    optimizer, schedule = make_optimizer(params, lr, steps, WARMUP)
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0  # decay would pull the soft tokens towards 0, off the LLM's input scale
    rng = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    soft.train()
    for _ in tqdm(range(steps), desc="PMG: soft embeddings", disable=not progress):
        rows = torch.randint(len(data), (min(batch_size, len(data)),), generator=rng)
        loss = soft_diffusion_loss(soft, pipe, data, rows, rng)
        losses.append(scheduled_step(optimizer, schedule, loss, params, MAX_GRAD_NORM, "PMG soft embeddings"))
    soft.eval()
    summary = loss_summary(losses, time.perf_counter() - start)
    return SoftTrainResult(summary["loss_first"], summary["loss_last"], steps, summary["seconds"], len(data))


# ---------------------------------------------------------------------------------------------------------
# 4b. Candidates and their selection


@dataclass
class CandidateScores:
    """Every candidate's scorer similarities: personalization (to the user's history images) and fidelity
    (to the target), float32 [P, N]. `select(alpha)` re-selects without regenerating (the trade-off curve)."""

    personalization: Tensor
    fidelity: Tensor

    def select(self, alpha: float) -> Tensor:
        return select_candidates(self.personalization, self.fidelity, alpha)


def select_candidates(personalization: Tensor, fidelity: Tensor, alpha: float) -> Tensor:
    """long [P]: per pair, the candidate with the highest z = α·log d_p + (1 − α)·log d_t (`pmg_objective`).

    A similarity that is NaN (a user without history images) counts as 0 for all of the pair's candidates, so such
    a pair is chosen by the other score alone.
    """
    p, f = torch.nan_to_num(personalization.float(), nan=0.0), torch.nan_to_num(fidelity.float(), nan=0.0)
    return pmg_objective(p, f, alpha).argmax(dim=1)


def candidate_seed(seed: int, pair: int, candidate: int) -> int:
    return int(np.random.SeedSequence([seed, pair, candidate]).generate_state(1)[0])


@torch.no_grad()
def generate_candidates(
    pipe: StableDiffusionPipeline,
    states: Tensor,
    negative: Tensor,
    candidates: int,
    steps: int,
    guidance: float,
    seed: int,
    batch_size: int,
    progress: bool = True,
    precision: str = "fp32",
) -> np.ndarray:
    """uint8 [P, N, H, W, 3]: N images per row of `states` [P, L, D] (`negative` [1, L, D] for guidance), sampled at
    `precision` (`device.sampling_autocast`).

    Candidate n of pair p starts from noise seeded by (seed, p, n), whatever the batch size or the other pairs.
    """
    height, width = image_shape(pipe)
    rows = [(p, n) for p in range(len(states)) for n in range(candidates)]
    out = []
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc="PMG: images", disable=not progress or len(starts) <= 1):
        chunk = rows[start : start + batch_size]
        index = torch.tensor([p for p, _ in chunk], device=states.device)
        with sampling_autocast(precision, pipe.device):
            samples = pipe(
                prompt_embeds=states[index], negative_prompt_embeds=negative.expand(len(chunk), -1, -1),
                height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                generator=[torch.Generator().manual_seed(candidate_seed(seed, p, n)) for p, n in chunk],
                output_type="latent", return_dict=False,
            )[0]  # fmt: skip
        out.append(samples_to_uint8(pipe, samples))
    return np.concatenate(out).reshape(len(states), candidates, height, width, 3)


def score_candidates(rewarder: Rewarder, pairs: Sequence[Pair], images: np.ndarray) -> CandidateScores:
    """The scorer's image personalization and fidelity of every candidate [P, N, H, W, 3]."""
    p, n = images.shape[:2]
    inputs = rewarder.inputs(
        [pair for pair in pairs for _ in range(n)], None, images.reshape(p * n, *images.shape[2:])
    )
    return CandidateScores(personalization_image(inputs).view(p, n), fidelity_image(inputs).view(p, n))


# ---------------------------------------------------------------------------------------------------------
# The method


class PMGMethod:
    """PMG as an evaluation method: `generate(pairs, seed)` → (texts, images, info).

    Args:
        gen: the warm-started generators (DPPMG's, possibly with its tokens injected; PMG's prompts use none).
        prompts: the warm-start prompt templates (`policy.prompts`).
        rewarder: scores the candidates (the scorer's image personalization and fidelity).
        extractor: the keyword extractor over the LLM; `soft`: the soft module over the same LLM.
        extractor_name: which LLM ran (`load_extractor_lm`).
        history_items, candidates, alpha: `PMGConfig`'s.
        generation: the generation settings every method shares.
    """

    name = "pmg"

    def __init__(
        self,
        gen: Generators,
        prompts: WarmStartConfig,
        rewarder: Rewarder,
        extractor: KeywordExtractor,
        soft: SoftPreference,
        extractor_name: str,
        history_items: int,
        candidates: int,
        alpha: float,
        generation: GenerationConfig,
    ):
        if candidates < 1:
            raise DppmgError(f"PMG: candidates must be at least 1, got {candidates}")
        self.gen, self.prompts, self.rewarder = gen, prompts, rewarder
        self.extractor, self.soft, self.extractor_name = extractor, soft, extractor_name
        self.history_items, self.candidates, self.alpha = history_items, candidates, alpha
        self.generation = generation
        self._read: dict[int, tuple[list[str], Tensor, Tensor]] = {}  # user -> read_users' row
        self.room = max(extractor.max_candidate_tokens - 1, soft.num_tokens)  # what follows a history prompt
        self.max_prompt_tokens = max_positions(extractor.lm, extractor.tokenizer) - self.room

    @property
    def ds(self) -> ProcessedDataset:
        return self.rewarder.ds

    def prompts_for(self, histories: Sequence[Sequence[int]]) -> list[str]:
        """The LLM prompt of each item history (oldest first; the last `history_items` are used)."""
        n = self.history_items
        return [
            items_prompt(
                self.ds, list(h)[-n:] if n > 0 else [], self.extractor.tokenizer, self.max_prompt_tokens
            )
            for h in histories
        ]

    def training_data(self, users: Sequence[int], progress: bool = True) -> SoftTrainingData:
        """The soft module's rows for these training users (`training_rows`), with their keywords and images."""
        rows = training_rows(self.ds, self.rewarder.history, users)
        prefixes = self.extractor.prefixes(self.prompts_for([h for _, h, _ in rows]), self.room, progress)
        keywords = self.extractor.extract(prefixes, progress)
        template = self.prompts.image_prompt
        texts = [
            image_prompt(template, _target_keywords(self.ds, item), words)
            for (_, _, item), words in zip(rows, keywords.words, strict=True)
        ]
        pipe = self.gen.pipe
        with torch.no_grad():
            states = encode_prompts(pipe, texts) if texts else torch.zeros(0)
        paths = [self.ds.image_path(item) for _, _, item in rows]
        images = load_image_array(paths, image_shape(pipe), progress=progress)  # type: ignore[arg-type]
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        return SoftTrainingData(
            [u for u, _, _ in rows], [i for _, _, i in rows], keywords, prefixes, states, pixels
        )

    def generate(
        self, pairs: Sequence[Pair], seed: int, progress: bool = True
    ) -> tuple[list[str], np.ndarray, dict[str, Any]]:
        """Texts, the chosen images uint8 [P, H, W, 3], and info: `keywords` and `keyword_scores` per pair, every
        candidate (`candidates`, uint8 [P, N, H, W, 3]) with its `scores` (CandidateScores), the `chosen` index per
        pair, `alpha`, the `extractor` that ran, and the seconds spent on texts and on images."""
        pairs = list(pairs)
        if not pairs:
            raise DppmgError("PMG: no pairs to generate for")
        words, word_scores, soft_rows = self.read_users([p.user for p in pairs], progress)
        keywords = Keywords(words, word_scores)
        g = self.generation
        start = time.perf_counter()
        texts = generate_texts(
            self.gen.lm, self.gen.lm_tokenizer, self.text_prompts(pairs, keywords.words),
            max_new_tokens=g.max_new_tokens, temperature=g.temperature, seed=seed, batch_size=g.batch_size,
            progress=progress,
        )  # fmt: skip
        text_seconds = time.perf_counter() - start
        start = time.perf_counter()
        candidates = self.candidate_images(pairs, soft_rows, keywords.words, seed, progress)
        image_seconds = time.perf_counter() - start
        scores = score_candidates(self.rewarder, pairs, candidates)
        chosen = scores.select(self.alpha)
        info = {
            "keywords": keywords.words,
            "keyword_scores": keywords.scores.tolist(),
            "candidates": candidates,
            "scores": scores,
            "chosen": chosen.tolist(),
            "alpha": self.alpha,
            "extractor": self.extractor_name,
            "text_seconds": text_seconds,
            "image_seconds": image_seconds,
        }
        return texts, candidates[np.arange(len(pairs)), chosen.numpy()], info

    @torch.no_grad()
    def read_users(
        self, users: Sequence[int], progress: bool = True
    ) -> tuple[list[list[str]], Tensor, Tensor]:
        """(keywords, their scores [U, k], soft rows [U, K, D]) per user, each user's history read by the LLM once.

        Both depend only on the user's history and the (then frozen) soft module, so they are kept for the next
        call: an evaluation asks for the same users with every seed.
        """
        new = [u for u in dict.fromkeys(int(u) for u in users) if u not in self._read]
        if new:
            histories = [self.rewarder.user_history(u) for u in new]
            prefixes = self.extractor.prefixes(self.prompts_for(histories), self.room, progress)
            keywords = self.extractor.extract(prefixes, progress)
            soft = self.soft(prefixes).detach()
            for k, u in enumerate(new):
                self._read[u] = (keywords.words[k], keywords.scores[k], soft[k])
        rows = [self._read[int(u)] for u in users]
        return [r[0] for r in rows], torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows])

    @torch.no_grad()
    def candidate_images(
        self,
        pairs: Sequence[Pair],
        soft_rows: Tensor,
        keywords: Sequence[Sequence[str]],
        seed: int,
        progress: bool = True,
    ) -> np.ndarray:
        """uint8 [P, N, H, W, 3]: N candidates per pair, conditioned on its prompt's states and soft rows [P, K, D]."""
        pipe, g = self.gen.pipe, self.generation
        template = self.prompts.image_prompt
        prompts = [image_prompt(template, p.keywords, w) for p, w in zip(pairs, keywords, strict=True)]
        states = conditioning(encode_prompts(pipe, prompts), soft_rows.to(pipe.unet.device))  # [P, S + K, D]
        negative = unconditional(pipe, self.soft.num_tokens)
        return generate_candidates(
            pipe, states, negative, self.candidates, g.image_steps, g.guidance, seed, g.batch_size, progress,
            g.precision,
        )  # fmt: skip

    def text_prompts(self, pairs: Sequence[Pair], keywords: Sequence[Sequence[str]]) -> list[str]:
        """The text generator's prompts: the warm-start template with the preference keywords in the tokens slot."""
        cfg = self.prompts
        prompts = [
            fill_prompt(cfg.text_prompt, p.keywords, preference_slot(p.keywords, w))
            for p, w in zip(pairs, keywords, strict=True)
        ]
        if cfg.text_chat:
            prompts = [chat_prompt(self.gen.lm_tokenizer, p, cfg.text_system) for p in prompts]
        return prompts


def _target_keywords(ds: ProcessedDataset, item: int) -> str:
    value = ds.items["keywords"].iat[item]
    return str(value) if isinstance(value, str) and value.strip() else item_phrase(ds, item, 4)


def build_pmg_method(
    gen: Generators,
    prompts: WarmStartConfig,
    rewarder: Rewarder,
    train_users: Sequence[int],
    pmg: PMGConfig,
    generation: GenerationConfig,
    model_cache: str | Path | None,
    seed: int,
    progress: bool = True,
    soft_state: dict[str, Tensor] | None = None,
) -> tuple[PMGMethod, SoftTrainResult | None]:
    """PMG from its config: the LLM (or its stand-in), the vocabulary, and the soft module trained on up to
    `pmg.train_users` of `train_users` (drawn with `seed`), or given as `soft_state` (then not trained: None)."""
    lm, tokenizer, name = load_extractor_lm(pmg.llm, model_cache, gen.lm, gen.lm_tokenizer)
    extractor = KeywordExtractor(
        lm, tokenizer, keyword_vocabulary(rewarder.ds, pmg.vocabulary_size), pmg.num_keywords
    )
    out_dim = int(gen.pipe.text_encoder.config.hidden_size)
    soft = SoftPreference(lm, pmg.soft_tokens, out_dim, base_vocab=tokenizer.vocab_size, seed=seed)
    method = PMGMethod(
        gen,
        prompts,
        rewarder,
        extractor,
        soft,
        name,
        pmg.history_items,
        pmg.candidates,
        pmg.alpha,
        generation,
    )
    if soft_state is not None:
        soft.load_state_dict(soft_state)
        return method, None
    rng = np.random.default_rng([seed, 7])
    users = sorted(int(u) for u in train_users)
    users = sorted(rng.choice(users, size=min(pmg.train_users, len(users)), replace=False).tolist())
    data = method.training_data(users, progress)
    result = train_soft_preference(
        soft, gen.pipe, data, pmg.train_steps, pmg.batch_size, pmg.lr, seed, progress
    )
    return method, result
