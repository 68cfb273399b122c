"""Warm-start of the generators on the items: losses fall, prompts are masked, the cache is used and keyed."""

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from dppmg.config import GeneratorConfig, ScorerConfig, WarmStartConfig, load_config
from dppmg.data.format import ProcessedDataset, content_hash
from dppmg.data.imageio import write_image_array
from dppmg.errors import DppmgError
from dppmg.scorer import Scorer, build_tiny_scorer
from stage2_generation import warmstart
from stage2_generation.generators import build_generators, image_shape
from stage2_generation.prompts import chat_prompt, fill_prompt, target_separator
from stage2_generation.training import IGNORE_INDEX, diffusion_loss, guarded_step, make_optimizer, text_batch
from stage2_generation.warmstart import (
    text_warmstart_examples,
    train_image_warmstart,
    train_text_warmstart,
    warm_start,
    warmstart_key,
)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
OBJECTS = ["lamp", "mirror", "clock"]
SIDE = 16
TINY = GeneratorConfig(
    text_vocab=300,
    text_max_length=32,
    text_dim=32,
    text_layers=1,
    text_heads=2,
    image_size=SIDE,
    unet_channels=[16, 32],
    unet_heads=2,
    text_encoder_vocab=50,
    text_encoder_max_length=8,
    text_encoder_dim=32,
    text_encoder_layers=1,
    text_encoder_heads=2,
    text_encoder_from_scorer=False,  # tests with the scorer's text tower pass one explicitly
)
FEW_STEPS = WarmStartConfig(text_steps=2, image_steps=2, batch_size=4)


def make_dataset(root: Path, with_images: bool = True) -> ProcessedDataset:
    """12 items ("red lamp", ...) with a one-sentence text and, optionally, a solid-colour image each."""
    pairs = [(c, o) for c in COLOURS for o in OBJECTS]
    items = pd.DataFrame(
        {
            "item_idx": np.arange(len(pairs)),
            "item_id": [f"i{i}" for i in range(len(pairs))],
            "text": [f"A {c} {o} for the home." for c, o in pairs],
            "keywords": [f"{c} {o}" for c, o in pairs],
            "image": None,
        }
    )
    if with_images:
        images = np.stack([np.full((SIDE, SIDE, 3), COLOURS[c], dtype=np.uint8) for c, _ in pairs])
        items["image"] = write_image_array(images, root, progress=False)
    users = pd.DataFrame({"user_idx": [0], "user_id": ["u0"]})
    interactions = pd.DataFrame({"user_idx": [0], "item_idx": [0], "timestamp": [0], "split": ["train"]})
    meta = {"modalities": ["text", "image"] if with_images else ["text"]}
    meta["content_hash"] = content_hash(items, interactions, users)
    return ProcessedDataset(root, items, interactions, users, meta)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_examples_pair_keywords_with_text_and_skip_items_without_text() -> None:
    items = pd.DataFrame({"keywords": ["red lamp", None, "blue clock"], "text": ["A red lamp.", "x", None]})
    assert text_warmstart_examples(items) == [("red lamp:", "A red lamp."), (":", "x")]


def test_tokens_go_where_the_template_says_else_first() -> None:
    assert fill_prompt("{keywords}:", "red lamp", "<pt_0_1>") == "<pt_0_1>red lamp:"
    assert (
        fill_prompt("A fan of {tokens} wants a {keywords}.", "lamp", "<pt_0_1>")
        == "A fan of <pt_0_1> wants a lamp."
    )
    assert fill_prompt("{keywords}:", None) == ":"
    hinted = text_warmstart_examples(
        pd.DataFrame({"keywords": ["lamp"], "text": ["A walnut lamp."]}), "I like {tokens}. {keywords}:", 1, 1
    )
    assert hinted[1] == ("I like walnut . lamp:", "A walnut lamp.")


def test_chat_prompts_wrap_the_message_and_need_a_chat_template() -> None:
    tok = build_generators(TINY, ["A red lamp for the home.", "red lamp"], seed=0).lm_tokenizer
    with pytest.raises(DppmgError, match="no chat template"):
        chat_prompt(tok, "red lamp:")
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert chat_prompt(tok, "red lamp:", "Be brief.") == "<system>Be brief.</s><user>red lamp:</s><assistant>"
    assert chat_prompt(tok, "red lamp:") == "<user>red lamp:</s><assistant>"
    assert (
        target_separator(WarmStartConfig(text_chat=True)) == "" and target_separator(WarmStartConfig()) == " "
    )
    # The template's BOS is dropped when encoding adds one anyway (the tiny tokenizer prepends [BOS]).
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert chat_prompt(tok, "red lamp:") == "red lamp:"
    assert tok(chat_prompt(tok, "red lamp:"))["input_ids"].count(tok.bos_token_id) == 1


def test_a_target_is_cut_at_max_target_tokens() -> None:
    tok = build_generators(TINY, ["A red lamp for the home.", "red lamp"], seed=0).lm_tokenizer
    full = text_batch(tok, [("red lamp:", "A red lamp for the home.")], max_length=32)
    cut = text_batch(tok, [("red lamp:", "A red lamp for the home.")], max_length=32, max_target_tokens=3)
    assert (full["labels"] != -100).sum() > 3 and (cut["labels"] != -100).sum() == 3
    glued = text_batch(tok, [("red lamp:", "A red lamp.")], max_length=32, separator="")
    spaced = text_batch(tok, [("red lamp:", "A red lamp.")], max_length=32)
    assert not torch.equal(glued["input_ids"], spaced["input_ids"])


def test_hinted_examples_prefix_words_of_the_items_own_text() -> None:
    items = pd.DataFrame(
        {
            "keywords": ["lamp", "clock"],
            "text": ["A rustic walnut lamp for the kitchen.", "Sleek steel clock."],
        }
    )
    examples = text_warmstart_examples(items, hint_copies=3, hint_words=2, seed=0)
    assert examples[:2] == [
        ("lamp:", "A rustic walnut lamp for the kitchen."),
        ("clock:", "Sleek steel clock."),
    ]
    hinted = examples[2:]
    assert len(hinted) == 6
    for prompt, target in hinted:
        hint, _, rest = prompt.rpartition(" ")
        words = hint.split()
        assert rest in ("lamp:", "clock:") and 1 <= len(words) <= 2
        allowed = {w.strip(".").lower() for w in target.split() if len(w.strip(".")) > 3} - {rest[:-1]}
        assert set(words) <= allowed, (prompt, target)
    assert text_warmstart_examples(items, hint_copies=3, seed=0) == text_warmstart_examples(
        items, hint_copies=3, seed=0
    )


def test_prompt_tokens_are_masked_out_of_the_text_loss() -> None:
    gen = build_generators(TINY, ["A red lamp for the home.", "red lamp"], seed=0)
    tok = gen.lm_tokenizer
    examples = [("red lamp:", "A red lamp for the home."), ("blue clock:", "A blue clock.")]
    batch = text_batch(tok, examples, max_length=32)
    for row, (prompt, target) in enumerate(examples):
        n_prompt = len(tok(prompt)["input_ids"])
        labels = batch["labels"][row]
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        kept = labels[labels != IGNORE_INDEX]
        assert kept[-1] == tok.eos_token_id
        assert tok.decode(kept[:-1]) == " " + target
        # The labelled positions are exactly the real target tokens: padding is masked too.
        assert torch.equal(batch["input_ids"][row][n_prompt : n_prompt + len(kept)], kept)
    # The model's loss is the cross-entropy over the target tokens only.
    with torch.no_grad():
        out = gen.lm(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert torch.allclose(out.loss, manual, atol=1e-5)


def test_text_warmstart_lowers_the_loss(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, with_images=False)
    gen = build_generators(TINY, list(ds.items["text"]) + list(ds.items["keywords"]), seed=0)
    examples = text_warmstart_examples(ds.items)
    stats = train_text_warmstart(gen.lm, gen.lm_tokenizer, examples, 40, 8, 3e-3, seed=0, progress=False)
    assert stats["steps"] == 40
    assert stats["loss_last"] < 0.6 * stats["loss_first"]
    assert not gen.lm.training


def test_image_warmstart_lowers_the_loss_and_trains_the_text_encoder(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path)
    gen = build_generators(TINY, list(ds.items["keywords"]), seed=0)
    prompts, images = warmstart.image_warmstart_examples(
        ds, "{keywords}", image_shape(gen.pipe), progress=False
    )
    assert images.shape == (12, SIDE, SIDE, 3) and prompts[0] == "red lamp"
    encoder_before = [p.clone() for p in gen.pipe.text_encoder.parameters()]
    stats = train_image_warmstart(gen.pipe, prompts, images, 30, 8, 3e-3, seed=0, progress=False)
    assert stats["loss_last"] < 0.7 * stats["loss_first"]
    changed = [not torch.equal(a, b) for a, b in zip(encoder_before, gen.pipe.text_encoder.parameters())]
    assert any(changed)
    assert not gen.pipe.unet.training and not gen.pipe.text_encoder.training


class OracleUNet(torch.nn.Module):
    """Knows the clean image x0, so from the noisy input and t it can return each prediction type's exact target."""

    def __init__(self, x0: torch.Tensor, alphas_cumprod: torch.Tensor, kind: str):
        super().__init__()
        self.x0, self.alphas_cumprod, self.kind = x0, alphas_cumprod, kind

    @property
    def device(self) -> torch.device:
        return self.x0.device

    def forward(
        self, noisy: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> SimpleNamespace:
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        noise = (noisy - a.sqrt() * self.x0) / (1 - a).sqrt()
        velocity = a.sqrt() * noise - (1 - a).sqrt() * self.x0
        target = {"epsilon": noise, "v_prediction": velocity, "sample": self.x0.expand_as(noisy)}[self.kind]
        return SimpleNamespace(sample=target)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_diffusion_loss_targets_the_configured_prediction(kind: str) -> None:
    pipe = build_generators(dataclasses.replace(TINY, prediction_type=kind), ["red lamp"], seed=0).pipe
    x0 = torch.rand(1, 3, SIDE, SIDE) * 2 - 1
    pixels = x0.expand(4, -1, -1, -1)
    args = (["red lamp"] * 4, pixels, torch.Generator().manual_seed(0))
    assert diffusion_loss(pipe, *args) > 0.01  # the untrained UNet is far off
    oracle = OracleUNet(x0, pipe.scheduler.alphas_cumprod, kind)
    parts = {name: getattr(pipe, name) for name in ("tokenizer", "text_encoder", "vae", "scheduler")}
    assert diffusion_loss(SimpleNamespace(unet=oracle, **parts), *args) < 1e-8


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer, schedule = make_optimizer(params, lr=1e-2, steps=20, warmup=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == 0 and lrs[2] == pytest.approx(1e-2) == max(lrs)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False)) and lrs[-1] < 1e-3


def test_ema_leaves_training_alone_and_is_what_the_models_keep(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path)
    prompts, images = warmstart.image_warmstart_examples(ds, "{keywords}", SIDE, progress=False)
    runs = {}
    for decay in (0.0, 0.9):
        gen = build_generators(TINY, list(ds.items["keywords"]), seed=0)
        stats = train_image_warmstart(
            gen.pipe, prompts, images, 8, 4, 3e-3, seed=0, progress=False, ema_decay=decay
        )
        runs[decay] = (stats, [p.detach().clone() for p in gen.pipe.unet.parameters()])
    (plain, last), (averaged, ema) = runs[0.0], runs[0.9]
    assert plain["loss_last"] == pytest.approx(averaged["loss_last"], rel=1e-5)  # the same training run...
    assert any(not torch.equal(a, b) for a, b in zip(last, ema, strict=True))  # ...but other weights kept


def test_second_call_loads_from_the_cache_and_another_config_misses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make_dataset(tmp_path / "data")
    first = warm_start(ds, TINY, FEW_STEPS, tmp_path / "cache", seed=0, progress=False)
    assert set(first.info["warmstart"]) == {"text", "image"}

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(warmstart, "train_text_warmstart", fail)
    monkeypatch.setattr(warmstart, "train_image_warmstart", fail)
    again = warm_start(ds, TINY, FEW_STEPS, tmp_path / "cache", seed=0, progress=False)
    assert again.info["dataset_hash"] == ds.meta["content_hash"]
    state, loaded = first.lm.state_dict(), again.lm.state_dict()
    assert all(torch.equal(state[k], loaded[k]) for k in state)
    with pytest.raises(AssertionError, match="trained again"):
        warm_start(
            ds, TINY, WarmStartConfig(text_steps=3, image_steps=2, batch_size=4), tmp_path / "cache", 0, False
        )


def test_cache_key_follows_dataset_config_and_seed_but_not_device() -> None:
    key = warmstart_key("abc", TINY, FEW_STEPS, 0)
    assert key.startswith("abc-")
    assert warmstart_key("abd", TINY, FEW_STEPS, 0) != key
    assert warmstart_key("abc", TINY, FEW_STEPS, 1) != key
    assert (
        warmstart_key(
            "abc", TINY, WarmStartConfig(lr_image=2e-3, text_steps=2, image_steps=2, batch_size=4), 0
        )
        != key
    )
    on_gpu = GeneratorConfig(**{**TINY.__dict__, "device": "cuda"})
    assert warmstart_key("abc", on_gpu, FEW_STEPS, 0) == key


def test_text_only_dataset_skips_the_image_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = make_dataset(tmp_path / "data", with_images=False)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained the image generator on a dataset without images")

    monkeypatch.setattr(warmstart, "train_image_warmstart", fail)
    gen = warm_start(ds, TINY, FEW_STEPS, tmp_path / "cache", seed=0, progress=False)
    assert set(gen.info["warmstart"]) == {"text"}


def test_config_rejects_bad_warmstart_values() -> None:
    assert load_config().stage2.warmstart.text_prompt == "{keywords}:"
    with pytest.raises(DppmgError, match="uncond_prob"):
        load_config(overrides=["stage2.warmstart.uncond_prob=1.5"])
    with pytest.raises(DppmgError, match="keywords"):
        load_config(overrides=["stage2.warmstart.image_prompt=a photo"])
    with pytest.raises(DppmgError, match="warmup"):
        load_config(overrides=["stage2.warmstart.warmup=1.0"])
    with pytest.raises(DppmgError, match="ema_decay"):
        load_config(overrides=["stage2.warmstart.ema_decay=-0.1"])


def _tiny_scorer(ds: ProcessedDataset, hidden: int = 32) -> Scorer:
    cfg = ScorerConfig(hidden_size=hidden, num_layers=1, num_heads=2, projection_dim=16, max_text_length=12)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_tiny_scorer(cfg, list(ds.items["text"]))


def test_text_encoder_from_the_scorer_is_a_frozen_copy(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "data")
    scorer = _tiny_scorer(ds)
    before = {k: v.clone() for k, v in scorer.model.text_model.state_dict().items()}
    cfg = dataclasses.replace(TINY, text_encoder_from_scorer=True)
    gen = warm_start(ds, cfg, FEW_STEPS, tmp_path / "cache", seed=0, progress=False, scorer=scorer)
    encoder = gen.pipe.text_encoder.state_dict()
    # The pipeline encodes with the scorer's weights and tokenizer, and the warm-start left them alone...
    assert all(torch.equal(encoder[k], before[k]) for k in before)
    assert gen.pipe.unet.config.cross_attention_dim == 32
    assert gen.pipe.tokenizer("red lamp")["input_ids"] == scorer.tokenizer("red lamp")["input_ids"]
    # ...while the UNet trained; the pipeline holds copies, so extending its vocabulary leaves the scorer be.
    assert gen.info["warmstart"]["image"]["steps"] == FEW_STEPS.image_steps
    n_vocab = len(scorer.tokenizer)
    gen.pipe.tokenizer.add_tokens(["<pi_0_0>"])
    gen.pipe.text_encoder.resize_token_embeddings(len(gen.pipe.tokenizer))
    assert len(scorer.tokenizer) == n_vocab
    assert scorer.model.text_model.embeddings.token_embedding.weight.shape[0] == n_vocab
    # Without a scorer it says what it needs; another scorer is another cache entry.
    with pytest.raises(DppmgError, match="scorer"):
        warm_start(ds, cfg, FEW_STEPS, tmp_path / "cache", seed=0, progress=False)
    other = warm_start(ds, cfg, FEW_STEPS, tmp_path / "cache", 0, False, scorer=_tiny_scorer(ds, hidden=16))
    assert other.pipe.unet.config.cross_attention_dim == 16
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_unet_adds_a_pooled_prompt_to_its_time_embedding_when_configured() -> None:
    on = build_generators(TINY, ["red lamp"], seed=0).pipe.unet
    off = build_generators(
        dataclasses.replace(TINY, unet_text_time_embedding=False), ["red lamp"], 0
    ).pipe.unet
    assert on.config.addition_embed_type == "text" and on.add_embedding is not None
    assert off.config.addition_embed_type is None and not hasattr(off, "add_embedding")


@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_guarded_step_skips_a_non_finite_step_and_applies_nothing(bad):
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    losses = {
        "loss": lambda: (weight * float("nan")).sum(),
        # a finite loss whose gradient is not: d/dw sqrt(w - 1) at w = 1 is inf
        "gradient": lambda: (weight - 1.0).clamp(min=0).sqrt().sum(),
    }
    loss = losses[bad]()
    assert not guarded_step(loss, [weight], optimizer, max_grad_norm=1.0)
    assert torch.equal(weight.detach(), torch.tensor([1.0, 2.0]))
    assert weight.grad is None  # cleared, so a later step does not apply it

    assert guarded_step((weight**2).sum(), [weight], optimizer, max_grad_norm=100.0)
    assert torch.allclose(weight.detach(), torch.tensor([0.8, 1.6]))  # w − 0.1 · 2w
