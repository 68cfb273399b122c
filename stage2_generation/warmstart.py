"""Warm-start the generators on the dataset's items, so that before any personalization they draw items.

Text: causal-LM loss of the item's text given a prompt made of its keywords ("red lamp:" → " This rustic red
lamp ..." + EOS). Only the target tokens count: the prompt is what the user gives at generation time, so learning
to predict it would spend capacity on nothing we sample.

Image: the diffusion loss of the item's image given its keywords, training the UNet and the text encoder together.
The target is whatever the scheduler's prediction_type says: the noise, the velocity, or the clean image itself
(the tiny pipeline's default: after a few minutes of training, an epsilon-predicting UNet still leaves visible noise
in its samples, while one that predicts the image draws clean, flat items). A share of prompts is replaced by "" so
the same model also learns the unconditional prediction that classifier-free guidance subtracts. The tiny pipeline
works in pixel space (images scaled to [-1, 1]); a pipeline with a VAE trains on its scaled latents.

`warm_start` builds the generators, trains both parts and caches the result per (dataset content hash, generator +
warm-start config + seed) under `cache_root/<key>/`, written atomically by `save_generators`, so a rerun of stage 2
on the same data loads it instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from diffusers import StableDiffusionPipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dppmg.config import GeneratorConfig, WarmStartConfig, to_dict
from dppmg.data.format import ProcessedDataset, content_hash
from dppmg.data.imageio import load_image_array
from dppmg.errors import DppmgError
from dppmg.log import logger
from dppmg.scorer import Scorer
from stage2_generation.generators import (
    MANIFEST_FILE,
    Generators,
    build_generators,
    encode_prompts,
    image_shape,
    load_generators,
    save_generators,
)

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and so every HF causal LM) skips
KEYWORDS = "{keywords}"  # the placeholder in the prompt templates (str.replace, so other braces are literal)
TOKENS = "{tokens}"  # where a user's preference tokens go in a template (first when it has none)
LOSS_WINDOW = (
    0.1  # loss_first / loss_last average this share of the steps: one diffusion step's loss is noisy
)
MIN_HINT_LETTERS = 3  # shorter words ("a", "the", "for") carry no preference
CACHE_VERSION = 3  # bump when the training recipe changes, so older caches are not reused


# ---------------------------------------------------------------------------------------------------------
# Examples


def fill_prompt(template: str, keywords: Any, tokens: str = "") -> str:
    """The prompt for an item's keywords (missing keywords give the template with an empty phrase).

    `tokens` (a user's preference tokens, or hint words) go where the template says {tokens}, else first.
    """
    phrase = "" if keywords is None or pd.isna(keywords) else str(keywords).strip()
    filled = template.replace(KEYWORDS, phrase)
    if TOKENS in filled:
        return filled.replace(TOKENS, tokens).strip()
    return (tokens + filled.strip()).strip()


def target_separator(cfg: WarmStartConfig) -> str:
    """What joins a prompt and its target text: a space after "keywords:", nothing after a chat prompt."""
    return "" if cfg.text_chat else " "


def chat_prompt(tokenizer: PreTrainedTokenizerBase, message: str, system: str = "") -> str:
    """`message` as the user turn of the tokenizer's chat template, ending where the assistant's answer starts.

    An empty `system` leaves the system turn to the template (some add a default one). When the template writes
    the BOS token and the tokenizer also adds it on encoding, the template's copy is dropped, so that encoding the
    prompt gives one BOS, not two.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DppmgError(
            f"stage2.warmstart.text_chat is true, but the text model's tokenizer ({type(tokenizer).__name__}) has "
            "no chat template; set text_chat=false or use an instruction model"
        )
    turns = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": message}
    ]
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


def text_warmstart_examples(
    items: pd.DataFrame,
    template: str = "{keywords}:",
    hint_copies: int = 0,
    hint_words: int = 3,
    seed: int = 0,
) -> list[tuple[str, str]]:
    """(prompt from the keywords, target = the item's text) for every item that has a text, in item order.

    With `hint_copies` > 0, each item also gets that many examples whose prompt starts with 1..`hint_words` words
    drawn from its own text ("farmhouse cotton clock:"). The LM then learns to carry words placed before the
    keywords into what it writes, and that is the slot the user's preference tokens occupy later: a soft
    token can only steer an LM that has learned to listen to what precedes the keywords.
    """
    rng = np.random.default_rng(seed)
    examples, hinted = [], []
    for keywords, text in zip(items["keywords"], items["text"], strict=True):
        if text is None or pd.isna(text) or not str(text).strip():
            continue
        prompt, target = fill_prompt(template, keywords), str(text).strip()
        examples.append((prompt, target))
        pool = _hint_pool(target, prompt)
        for _ in range(hint_copies if pool else 0):
            picked = rng.choice(
                pool, size=min(len(pool), int(rng.integers(1, hint_words + 1))), replace=False
            )
            hinted.append((fill_prompt(template, keywords, " ".join(picked) + " "), target))
    return examples + hinted


def _hint_pool(text: str, prompt: str) -> list[str]:
    """The words of `text` a hint may use: lowercased, without punctuation, longer than 3 letters, not in the prompt."""
    taken = set(_words(prompt))
    return sorted({w for w in _words(text) if len(w) > MIN_HINT_LETTERS and w not in taken})


def _words(text: str) -> list[str]:
    return [w.strip(".,;:!?\"'()").lower() for w in text.split()]


def image_warmstart_examples(
    ds: ProcessedDataset, template: str, shape: tuple[int, int], progress: bool
) -> tuple[list[str], np.ndarray]:
    """Prompts and uint8 [N, H, W, 3] images (`shape` = (H, W)) of the items that have an image."""
    rows = [i for i in range(ds.num_items) if ds.image_path(i) is not None]
    paths = [ds.image_path(i) for i in rows]
    missing = [p for p in paths if not p.is_file()]  # type: ignore[union-attr]
    if missing:
        raise DppmgError(f"{ds.root}: item image {missing[0]} is missing ({len(missing)} missing in all)")
    prompts = [fill_prompt(template, ds.items["keywords"].iat[i]) for i in rows]
    return prompts, load_image_array(paths, shape, progress=progress)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Text


def text_batch(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[str, str]],
    max_length: int,
    separator: str = " ",
    max_target_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels [B, T], right-padded; labels are -100 on the prompt and the padding.

    Prompt and target are tokenized separately, so the prompt's tokens are exactly those `generate_texts` feeds
    the model. The target is `separator` + text + EOS (a chat prompt ends where the answer starts, so it takes
    separator ""); a target longer than `max_target_tokens`, or too long for `max_length`, is cut (and then has
    no EOS).
    """
    rows = []
    for prompt, target in examples:
        prompt_ids = tokenizer(prompt)["input_ids"]
        target_ids = tokenizer(separator + target, add_special_tokens=False)["input_ids"]
        target_ids = (target_ids + [tokenizer.eos_token_id])[:max_target_tokens]
        room = max_length - len(prompt_ids)
        if room < 1:
            raise DppmgError(
                f"warm-start prompt {prompt!r} is {len(prompt_ids)} tokens, no room for a target within the "
                f"text generator's {max_length} positions"
            )
        rows.append((prompt_ids, target_ids[:room]))
    length = max(len(p) + len(t) for p, t in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, (prompt_ids, target_ids) in enumerate(rows):
        ids = prompt_ids + target_ids
        input_ids[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = 1
        labels[b, len(prompt_ids) : len(ids)] = torch.tensor(target_ids)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _max_positions(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    positions = getattr(lm.config, "max_position_embeddings", None) or getattr(lm.config, "n_positions", None)
    limit = (
        tokenizer.model_max_length if tokenizer.model_max_length < 1e9 else None
    )  # HF's "no limit" is ~1e30
    candidates = [int(x) for x in (positions, limit) if x]
    if not candidates:
        raise DppmgError(f"cannot tell how many positions the text generator {type(lm).__name__} has")
    return min(candidates)


def train_text_warmstart(
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[str, str]],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
    max_grad_norm: float = 1.0,
    warmup: float = 0.05,
    separator: str = " ",
) -> dict[str, float]:
    """Fine-tune the whole LM on (prompt, target) pairs; returns loss_first, loss_last, seconds, steps.

    Batches are drawn with replacement from a generator seeded by `seed`; the learning rate warms up over the
    `warmup` share of the steps, then decays to 0 on a cosine. The LM is left in eval mode.
    """
    if not examples:
        raise DppmgError("text warm-start needs at least one (prompt, target) example")
    device = next(lm.parameters()).device
    max_length = _max_positions(lm, tokenizer)
    params = list(lm.parameters())
    optimizer, schedule = _optimizer(params, lr, steps, warmup)
    rng = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    lm.train()
    for _ in tqdm(range(steps), desc="warm-start text", disable=not progress):
        picks = torch.randint(len(examples), (min(batch_size, len(examples)),), generator=rng).tolist()
        batch = text_batch(tokenizer, [examples[i] for i in picks], max_length, separator)
        loss = lm(**{k: v.to(device) for k, v in batch.items()}).loss  # HF shifts the labels by one
        losses.append(_step(optimizer, schedule, loss, params, max_grad_norm))
    lm.eval()
    return _summary(losses, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------
# Image


def diffusion_loss(
    pipe: StableDiffusionPipeline, prompts: Sequence[str], pixels: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The denoising loss of `pixels` [B, 3, H, W] in [-1, 1] given `prompts`, at uniformly drawn timesteps.

    Prompts are encoded the way `StableDiffusionPipeline.encode_prompt` does (padded to the tokenizer's maximum
    length, no attention mask unless the encoder asks for one), so training and sampling see the same states.
    """
    device = pipe.unet.device
    states = encode_prompts(pipe, prompts)  # [B, L, D]
    x0 = pixels.to(device)
    if pipe.vae is not None:  # real Stable Diffusion: diffuse the VAE's scaled latents, not the pixels
        with torch.no_grad():
            x0 = pipe.vae.encode(x0).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
    scheduler = pipe.scheduler
    noise = torch.randn(x0.shape, generator=generator).to(device)
    t = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=generator).to(device)
    noisy = scheduler.add_noise(x0, noise, t)
    prediction = pipe.unet(noisy, t, encoder_hidden_states=states).sample
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    elif kind == "sample":
        target = x0
    else:
        raise DppmgError(
            f"image warm-start supports prediction_type epsilon, v_prediction or sample, not {kind!r}"
        )
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


def train_image_warmstart(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    images: np.ndarray,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
    uncond_prob: float = 0.1,
    max_grad_norm: float = 1.0,
    warmup: float = 0.05,
    ema_decay: float = 0.0,
    captions: Sequence[str | None] | None = None,
    caption_prob: float = 0.0,
    train_text_encoder: bool = True,
) -> dict[str, float]:
    """Fine-tune the UNet (and the text encoder, if `train_text_encoder`) on uint8 [N, H, W, 3] images and their
    prompts. A trained text encoder (the scorer's, or a real pipeline's CLIP) is best left frozen, as in Stable
    Diffusion's own training: a few minutes of denoising gradients only blur what it knows about words.

    With `captions` (one per image, e.g. the item's text), a share `caption_prob` of the prompts is the caption
    instead: the model then learns to follow descriptive words (colours, patterns), not only the keywords.

    The learning rate warms up and decays as in `train_text_warmstart`. With `ema_decay` > 0 both models end
    up holding the exponential moving average of their weights rather than the last ones (the usual remedy for
    weights that still jitter at the end of a run; with the cosine decay to 0 they hardly do).
    Returns loss_first, loss_last (of the trained weights, not the average), seconds, steps. Both models are
    left in eval mode.
    """
    if len(prompts) != len(images) or len(images) == 0:
        raise DppmgError(
            f"image warm-start needs matching, non-empty prompts and images, got {len(prompts)} and {len(images)}"
        )
    height, width = image_shape(pipe)
    if images.shape[1:] != (height, width, 3):
        raise DppmgError(
            f"image warm-start images are {list(images.shape[1:])}, the pipeline makes [{height}, {width}, 3]"
        )
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, 3, H, W] in [-1, 1]
    pipe.text_encoder.requires_grad_(train_text_encoder)
    params = [*pipe.unet.parameters(), *(pipe.text_encoder.parameters() if train_text_encoder else [])]
    optimizer, schedule = _optimizer(params, lr, steps, warmup)
    # EMAModel ramps its decay up as (1 + t) / (10 + t) to ema_decay, so early, random weights fade quickly.
    ema = EMAModel(params, decay=ema_decay, foreach=True) if ema_decay > 0 else None
    rng = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    pipe.unet.train()
    pipe.text_encoder.train()
    for _ in tqdm(range(steps), desc="warm-start images", disable=not progress):
        picks = torch.randint(len(images), (min(batch_size, len(images)),), generator=rng)
        dropped = torch.rand(len(picks), generator=rng) < uncond_prob
        captioned = torch.rand(len(picks), generator=rng) < caption_prob
        batch_prompts = [
            "" if drop else _prompt_or_caption(prompts, captions, i, cap)
            for i, drop, cap in zip(picks.tolist(), dropped.tolist(), captioned.tolist(), strict=True)
        ]
        loss = diffusion_loss(pipe, batch_prompts, pixels[picks], rng)
        losses.append(_step(optimizer, schedule, loss, params, max_grad_norm))
        if ema is not None:
            ema.step(params)
    if ema is not None:
        ema.copy_to(params)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return _summary(losses, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------
# Shared training helpers


def _optimizer(
    params: list[torch.nn.Parameter], lr: float, steps: int, warmup: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW, with a linear warm-up over the `warmup` share of `steps` and then a cosine decay to 0.

    A few minutes of training is far from convergence, so the decay matters: the last steps at a small learning
    rate settle the weights instead of leaving them wherever the last large step threw them.
    """
    optimizer = torch.optim.AdamW(params, lr=lr)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, round(warmup * steps), max(steps, 1))


def guarded_step(
    loss: torch.Tensor,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float,
) -> bool:
    """Backward, clip and step: the NaN/inf guard every stage-2 optimizer step goes through.

    A non-finite loss or gradient norm applies nothing (the gradients are cleared) and returns False, so one bad
    batch cannot poison the weights; the caller counts and logs the skip.
    """
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss.detach()).all():
        return False
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


def _step(
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    loss: torch.Tensor,
    params: list[torch.nn.Parameter],
    max_grad_norm: float,
) -> float:
    """One warm-start step through `guarded_step`; returns the loss (non-finite when the step was skipped).

    The schedule advances either way, so a skipped step does not shift the rest of the run.
    """
    value = float(loss.detach())
    if not guarded_step(loss, params, optimizer, max_grad_norm):
        logger.warning("warm-start: skipped a step with a non-finite loss or gradient (loss %s)", value)
        value = float("nan")
    schedule.step()
    return value


def _summary(losses: list[float], seconds: float) -> dict[str, float]:
    finite = [x for x in losses if np.isfinite(x)]
    window = max(1, round(len(finite) * LOSS_WINDOW))
    nan = float("nan")
    return {
        "loss_first": float(np.mean(finite[:window])) if finite else nan,
        "loss_last": float(np.mean(finite[-window:])) if finite else nan,
        "seconds": seconds,
        "steps": len(losses),
    }


# ---------------------------------------------------------------------------------------------------------
# Cached warm-start


def warmstart_key(
    dataset_hash: str, gen_cfg: GeneratorConfig, ws_cfg: WarmStartConfig, seed: int, scorer_hash: str = ""
) -> str:
    """The cache folder name: the dataset hash and a hash of everything else that shapes the result (including
    the scorer's text tower, when the pipeline's text encoder is a copy of it)."""
    gen = {k: v for k, v in to_dict(gen_cfg).items() if k != "device"}  # where it trained changes nothing
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "generators": gen,
            "warmstart": to_dict(ws_cfg),
            "seed": seed,
            "scorer": scorer_hash,
        },
        sort_keys=True,
    )
    return f"{dataset_hash}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _dataset_hash(ds: ProcessedDataset) -> str:
    return str(ds.meta.get("content_hash") or content_hash(ds.items, ds.interactions, ds.users))


def _text_tower_hash(scorer: Scorer) -> str:
    """A short hash of the scorer's text-tower weights: a retrained scorer must not reuse an old warm-start."""
    digest = hashlib.sha256()
    for name, tensor in sorted(scorer.model.text_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _prompt_or_caption(
    prompts: Sequence[str], captions: Sequence[str | None] | None, i: int, use: bool
) -> str:
    caption = captions[i] if use and captions is not None else None
    return caption if isinstance(caption, str) and caption.strip() else prompts[i]


def _image_captions(ds: ProcessedDataset) -> list[str | None]:
    """The texts of the items that have an image, in `image_warmstart_examples`' order."""
    rows = [i for i in range(ds.num_items) if ds.image_path(i) is not None]
    texts = ds.items["text"]
    return [str(texts.iat[i]) if isinstance(texts.iat[i], str) else None for i in rows]


def _tokenizer_corpus(items: pd.DataFrame) -> list[str]:
    """Texts and keywords: what the tiny tokenizers must cover (prompts are keywords, targets are texts)."""
    values = pd.concat([items["text"], items["keywords"]], ignore_index=True)
    return [str(v) for v in values if v is not None and not pd.isna(v) and str(v).strip()]


def warm_start(
    ds: ProcessedDataset,
    gen_cfg: GeneratorConfig,
    ws_cfg: WarmStartConfig,
    cache_root: str | Path,
    seed: int,
    progress: bool = True,
    scorer: Scorer | None = None,
    model_cache: str | Path | None = None,
) -> Generators:
    """Generators built from `gen_cfg` and warm-started on `ds`'s items; cached under cache_root/<key>/.

    `scorer` is the dataset's scorer, needed when the tiny pipeline's text encoder comes from it
    (`gen_cfg.text_encoder_from_scorer`). `model_cache` is where GGUF text models keep their dequantized copy.
    A pretrained text model that the warm-start does not train (text_steps 0) is not copied into the cache: the
    cache names it, and a cached load loads it by name.

    The text part is skipped when no item has a text, the image part when no item has an image (or when the
    config gives it 0 steps). `info["warmstart"]` holds each part's loss and time.
    """
    dataset_hash = _dataset_hash(ds)
    from_scorer = gen_cfg.image_pipeline is None and gen_cfg.text_encoder_from_scorer
    if from_scorer and scorer is None:
        raise DppmgError(
            f"{ds.root}: stage2.generators.text_encoder_from_scorer needs the dataset's scorer ({ds.root}/scorer)"
        )
    scorer_hash = _text_tower_hash(scorer) if from_scorer and scorer is not None else ""
    folder = Path(cache_root) / warmstart_key(dataset_hash, gen_cfg, ws_cfg, seed, scorer_hash)
    if (folder / MANIFEST_FILE).is_file():
        logger.info("warm-started generators loaded from the cache %s", folder)
        return load_generators(folder, gen_cfg.device, model_cache, gen_cfg.dtype)

    corpus = _tokenizer_corpus(ds.items)
    if not corpus:
        raise DppmgError(
            f"{ds.root}: items have neither text nor keywords; nothing to warm-start the generators on"
        )
    gen = build_generators(gen_cfg, corpus, seed=seed, scorer=scorer, model_cache=model_cache)
    report: dict[str, Any] = {}
    examples = text_warmstart_examples(
        ds.items, ws_cfg.text_prompt, ws_cfg.text_hint_copies, ws_cfg.text_hint_words, seed
    )
    if ws_cfg.text_chat:
        examples = [(chat_prompt(gen.lm_tokenizer, p, ws_cfg.text_system), t) for p, t in examples]
    if examples and ws_cfg.text_steps > 0:
        report["text"] = train_text_warmstart(
            gen.lm, gen.lm_tokenizer, examples, ws_cfg.text_steps, ws_cfg.batch_size, ws_cfg.lr_text, seed,
            progress, max_grad_norm=ws_cfg.max_grad_norm, warmup=ws_cfg.warmup, separator=target_separator(ws_cfg),
        )  # fmt: skip
        logger.info("warm-start text: loss %.3f → %.3f in %.0f s", *_loss_line(report["text"]))
    has_images = ds.items["image"].notna().any()
    if has_images and ws_cfg.image_steps > 0:
        report["image"] = warm_start_images(gen, ds, gen_cfg, ws_cfg, seed, progress)
        logger.info("warm-start images: loss %.3f → %.3f in %.0f s", *_loss_line(report["image"]))
    gen.info.update(dataset_hash=dataset_hash, warmstart=report)
    untouched = gen_cfg.text_model if gen_cfg.text_model is not None and "text" not in report else None
    save_generators(gen, folder, text_source=untouched)  # atomic: staging folder, then one rename
    logger.info("warm-started generators cached in %s", folder)
    return gen


def warm_start_images(
    gen: Generators,
    ds: ProcessedDataset,
    gen_cfg: GeneratorConfig,
    ws_cfg: WarmStartConfig,
    seed: int,
    progress: bool = True,
) -> dict[str, float]:
    """The image part of `warm_start` (no cache): train `gen.pipe` on `ds`'s item images as `ws_cfg` says.

    The text encoder trains only when it was built untrained here; the scorer's copy and a real pipeline's CLIP
    stay frozen. Returns `train_image_warmstart`'s statistics.
    """
    prompts, images = image_warmstart_examples(ds, ws_cfg.image_prompt, image_shape(gen.pipe), progress)
    return train_image_warmstart(
        gen.pipe, prompts, images, ws_cfg.image_steps, ws_cfg.batch_size, ws_cfg.lr_image, seed, progress,
        uncond_prob=ws_cfg.uncond_prob, max_grad_norm=ws_cfg.max_grad_norm, warmup=ws_cfg.warmup,
        ema_decay=ws_cfg.ema_decay, captions=_image_captions(ds), caption_prob=ws_cfg.image_caption_prob,
        train_text_encoder=gen_cfg.image_pipeline is None and not gen_cfg.text_encoder_from_scorer,
    )  # fmt: skip


def _loss_line(stats: dict[str, float]) -> tuple[float, float, float]:
    return stats["loss_first"], stats["loss_last"], stats["seconds"]
