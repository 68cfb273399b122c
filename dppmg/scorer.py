"""The CLIP-style scorer: a text tower and an image tower that embed into one space.

It gives stage 1 its image item features (the image tower's projected embeddings), and stage 2 its
rewards and metrics (text–image consistency, image–image and text–text similarity). Two ways to get one:

- `ScorerConfig.pretrained` names a `CLIPModel` (hub id or local folder). It is used as it is:
  `build_scorer` only reports its retrieval on the held-out items.
- Otherwise a tiny `CLIPModel` is built from the config, with a word-level tokenizer over the dataset's
  own texts, and trained contrastively on the dataset's (text, image) pairs (`train_scorer`).

Either way the scorer is saved as a plain Hugging Face folder (`save_pretrained` of model and tokenizer)
plus `scorer.json` with the image preprocessing, so `Scorer.load` reads back exactly what was saved.

Pooling of the text tower (transformers 5.x `CLIPTextModel`): with `eos_token_id == 2` it takes the
position of the largest token id (the original CLIP vocabulary puts end-of-text last); with any other
`eos_token_id` it takes the first position holding that id. The tiny tokenizer therefore puts [EOS] at id
3, and the config's pad/bos/eos ids are set from the tokenizer. The text tower is causal, so padding and
anything after [EOS] cannot change the pooled state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import cached_file

from dppmg.config import ScorerConfig
from dppmg.data.imageio import as_pixels01
from dppmg.device import resolve_device
from dppmg.errors import DppmgError
from dppmg.io import commit_dir, read_json, staging_dir, write_json

SCORER_FILE = "scorer.json"
# transformers.image_utils.OPENAI_CLIP_MEAN / _STD: what CLIP checkpoints expect when their folder has no
# preprocessor_config.json; the tiny scorer uses them too so both kinds share one preprocessing path.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0..3; EOS != 2 keeps CLIP's "first EOS" pooling (see above)
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps its temperature so that logits stay within ±100
WEIGHT_DECAY = 0.05
WARMUP_FRACTION = 0.05  # share of steps with linear warm-up: the usual guard for transformers at lr ~1e-3
MAX_SHIFT_PX = 2  # augmentation: random translation of up to this many pixels, edges replicated
RETRIEVAL_KS = (1, 5)
RESIZE_MODES = ("crop", "squash")
RANK_CHUNK = 1024  # texts per similarity block in evaluate_retrieval


def clean_texts(texts: Iterable[Any]) -> list[str]:
    """Texts as a list of str; None, NaN and pd.NA (missing values) become "" so every item gets a vector."""
    return [t if isinstance(t, str) else "" if t is None or pd.isna(t) else str(t) for t in texts]


# --------------------------------------------------------------------------------------------------
# The scorer


class Scorer:
    """A CLIP-style dual encoder with its tokenizer and image preprocessing.

    Args:
        model: the `CLIPModel`.
        tokenizer: its tokenizer (pads on the right; every sequence ends with the EOS the model pools at).
        image_size: side of the square the image tower takes; inputs are resized to it.
        image_mean, image_std: per-channel normalisation applied to pixels in [0, 1].
        max_text_length: tokens per text (the text tower's position embeddings).
        kind: "tiny" (built and trained here) or "pretrained:<name>".
        resize: how an image that is not square reaches the square: "crop" (CLIP's: shorter side to S, centre
            crop) or "squash" (resized to S×S whole, aspect not kept: the tiny scorer's, so that a 2:3 poster's
            top and bottom, where titles sit, count too; it is also how `load_image_array` reads catalogues).
    Embeddings are [N, P] with P = `model.config.projection_dim`, rows L2-normalised, on the model's device.
    """

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        image_size: int,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        max_text_length: int = 77,
        kind: str = "tiny",
        resize: str = "crop",
    ):
        if resize not in RESIZE_MODES:
            raise DppmgError(f"scorer resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.resize = resize
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.max_text_length = int(max_text_length)
        self.kind = kind

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return (
            f"Scorer(kind={self.kind!r}, image_size={self.image_size}, dim={self.dim}, "
            f"max_text_length={self.max_text_length}, parameters={n:,})"
        )

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Scorer:
        self.model.to(resolve_device(device))
        return self

    # -- text ------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str | None]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask, (N, T) with T ≤ max_text_length, on the model's device."""
        batch = self.tokenizer(
            clean_texts(texts),
            padding=True,
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        return {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
        }

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T) token ids → (N, P) normalised embeddings; differentiable."""
        emb = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(emb, dim=-1)

    @torch.inference_mode()
    def encode_text(
        self, texts: Sequence[str | None], batch_size: int = 256, progress: bool = False
    ) -> torch.Tensor:
        """(N, P) normalised text embeddings. None/NaN texts are encoded as ""."""
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.dim, device=self.device)
        starts = _batches(len(texts), batch_size, "scorer: texts", progress)
        return torch.cat([self.text_features(**self.tokenize(texts[i : i + batch_size])) for i in starts])

    # -- images ----------------------------------------------------------------------------------

    def pixels01(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1] → float (N, 3, H, W) in [0, 1] on the model's device."""
        return as_pixels01(images, self.device)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """float (N, 3, H, W) in [0, 1] → (N, 3, S, S) normalised for the image tower; differentiable.

        Like `CLIPImageProcessor`: resize the shorter side to S (bicubic, antialiased), centre-crop S×S,
        normalise with the mean and std; with resize="squash", resize to S×S directly. Square inputs are simply
        resized either way.
        """
        s = self.image_size
        h, w = pixels.shape[-2:]
        if self.resize == "squash" and (h, w) != (s, s):
            pixels = F.interpolate(pixels, size=(s, s), mode="bicubic", antialias=True, align_corners=False)
            pixels = pixels.clamp(0.0, 1.0)
        elif (h, w) != (s, s):
            scale = s / min(h, w)
            size = (max(s, round(h * scale)), max(s, round(w * scale)))
            pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False)
            top, left = (size[0] - s) // 2, (size[1] - s) // 2
            pixels = pixels[..., top : top + s, left : left + s].clamp(0.0, 1.0)
        mean = pixels.new_tensor(self.image_mean).view(1, 3, 1, 1)
        std = pixels.new_tensor(self.image_std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """float (N, 3, H, W) in [0, 1], any H, W → (N, P) normalised embeddings; differentiable (stage 2)."""
        emb = self.model.get_image_features(pixel_values=self.preprocess(pixels)).pooler_output
        return F.normalize(emb, dim=-1)

    @torch.inference_mode()
    def encode_images(
        self, images: np.ndarray | torch.Tensor, batch_size: int = 256, progress: bool = False
    ) -> torch.Tensor:
        """uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1] → (N, P) normalised image embeddings."""
        if len(images) == 0:
            return torch.zeros(0, self.dim, device=self.device)
        # Batches are converted one at a time, so a large uint8 catalogue never exists as float in memory.
        starts = _batches(len(images), batch_size, "scorer: images", progress)
        return torch.cat([self.image_features(self.pixels01(images[i : i + batch_size])) for i in starts])

    # -- similarity ------------------------------------------------------------------------------

    @staticmethod
    def similarity(text_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of paired rows, (N, P) × (N, P) → (N,). Works for any two kinds of embedding."""
        return (F.normalize(text_emb, dim=-1) * F.normalize(image_emb, dim=-1)).sum(-1)

    # -- persistence -----------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """A Hugging Face folder (model + tokenizer) plus scorer.json; written atomically as a whole."""
        tmp = staging_dir(folder)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        write_json(
            tmp / SCORER_FILE,
            {
                "kind": self.kind,
                "image_size": self.image_size,
                "image_mean": list(self.image_mean),
                "image_std": list(self.image_std),
                "max_text_length": self.max_text_length,
                "resize": self.resize,
            },
        )
        commit_dir(tmp, folder)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> Scorer:
        """A scorer saved by `save` (or any CLIP folder; then preprocessing comes from its own files)."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise DppmgError(
                f"no scorer in {folder}: expected a folder written by Scorer.save (config.json missing)"
            )
        return cls.from_pretrained(str(folder), device=device)

    @classmethod
    def from_pretrained(cls, name: str, device: str | torch.device = "cpu") -> Scorer:
        """A `CLIPModel` and its tokenizer from a hub id or a local folder."""
        try:
            model = CLIPModel.from_pretrained(name)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise DppmgError(
                f"scorer {name!r} could not be loaded: it needs a CLIPModel and its tokenizer in a local folder, "
                "the Hugging Face cache, or a reachable hub (nothing is downloaded when HF_HUB_OFFLINE=1 or the "
                f"network is down). Cause: {str(e).strip().splitlines()[0]}"
            ) from None
        settings = _scorer_settings(name, model)
        return cls(model, tokenizer, **settings).to(device)


def _batches(n: int, batch_size: int, desc: str, progress: bool) -> Iterable[int]:
    return tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress, leave=False)


def _scorer_settings(name: str, model: CLIPModel) -> dict[str, Any]:
    """image_size / mean / std / max_text_length / kind: from scorer.json, else from the CLIP processor files."""
    path = Path(name) / SCORER_FILE
    if path.is_file():
        saved = read_json(path)
        keys = ("image_size", "image_mean", "image_std", "max_text_length", "kind", "resize")
        return {k: saved[k] for k in keys if k in saved}
    settings: dict[str, Any] = {
        "image_size": model.config.vision_config.image_size,
        "max_text_length": model.config.text_config.max_position_embeddings,
        "kind": f"pretrained:{name}",
    }
    proc_file = cached_file(name, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    if proc_file is not None:
        proc = read_json(proc_file)
        crop = proc.get("crop_size")
        if isinstance(crop, dict) and "height" in crop:
            settings["image_size"] = crop["height"]
        elif isinstance(crop, int):
            settings["image_size"] = crop
        settings["image_mean"] = proc.get("image_mean", CLIP_MEAN)
        settings["image_std"] = proc.get("image_std", CLIP_STD)
    return settings


# --------------------------------------------------------------------------------------------------
# Building the tiny default


def build_tokenizer(texts: Sequence[str], max_vocab: int, max_length: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `texts`: lower-cased, split at spaces and punctuation, the `max_vocab`
    most frequent words plus [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3; every text becomes [BOS] words [EOS]."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    trainer = trainers.WordLevelTrainer(
        vocab_size=max_vocab + len(SPECIAL_TOKENS), special_tokens=list(SPECIAL_TOKENS)
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))]
    )
    return wrap_tokenizer(tok, max_length)


def wrap_tokenizer(tok: Tokenizer, max_length: int, **kwargs: Any) -> PreTrainedTokenizerFast:
    """A `tokenizers` model with the project's special tokens as a transformers tokenizer (right padding)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
        padding_side="right",
        **kwargs,
    )


def build_tiny_clip(cfg: ScorerConfig, tokenizer: PreTrainedTokenizerBase) -> CLIPModel:
    """A small `CLIPModel` from the config; its special token ids are the tokenizer's (pooling depends on EOS)."""
    common = {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": 4 * cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "projection_dim": cfg.projection_dim,
    }
    text = {
        **common,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": cfg.max_text_length,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision = {**common, "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": 3}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim))


def build_tiny_scorer(cfg: ScorerConfig, texts: Sequence[str]) -> Scorer:
    """An untrained tiny scorer whose vocabulary comes from `texts`."""
    tokenizer = build_tokenizer(texts, cfg.max_vocab, cfg.max_text_length)
    model = build_tiny_clip(cfg, tokenizer)
    return Scorer(
        model,
        tokenizer,
        image_size=cfg.image_size,
        max_text_length=cfg.max_text_length,
        kind="tiny",
        resize="squash",
    )


# --------------------------------------------------------------------------------------------------
# Training and evaluation


@dataclass
class TrainResult:
    """What a contrastive training run did: mean loss per epoch, optimizer steps, wall time."""

    epoch_losses: list[float]
    steps: int
    seconds: float


def contrastive_loss(
    text_emb: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of pairs: (B, P), (B, P) normalised, scalar log-scale → scalar.

    Row i of each is a positive pair; every other row in the batch is a negative.
    """
    logits = logit_scale.exp() * text_emb @ image_emb.T  # (B, B): text i vs image j
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def random_shift(pixels: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of (B, C, H, W) by its own random (dy, dx) in [-max_shift, max_shift]."""
    if max_shift <= 0:
        return pixels
    b, c, h, w = pixels.shape
    padded = F.pad(pixels, (max_shift,) * 4, mode="replicate")  # (B, C, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).to(pixels.device)
    rows = (dy[:, None] + torch.arange(h, device=pixels.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=pixels.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=pixels.device)[:, None, None, None]
    chan = torch.arange(c, device=pixels.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def heldout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, held-out) item indices, both sorted; at least one held-out and two training items."""
    n_heldout = max(1, round(n * fraction))
    if n - n_heldout < 2:
        raise DppmgError(
            f"the scorer needs at least 2 training pairs after holding out {n_heldout} of {n} items "
            "(features.scorer.heldout_fraction); the dataset has too few items with both text and image"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_heldout:]), np.sort(perm[:n_heldout])


def fit_contrastive(
    scorer: Scorer,
    texts: Sequence[str],
    images: np.ndarray,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
) -> TrainResult:
    """Train all of the scorer's parameters on the (texts[i], images[i]) pairs with symmetric InfoNCE.

    AdamW with linear warm-up then cosine decay; the learnable temperature is clamped as in CLIP and is
    not weight-decayed. Images get a random shift of up to MAX_SHIFT_PX pixels.
    """
    n = len(texts)
    model = scorer.model
    gen = torch.Generator().manual_seed(seed)
    tokens = scorer.tokenize(texts)  # (N, T) once; each batch is trimmed to its own longest text
    batch_size = min(batch_size, n)
    n_batches = math.ceil(n / batch_size)
    total_steps = max(1, epochs * n_batches)

    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and name != "logit_scale"]
    no_decay = [p for name, p in model.named_parameters() if p.ndim < 2 or name == "logit_scale"]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    warmup = max(1, round(WARMUP_FRACTION * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _warmup_cosine(s, warmup, total_steps))

    model.train()
    epoch_losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc="train scorer", unit="epoch", disable=not progress, leave=False)
    for _ in bar:
        losses = []
        # Equal-size batches (tensor_split), so no batch is a lone pair with a trivial loss.
        for idx in torch.randperm(n, generator=gen).tensor_split(n_batches):
            ids, mask = tokens["input_ids"][idx], tokens["attention_mask"][idx]
            length = int(mask.sum(1).max())
            pixels = random_shift(scorer.pixels01(images[idx.numpy()]), MAX_SHIFT_PX, gen)
            loss = contrastive_loss(
                scorer.text_features(ids[:, :length], mask[:, :length]),
                scorer.image_features(pixels),
                model.logit_scale,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
            losses.append(loss.item())
        epoch_losses.append(float(np.mean(losses)))
        bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
    model.eval()
    return TrainResult(epoch_losses, steps=epochs * n_batches, seconds=time.perf_counter() - start)


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def evaluate_retrieval(
    scorer: Scorer, texts: Sequence[str], images: np.ndarray, ks: Sequence[int] = RETRIEVAL_KS
) -> dict[str, Any]:
    """Text → image retrieval among the given pairs: recall@k (image i in text i's top k) and chance k/n."""
    was_training = scorer.model.training
    scorer.model.eval()
    try:
        text_emb, image_emb = scorer.encode_text(texts), scorer.encode_images(images)  # (N, P) each
    finally:
        scorer.model.train(was_training)
    n = len(text_emb)
    positive = (text_emb * image_emb).sum(-1)  # (N,) score of each text's own image
    # Rank of the true image = number of images scored strictly higher (ties count in the text's favour);
    # in row chunks so that a large held-out set never needs the full (N, N) matrix.
    rank = torch.cat(
        [
            (text_emb[i : i + RANK_CHUNK] @ image_emb.T > positive[i : i + RANK_CHUNK, None]).sum(1)
            for i in range(0, n, RANK_CHUNK)
        ]
    )
    out: dict[str, Any] = {"n": n}
    for k in ks:
        out[f"recall@{k}"] = float((rank < k).float().mean())
        out[f"chance@{k}"] = min(k, n) / n
    return out


def train_scorer(
    texts: Sequence[str],
    images: np.ndarray,
    cfg: ScorerConfig,
    seed: int,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[Scorer, dict[str, Any]]:
    """Train a scorer on the dataset's pairs; report retrieval on a seeded held-out share of them.

    Args:
        texts: N item texts. images: uint8 (N, H, W, 3), row i ↔ texts[i], any size (resized).
    With `cfg.pretrained` unset, a tiny scorer is built (vocabulary from the training texts only, so
    held-out words are [UNK] rather than untrained rows) and trained from scratch; with it set, the
    pretrained CLIP is fine-tuned. The pipeline calls `build_scorer`, which does not fine-tune.
    Returns the scorer (in eval mode) and a report: kind, n_train, n_heldout, epochs, steps, seconds,
    loss_initial / loss_final (mean of the first / last epoch), recall@1/5 and chance@1/5 on held-out items.
    """
    texts, images = _check_pairs(texts, images)
    train_idx, heldout_idx = heldout_split(len(texts), cfg.heldout_fraction, seed)
    train_texts = [texts[i] for i in train_idx]
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        scorer = (
            Scorer.from_pretrained(cfg.pretrained) if cfg.pretrained else build_tiny_scorer(cfg, train_texts)
        )
    scorer.to(resolve_device(device))
    result = fit_contrastive(
        scorer, train_texts, images[train_idx], cfg.epochs, cfg.batch_size, cfg.lr, seed, progress
    )
    report = {
        "kind": scorer.kind,
        "n_train": len(train_idx),
        "n_heldout": len(heldout_idx),
        "epochs": cfg.epochs,
        "steps": result.steps,
        "seconds": round(result.seconds, 2),
        "loss_initial": result.epoch_losses[0] if result.epoch_losses else None,
        "loss_final": result.epoch_losses[-1] if result.epoch_losses else None,
    }
    report.update(_heldout_report(scorer, texts, images, heldout_idx))
    return scorer, report


def build_scorer(
    cfg: ScorerConfig,
    texts: Sequence[str],
    images: np.ndarray,
    seed: int,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[Scorer, dict[str, Any]]:
    """The pipeline's entry point: a pretrained scorer as it is, or a tiny one trained by `train_scorer`.

    Both report retrieval on the same seeded held-out split, so the two kinds can be compared.
    """
    if not cfg.pretrained:
        return train_scorer(texts, images, cfg, seed, progress, device)
    texts, images = _check_pairs(texts, images)
    _, heldout_idx = heldout_split(len(texts), cfg.heldout_fraction, seed)
    scorer = Scorer.from_pretrained(cfg.pretrained, device=resolve_device(device))
    report = {
        "kind": scorer.kind,
        "n_train": 0,
        "n_heldout": len(heldout_idx),
        "epochs": 0,
        "steps": 0,
        "seconds": 0.0,
    }
    report.update(_heldout_report(scorer, texts, images, heldout_idx))
    return scorer, report


def _heldout_report(
    scorer: Scorer, texts: list[str], images: np.ndarray, heldout_idx: np.ndarray
) -> dict[str, Any]:
    retrieval = evaluate_retrieval(scorer, [texts[i] for i in heldout_idx], images[heldout_idx])
    retrieval.pop("n")
    return retrieval


def _check_pairs(texts: Sequence[str], images: np.ndarray) -> tuple[list[str], np.ndarray]:
    texts = clean_texts(texts)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DppmgError(f"scorer images must be uint8 (N, H, W, 3); got {images.dtype} {images.shape}")
    if len(texts) != len(images):
        raise DppmgError(f"scorer needs one text per image: {len(texts)} texts, {len(images)} images")
    return texts, images
