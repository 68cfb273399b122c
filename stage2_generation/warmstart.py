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
on the same data loads it instead of training again. The prompt templates are in `prompts.py`, and the losses and
optimizer steps it shares with the grounding and the RL in `training.py`.
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
    image_shape,
    load_generators,
    save_generators,
)
from stage2_generation.prompts import chat_prompt, fill_prompt, target_separator
from stage2_generation.training import (
    diffusion_loss,
    loss_summary,
    make_optimizer,
    max_positions,
    scheduled_step,
    text_batch,
)

MIN_HINT_LETTERS = 3  # shorter words ("a", "the", "for") carry no preference
CACHE_VERSION = 3  # bump when the training recipe changes, so older caches are not reused


# ---------------------------------------------------------------------------------------------------------
# Examples


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
    max_length = max_positions(lm, tokenizer)
    params = list(lm.parameters())
    optimizer, schedule = make_optimizer(params, lr, steps, warmup)
    rng = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    lm.train()
    for _ in tqdm(range(steps), desc="warm-start text", disable=not progress):
        picks = torch.randint(len(examples), (min(batch_size, len(examples)),), generator=rng).tolist()
        batch = text_batch(tokenizer, [examples[i] for i in picks], max_length, separator)
        loss = lm(**{k: v.to(device) for k, v in batch.items()}).loss  # HF shifts the labels by one
        losses.append(scheduled_step(optimizer, schedule, loss, params, max_grad_norm, "warm-start"))
    lm.eval()
    return loss_summary(losses, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------
# Image


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
    optimizer, schedule = make_optimizer(params, lr, steps, warmup)
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
        losses.append(scheduled_step(optimizer, schedule, loss, params, max_grad_norm, "warm-start"))
        if ema is not None:
            ema.step(params)
    if ema is not None:
        ema.copy_to(params)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return loss_summary(losses, time.perf_counter() - start)


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


def tokenizer_corpus(items: pd.DataFrame) -> list[str]:
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
        gen = load_generators(folder, gen_cfg.device, model_cache, gen_cfg.dtype)
        gen.info["folder"] = str(folder)  # the base models, for exports (stage2_generation/export.py)
        return gen

    corpus = tokenizer_corpus(ds.items)
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
    gen.info["folder"] = str(folder)
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
