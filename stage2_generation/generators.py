"""Stage 2's generators: a causal LM for text and a Stable-Diffusion-style pipeline for images.

Two ways to get each, chosen by `GeneratorConfig`:

- A name (hub id or local folder) loads a pretrained model with `from_pretrained`, exactly as transformers and
  diffusers do: `AutoModelForCausalLM` + `AutoTokenizer`, and `StableDiffusionPipeline`.
- None builds a tiny, untrained one from the config's sizes, with its own tokenizer over the dataset's texts
  (warm-starting it on the items is the caller's job). `save_generators` writes them as ordinary Hugging Face
  folders, so `load_generators` reads them back through the same `from_pretrained` code as a real model.

The tiny image pipeline works in pixel space: at 32 px a VAE would only blur (REFERENCE.md), so the UNet takes
and returns RGB images in [-1, 1] and the pipeline has `vae=None`. diffusers 0.42 supports that with two
adjustments, made by `_prepare_pipeline` after building and after every load:

- `StableDiffusionPipeline.__init__` sets `vae_scale_factor = 8` when there is no VAE; the latents' shape is
  (height / vae_scale_factor, width / vae_scale_factor), so it must be 1 (and the image processor built with 1).
- `__call__` decodes with the VAE unless `output_type="latent"`. With that output type the pipeline returns
  the final denoised sample, which here *is* the image in [-1, 1]; `generate_images` converts it to uint8.
  A pipeline with a VAE takes the usual `output_type="np"` path, so real Stable Diffusion works unchanged.

Clipping: in pixel space the data lives in [-1, 1], so the tiny DDIM scheduler clips each step's predicted x0
to that range (`GeneratorConfig.clip_sample`), as DDPM/DDIM do for images. It cannot say so with the scheduler's
own `clip_sample`, because `StableDiffusionPipeline.__init__` resets that to False (with a deprecation
warning) on every construction and load. It uses `thresholding=True, sample_max_value=1.0` instead: the dynamic
threshold is clamped to [1, sample_max_value] = 1, so `DDIMScheduler._threshold_sample` is exactly
`x0.clamp(-1, 1)`. Code that re-derives a DDIM step (DDPO's log-probability) must clip the same way whenever
`scheduler.config.thresholding` is set. Stable Diffusion itself clips nothing (latents are unbounded).

The tiny tokenizers: the LM gets a byte-level BPE (any text round-trips exactly, so generated descriptions are
plain strings); the CLIP text encoder gets the scorer's word-level tokenizer (prompts are short keyword
phrases; each word is one token). Both reserve [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3: EOS is not 2, which keeps
`CLIPTextModel`'s pooling at the first EOS (see dppmg/scorer.py).
"""

from __future__ import annotations

import copy
import math
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import logging as diffusers_logging
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    GPT2Config,
    GPT2LMHeadModel,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dppmg.config import GeneratorConfig
from dppmg.device import resolve_device, sampling_autocast
from dppmg.errors import DppmgError
from dppmg.io import commit_dir, read_json, staging_dir, write_json
from dppmg.models import HUB_ID, load_causal_lm
from dppmg.scorer import BOS, SPECIAL_TOKENS, UNK, Scorer, build_tokenizer, clean_texts, wrap_tokenizer
from stage2_generation.injection import HOLDER_NAME

TEXT_DIR = "text"  # inside a generators folder: the LM and its tokenizer (save_pretrained)
IMAGE_DIR = "image"  # the diffusers pipeline (save_pretrained)
MANIFEST_FILE = "generators.json"
FORMAT_VERSION = 1
MAX_NORM_GROUPS = 32  # GroupNorm groups in the UNet (diffusers' default), fewer when the channels need it
TINY = "tiny"
TEXT_STREAM = 1  # sample_seed's key for texts, so that text i and image i draw from unrelated streams


# ---------------------------------------------------------------------------------------------------------
# The pair of generators


@dataclass(repr=False)
class Generators:
    """A text generator and an image generator.

    Args:
        lm: a causal LM (`generate`, `forward(labels=...)`).
        lm_tokenizer: its tokenizer; pads on the right by default (`generate_texts` pads on the left).
        pipe: a `StableDiffusionPipeline` (text encoder + tokenizer, UNet, scheduler, optional VAE).
        info: where they came from ({"text": name or "tiny", "image": ..., "seed": ...}, plus anything the
            caller adds, e.g. the dataset hash of a warm-start); saved with them.
    """

    lm: PreTrainedModel
    lm_tokenizer: PreTrainedTokenizerBase
    pipe: StableDiffusionPipeline
    info: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        lm = sum(p.numel() for p in self.lm.parameters())
        unet = sum(p.numel() for p in self.pipe.unet.parameters())
        encoder = sum(p.numel() for p in self.pipe.text_encoder.parameters())
        return (
            f"Generators(lm={type(self.lm).__name__}[{lm:,}], unet={unet:,}, text_encoder={encoder:,}, "
            f"image_shape={image_shape(self.pipe)}, info={self.info})"
        )

    def to(self, device: str | torch.device) -> Generators:
        device = resolve_device(device)
        self.lm.to(device)
        self.pipe.to(device)
        return self


def build_generators(
    cfg: GeneratorConfig,
    texts: Sequence[str],
    seed: int,
    image_texts: Sequence[str] | None = None,
    scorer: Scorer | None = None,
    model_cache: str | Path | None = None,
) -> Generators:
    """The generators the config names, loaded; or tiny ones built over `texts` (deterministic for a seed).

    Args:
        texts: the corpus of the tiny LM's tokenizer (e.g. the items' texts and keywords).
        image_texts: the corpus of the tiny text encoder's tokenizer; default `texts`.
        scorer: the dataset's scorer, whose text tower (a copy) becomes the tiny pipeline's text encoder when
            `cfg.text_encoder_from_scorer` is set; required then.
        model_cache: where GGUF text models keep their dequantized copy (dppmg/models.py).
    """
    if cfg.text_model is not None:
        lm, tokenizer = load_text_generator(cfg.text_model, cache_dir=model_cache, dtype=cfg.dtype)
    else:
        tokenizer = build_text_tokenizer(texts, cfg.text_vocab, cfg.text_max_length)
        lm = build_tiny_lm(tokenizer, cfg, seed=seed)
    if cfg.image_pipeline is not None:
        pipe = load_image_pipeline(cfg.image_pipeline)
    else:
        tower = None
        if cfg.text_encoder_from_scorer:
            if scorer is None:
                raise DppmgError(
                    "stage2.generators.text_encoder_from_scorer is true but no scorer was given: the tiny "
                    "image pipeline takes its text encoder from the dataset's scorer (or set it to false)"
                )
            tower = scorer_text_tower(scorer)
        pipe = build_tiny_image_pipeline(
            texts if image_texts is None else image_texts, cfg, seed=seed, text_tower=tower
        )
    info = {"text": cfg.text_model or TINY, "image": cfg.image_pipeline or TINY, "seed": seed}
    return Generators(lm, tokenizer, pipe, info).to(cfg.device)


# ---------------------------------------------------------------------------------------------------------
# Tiny text generator


def build_text_tokenizer(texts: Sequence[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE over `texts` with [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3; encoding prepends [BOS].

    Byte-level, so every string round-trips: `decode(encode(x), skip_special_tokens=True) == x`. The vocabulary
    holds at least the 256 bytes and the 4 special tokens, whatever `vocab_size` says. [EOS] is not added: a
    prompt must not end the text, and training code appends `eos_token` to its targets.
    """
    corpus = [t for t in clean_texts(texts) if t]
    if not corpus:
        raise DppmgError("the tiny text generator's tokenizer needs a non-empty list of texts to learn from")
    tok = Tokenizer(models.BPE(unk_token=UNK))  # byte-level never meets an unknown symbol; UNK is for the API
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos)]
    )
    # clean_up_tokenization_spaces would turn "word ." into "word." and break the round trip.
    return wrap_tokenizer(tok, max_length, clean_up_tokenization_spaces=False)


def build_tiny_lm(tokenizer: PreTrainedTokenizerBase, cfg: GeneratorConfig, seed: int = 0) -> GPT2LMHeadModel:
    """An untrained GPT-2 sized by the config, over `tokenizer`'s vocabulary and special ids."""
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.text_max_length,
        n_embd=cfg.text_dim,
        n_layer=cfg.text_layers,
        n_head=cfg.text_heads,
        **ids,
    )
    with _seeded(seed):
        model = GPT2LMHeadModel(config)
    for key, value in ids.items():
        setattr(model.generation_config, key, value)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Tiny image generator


def scorer_text_tower(scorer: Scorer) -> tuple[CLIPTextModel, PreTrainedTokenizerBase]:
    """A copy of the scorer's text tower as a `CLIPTextModel`, and a copy of its tokenizer.

    Copies, because injecting preference tokens resizes the encoder and extends the tokenizer, and the scorer
    itself must stay as it is: it computes the rewards.
    """
    encoder = CLIPTextModel(scorer.model.config.text_config)
    encoder.load_state_dict(scorer.model.text_model.state_dict())
    return encoder.eval(), copy.deepcopy(scorer.tokenizer)


def build_tiny_image_pipeline(
    texts: Sequence[str],
    cfg: GeneratorConfig,
    seed: int = 0,
    text_tower: tuple[CLIPTextModel, PreTrainedTokenizerBase] | None = None,
) -> StableDiffusionPipeline:
    """An untrained pixel-space Stable-Diffusion pipeline (no VAE) sized by the config; see the module docstring.

    Its text encoder is `text_tower` (an encoder and its tokenizer, e.g. `scorer_text_tower`'s: trained
    already, as Stable Diffusion takes CLIP's), or else a new `CLIPTextModel` over a word-level tokenizer of
    `texts`. The UNet attends to the encoder's hidden states in its middle block and at the config's
    lowest-resolution levels, and with `unet_text_time_embedding` also adds a pooled summary of them to its
    time embedding.
    """
    if text_tower is not None:
        text_encoder, tokenizer = text_tower
        width = text_encoder.config.hidden_size
        if cfg.unet_text_time_embedding and width % cfg.unet_text_time_heads:
            raise DppmgError(
                f"stage2.generators.unet_text_time_heads ({cfg.unet_text_time_heads}) must divide the text "
                f"encoder's width ({width}, the scorer's text hidden size)"
            )
        with _seeded(seed):
            unet = _tiny_unet(cfg, width)
    else:
        corpus = [t for t in clean_texts(texts) if t]
        if not corpus:
            raise DppmgError(
                "the tiny image generator's tokenizer needs a non-empty list of texts to learn from"
            )
        tokenizer = build_tokenizer(corpus, cfg.text_encoder_vocab, cfg.text_encoder_max_length)
        with _seeded(seed):
            text_encoder = CLIPTextModel(_text_encoder_config(tokenizer, cfg))
            unet = _tiny_unet(cfg, cfg.text_encoder_dim)
    scheduler = DDIMScheduler(
        num_train_timesteps=cfg.scheduler_steps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        # Clipping x0 to [-1, 1] by way of thresholding, since StableDiffusionPipeline resets clip_sample
        # (module docstring). With sample_max_value = 1 the "dynamic" threshold is always 1: plain clipping.
        clip_sample=False,
        thresholding=cfg.clip_sample,
        sample_max_value=1.0,
        set_alpha_to_one=False,
        steps_offset=1,  # Stable Diffusion's convention, so the tiny and real pipelines step alike
    )
    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _prepare_pipeline(pipe)


def _text_encoder_config(tokenizer: PreTrainedTokenizerBase, cfg: GeneratorConfig) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_encoder_dim,
        intermediate_size=4 * cfg.text_encoder_dim,
        num_hidden_layers=cfg.text_encoder_layers,
        num_attention_heads=cfg.text_encoder_heads,
        max_position_embeddings=cfg.text_encoder_max_length,
        # The tokenizer's ids, not CLIP's defaults: pooling looks for eos_token_id (dppmg/scorer.py).
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _tiny_unet(cfg: GeneratorConfig, cross_attention_dim: int) -> UNet2DConditionModel:
    attended = cfg.unet_attention_levels
    plain = len(cfg.unet_channels) - attended  # the high-resolution levels, without attention
    square = cfg.image_height in (None, cfg.image_size)
    return UNet2DConditionModel(
        sample_size=cfg.image_size if square else (cfg.image_height, cfg.image_size),
        in_channels=3,  # RGB in pixel space
        out_channels=3,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * attended,
        up_block_types=("CrossAttnUpBlock2D",) * attended + ("UpBlock2D",) * plain,
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cross_attention_dim,
        # diffusers' legacy name: in UNet2DConditionModel, attention_head_dim is the number of heads.
        attention_head_dim=cfg.unet_heads,
        norm_num_groups=math.gcd(MAX_NORM_GROUPS, *cfg.unet_channels),
        **(
            {"addition_embed_type": "text", "addition_embed_type_num_heads": cfg.unet_text_time_heads}
            if cfg.unet_text_time_embedding
            else {}
        ),
    )


def _prepare_pipeline(pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    """Make a VAE-less pipeline work in pixel space (module docstring); silence the per-call progress bar."""
    if pipe.vae is None:
        pipe.vae_scale_factor = 1
        pipe.image_processor = VaeImageProcessor(vae_scale_factor=1)
    pipe.set_progress_bar_config(disable=True)  # generate_images shows one bar over all batches instead
    return pipe


def image_shape(pipe: StableDiffusionPipeline) -> tuple[int, int]:
    """(height, width) in pixels of the images the pipeline makes by default."""
    size = pipe.unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else (size[0], size[1])
    return int(height * pipe.vae_scale_factor), int(width * pipe.vae_scale_factor)


# ---------------------------------------------------------------------------------------------------------
# Loading and saving


def load_text_generator(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    dtype: str = "float32",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer by packaged name, GGUF file, folder or hub id (`dppmg.models.load_causal_lm`)."""
    return load_causal_lm(name_or_path, cache_dir=cache_dir, device=device, dtype=dtype)


def load_image_pipeline(
    name_or_path: str | Path, device: str | torch.device = "cpu"
) -> StableDiffusionPipeline:
    """A Stable-Diffusion pipeline by hub id or folder, without a safety checker; VAE-less ones work in pixels."""
    source = _source(name_or_path, "image generator")
    # A component saved as absent (the tiny pipeline's VAE) must be passed as None, or diffusers reports it missing.
    absent = {name: None for name in _absent_components(source)}
    absent.update(safety_checker=None, requires_safety_checker=False)
    # diffusers draws a "Loading pipeline components" bar even under -q; loading takes well under a second here.
    shown = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(source, **absent)
    except (OSError, ValueError) as e:
        raise DppmgError(f"cannot load the image generator {source!r}: {_first_line(e)}") from None
    finally:
        if shown:
            diffusers_logging.enable_progress_bar()
    return _prepare_pipeline(pipe).to(resolve_device(device))


def save_generators(gen: Generators, folder: str | Path, text_source: str | None = None) -> Path:
    """Write both generators as Hugging Face folders (`text/`, `image/`) plus generators.json, atomically.

    Save the base generators, before token injection: injected tokens are saved on their own
    (`injection.save_injected`), and a model carrying them would not load back as a plain model.
    `text_source` names the text model instead of saving it, for a pretrained LM the warm-start left as it was
    (a copy of SmolLM2 would cost 540 MB per cache entry); `load_generators` then loads it by that name.
    """
    folder = Path(folder)
    injected = [m for m in (gen.lm, gen.pipe.text_encoder) if _is_injected(m)]
    if injected:
        raise DppmgError(
            f"cannot save generators to {folder}: {type(injected[0]).__name__} carries injected preference "
            "tokens; save the base generators before injecting (the tokens are saved by save_injected)"
        )
    stage = staging_dir(folder)
    try:
        if text_source is None:
            gen.lm.save_pretrained(stage / TEXT_DIR)
            gen.lm_tokenizer.save_pretrained(stage / TEXT_DIR)
        gen.pipe.save_pretrained(stage / IMAGE_DIR)
        manifest = {"format_version": FORMAT_VERSION, "info": gen.info, "text_source": text_source}
        write_json(stage / MANIFEST_FILE, manifest)
        commit_dir(stage, folder)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return folder


def load_generators(
    folder: str | Path,
    device: str | torch.device = "cpu",
    model_cache: str | Path | None = None,
    dtype: str = "float32",
) -> Generators:
    """Generators written by `save_generators`, loaded with the same code as pretrained ones.

    A text model saved by name (`text_source`) is loaded by that name, with `model_cache` and `dtype`.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        raise DppmgError(f"{folder}: not a saved generators folder (no {MANIFEST_FILE})")
    meta = read_json(manifest)
    if meta.get("format_version") != FORMAT_VERSION:
        raise DppmgError(
            f"{manifest}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    source = meta.get("text_source")
    if source is None:
        lm, tokenizer = load_text_generator(folder / TEXT_DIR, device)
    else:
        lm, tokenizer = load_text_generator(source, device, cache_dir=model_cache, dtype=dtype)
    pipe = load_image_pipeline(folder / IMAGE_DIR, device)
    return Generators(lm, tokenizer, pipe, dict(meta.get("info", {})))


def _source(name_or_path: str | Path, what: str) -> str:
    """The string to pass to from_pretrained; a DppmgError naming the path when a local path does not exist."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DppmgError(f"{what} {name!r} is a file; expected a model folder or a hub id")
        return str(path)
    if isinstance(name_or_path, Path) or not HUB_ID.match(name):
        raise DppmgError(f"{what} not found: {name} (no such folder)")
    return name  # a hub id: from_pretrained finds it in the cache, or downloads it unless HF_HUB_OFFLINE=1


def _absent_components(source: str) -> list[str]:
    """Components that a local pipeline folder's model_index.json lists as [null, null]."""
    index = Path(source) / "model_index.json"
    if not index.is_file():
        return []
    return [k for k, v in read_json(index).items() if isinstance(v, list) and all(x is None for x in v)]


def _first_line(e: BaseException) -> str:
    return str(e).strip().split("\n")[0]


def _is_injected(model: torch.nn.Module) -> bool:
    return any(name.endswith(HOLDER_NAME) for name, _ in model.named_modules())


# ---------------------------------------------------------------------------------------------------------
# Generation


def encode_prompts(pipe: StableDiffusionPipeline, prompts: Sequence[str]) -> torch.Tensor:
    """[B, S, D] text-encoder states of the prompts, padded as `StableDiffusionPipeline.encode_prompt` pads them.

    Differentiable (the pipeline's own encoding runs without gradients): the DDPO update and the grounding loss
    need gradients to reach the injected token rows.
    """
    device = pipe.unet.device
    tokens = pipe.tokenizer(
        list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    )  # fmt: skip
    use_mask = getattr(pipe.text_encoder.config, "use_attention_mask", False)
    mask = tokens["attention_mask"].to(device) if use_mask else None
    return pipe.text_encoder(tokens["input_ids"].to(device), attention_mask=mask)[0]


@torch.inference_mode()
def generate_texts(
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    indices: Sequence[int] | None = None,
    top_k: int = 50,
) -> list[str]:
    """The continuation of each prompt (without the prompt), decoded without special tokens.

    Batched with left padding. temperature <= 0 decodes greedily; otherwise text i is sampled by its own generator,
    seeded by (seed, indices[i]) (`RowSampler`), so it does not depend on the batch size or on the other prompts,
    and a shard of a list (`indices`: its rows' positions in the whole list, default 0..N-1) gets the texts the
    whole list would. top_k 50 is transformers' default, which sampling used before it was explicit. Raises
    DppmgError when a prompt plus `max_new_tokens` exceeds the model's positions.
    """
    prompts = list(prompts)
    indices = range(len(prompts)) if indices is None else indices
    positions = getattr(lm.config, "max_position_embeddings", None)
    device = next(lm.parameters()).device
    texts: list[str] = []
    starts = range(0, len(prompts), batch_size)
    with _eval_mode(lm):
        for start in tqdm(starts, desc="texts", disable=not progress or len(starts) <= 1):
            chunk = prompts[start : start + batch_size]
            batch = tokenizer(chunk, padding=True, padding_side="left", return_tensors="pt").to(device)
            length = batch["input_ids"].shape[1]
            if positions is not None and length + max_new_tokens > positions:
                longest = chunk[int(batch["attention_mask"].sum(dim=1).argmax())]
                raise DppmgError(
                    f"prompt {longest!r} is {length} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                    f"the text generator's {positions} positions"
                )
            sampler = []
            if temperature > 0:
                seeds = [sample_seed(seed, i, TEXT_STREAM) for i in indices[start : start + batch_size]]
                sampler = [RowSampler(seeds, temperature, top_k, top_p, device)]
            out = lm.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,  # greedy over RowSampler's scores, which keep the token it drew
                logits_processor=LogitsProcessorList(sampler),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts += [t.strip() for t in tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)]
    return texts


class RowSampler(LogitsProcessor):
    """Draws each row's next token from the row's own generator, for `generate`'s greedy search to take.

    transformers samples a batch from torch's one global random stream, so a prompt's text depends on which
    prompts share its batch and in what order; split across processes, a list would then get other texts than on
    one process. Here row b is warped (temperature, top-k, top-p: transformers' own warpers) and sampled with a
    generator seeded by `seeds[b]`, and the returned scores are 0 at the drawn token and -inf elsewhere.
    """

    def __init__(
        self, seeds: Sequence[int], temperature: float, top_k: int, top_p: float, device: torch.device
    ):
        self.generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
        warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        if top_k > 0:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(self.warpers(input_ids, scores).float(), dim=-1)  # [B, V]
        picks = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        drawn = torch.full_like(scores, float("-inf"))
        return drawn.scatter_(1, picks[:, None], 0.0)


@torch.inference_mode()
def generate_images(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    indices: Sequence[int] | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """uint8 [N, H, W, 3] images for the prompts (DDIM with classifier-free guidance when guidance > 1), sampled
    at `precision` (`device.sampling_autocast`).

    Image i starts from noise seeded by (seed, indices[i]) (default indices 0..N-1), so it does not depend on the
    batch size or on the other prompts, and the pipeline's scheduler with eta = 0 makes the rest deterministic. A
    shard of a list passes its rows' positions in the whole list as `indices`.
    """
    prompts = list(prompts)
    indices = range(len(prompts)) if indices is None else indices
    height, width = image_shape(pipe)
    if not prompts:
        return np.zeros((0, height, width, 3), dtype=np.uint8)
    pixel_space = pipe.vae is None
    images = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="images", disable=not progress or len(starts) <= 1):
        chunk = prompts[start : start + batch_size]
        generators = [
            torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices[start : start + batch_size]
        ]
        with sampling_autocast(precision, pipe.device):
            out = pipe(
                prompt=chunk,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
                output_type="latent" if pixel_space else "np",
                return_dict=False,
            )[0]
        if pixel_space:  # the final sample, [B, 3, H, W] in [-1, 1]
            pixels01 = (out.float().clamp(-1, 1) + 1) / 2
            images.append(pixels01.permute(0, 2, 3, 1).cpu().numpy())
        else:  # decoded by the VAE, [B, H, W, 3] in [0, 1]
            images.append(np.asarray(out, dtype=np.float32))
    return (np.concatenate(images).clip(0, 1) * 255).round().astype(np.uint8)


def sample_seed(seed: int, index: int, *stream: int) -> int:
    """The seed of sample `index` of a call seeded by `seed` (images: (seed, i); texts: (seed, i, TEXT_STREAM))."""
    return int(np.random.SeedSequence([seed, index, *stream]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------------------
# Helpers


@contextmanager
def _seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed torch inside the block and restore the caller's random state afterwards."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off inside the block; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
