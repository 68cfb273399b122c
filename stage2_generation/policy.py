"""The personalized generators as policies: prompts, prompt encoding, sampled texts and their log-probabilities.

`Policy` bundles the warm-started generators with the preference tokens injected into both (text tokens into
the LM, image tokens into the diffusion text encoder) and builds the prompts of DESIGN.md:

    text   "<pt_0_a><pt_1_b><pt_2_c>lamp:"    the user's text tokens + the warm-start text prompt
    image  "<pi_0_a><pi_1_b><pi_2_c>lamp"     the user's image tokens + the warm-start image prompt

Without tokens (`personalized=False`) the prompts are exactly the warm-start ones: injection leaves every
original token's embedding and logit unchanged, so that is the non-personalized baseline with the same weights.

For the text policy's PPO update, `sample_texts` keeps the sampled token ids and `completion_log_probs`
recomputes their log-probabilities with gradients (GRPO-style ratios per token). Positions are passed
explicitly as `cumsum(mask) - 1`, the positions `generate` used under left padding; without them a GPT-2
forward would number the padding too and score a different sequence than the one sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from torch import Tensor
from transformers import LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from dppmg.config import WarmStartConfig
from dppmg.errors import DppmgError
from dppmg.tokens import TokenCheckpoint
from stage2_generation.generators import Generators, RowSampler, image_shape
from stage2_generation.injection import InjectedTokens, inject_tokens, trainable_parameters
from stage2_generation.prompts import chat_prompt, fill_prompt


@dataclass
class Pair:
    """A (user, target) generation request: the user's row and the target's keywords (and item, if known).

    `user` None is a user without tokens of their own (cold start): the prompts carry the population's tokens
    (`TokenCheckpoint.population_codes`).
    """

    user: int | None
    keywords: str
    item: int | None = None


@dataclass
class Policy:
    """Generators with the preference tokens injected; the token-associated parameters are the only trainable ones."""

    gen: Generators
    ckpt: TokenCheckpoint
    text: InjectedTokens | None
    image: InjectedTokens | None
    prompts: WarmStartConfig
    population: list[int] | None = (
        None  # the rows whose tokens make the cold-start fallback (None: every user)
    )

    @classmethod
    def inject(
        cls,
        gen: Generators,
        ckpt: TokenCheckpoint,
        content_hash: str,
        prompts: WarmStartConfig,
        seed: int = 0,
        population: list[int] | None = None,
        text_words: dict[int, list[int]] | None = None,
        image_words: dict[int, list[int]] | None = None,
    ) -> Policy:
        """Inject the checkpoint's text tokens into the LM and its image tokens into the diffusion text encoder.

        A modality the checkpoint lacks is not injected (its prompts then carry no tokens). The UNet, the VAE
        and every original weight are frozen; the returned policy's `parameters()` are all that can train.
        `population` are the users (rows) a `Pair` without a user takes its tokens from. `text_words` spells
        level-0 text codes with word rows (`inject_tokens`' `word_pieces`, ids in the LM's tokenizer); the text
        prompts then hold the user's level-0 code only, as those rows. `image_words` does the same for the image
        codes, in the image pipeline's tokenizer.
        """
        if not set(ckpt.modalities) & {"text", "image"}:
            raise DppmgError(f"{ckpt.path}: the token checkpoint has neither text nor image tokens")
        text = image = None
        if "text" in ckpt.modalities:
            text = inject_tokens(
                gen.lm,
                gen.lm_tokenizer,
                ckpt,
                "text",
                content_hash=content_hash,
                seed=seed,
                word_pieces=text_words,
            )
        else:
            gen.lm.requires_grad_(False)
        pipe = gen.pipe
        if "image" in ckpt.modalities:
            image = inject_tokens(
                pipe.text_encoder,
                pipe.tokenizer,
                ckpt,
                "image",
                content_hash=content_hash,
                seed=seed,
                word_pieces=image_words,
            )
        else:
            pipe.text_encoder.requires_grad_(False)
        pipe.unet.requires_grad_(False)
        if pipe.vae is not None:
            pipe.vae.requires_grad_(False)
        gen.lm.eval()
        pipe.text_encoder.eval()
        pipe.unet.eval()
        return cls(gen, ckpt, text, image, prompts, population)

    @property
    def injected(self) -> list[InjectedTokens]:
        return [inj for inj in (self.text, self.image) if inj is not None]

    def parameters(self, modality: str | None = None, word_rows: bool = True) -> list[torch.nn.Parameter]:
        """The token-associated parameters (of one modality); `word_rows=False` leaves out the code-word rows."""
        chosen = [inj for inj in self.injected if modality is None or inj.modality == modality]
        params = trainable_parameters(chosen)
        if word_rows:
            return params
        words = {id(inj.module.word_rows) for inj in chosen if inj.module.word_rows is not None}
        return [p for p in params if id(p) not in words]

    # --- prompts ----------------------------------------------------------------------------------------

    def _tokens(self, user: int | None, modality: str, personalized: bool) -> str:
        inj = self.text if modality == "text" else self.image
        if not personalized or inj is None:
            return ""
        # No space before the keywords: the tokenizer then splits them exactly as in the warm-start prompt (a
        # byte-level BPE would otherwise see " lamp", another token than the "lamp" the generators learned).
        if user is None:
            return inj.prompt(self.ckpt.population_codes(modality, self.population))
        return inj.prompt(self.ckpt.codes[modality][self.ckpt.user_index(user)].tolist())

    def text_prompts(self, pairs: Sequence[Pair], personalized: bool = True) -> list[str]:
        """The LM prompts; with `text_chat`, each is the user turn of the tokenizer's chat template."""
        cfg = self.prompts
        prompts = [
            fill_prompt(cfg.text_prompt, p.keywords, self._tokens(p.user, "text", personalized))
            for p in pairs
        ]
        if cfg.text_chat:
            prompts = [chat_prompt(self.gen.lm_tokenizer, p, cfg.text_system) for p in prompts]
        return prompts

    def image_prompts(self, pairs: Sequence[Pair], personalized: bool = True) -> list[str]:
        template = self.prompts.image_prompt
        return [fill_prompt(template, p.keywords, self._tokens(p.user, "image", personalized)) for p in pairs]


# ---------------------------------------------------------------------------------------------------------
# Image side


def sample_shape(pipe: StableDiffusionPipeline) -> tuple[int, int, int]:
    """(C, H, W) of what the UNet denoises: pixels without a VAE, latents with one."""
    height, width = image_shape(pipe)
    if pipe.vae is None:
        return (pipe.unet.config.in_channels, height, width)
    factor = pipe.vae_scale_factor
    return (pipe.unet.config.in_channels, height // factor, width // factor)


@torch.no_grad()
def samples_to_uint8(pipe: StableDiffusionPipeline, samples: Tensor) -> np.ndarray:
    """uint8 [B, H, W, 3] images from final DDIM samples (pixels in [-1, 1], or latents decoded by the VAE)."""
    if pipe.vae is not None:
        samples = pipe.vae.decode(samples / pipe.vae.config.scaling_factor).sample
    pixels01 = (samples.float().clamp(-1, 1) + 1) / 2
    return (pixels01.permute(0, 2, 3, 1).cpu().numpy().clip(0, 1) * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Text side


@dataclass
class TextSamples:
    """Sampled completions with what is needed to score them again.

    input_ids: [B, P + C] the left-padded prompts followed by the completions; attention_mask alike.
    completion_mask: [B, C] 1 on the completion's tokens up to and including its EOS.
    texts: the decoded completions (special tokens dropped).
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    prompt_length: int
    texts: list[str]

    def select(self, index: Tensor) -> TextSamples:
        picked = index.tolist()
        return TextSamples(
            self.input_ids[index],
            self.attention_mask[index],
            self.completion_mask[index],
            self.prompt_length,
            [self.texts[i] for i in picked],
        )


@torch.no_grad()
def sample_texts(
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float,
    seeds: Sequence[int],
) -> TextSamples:
    """Sample one completion per prompt (one batch), keeping the token ids for the PPO update.

    Prompt i is sampled with its own generator seeded by `seeds[i]` (`RowSampler`, no top-k or top-p, so that
    `completion_log_probs` scores the distribution sampled from), whatever the other prompts of the batch.
    """
    if len(seeds) != len(prompts):
        raise DppmgError(f"sample_texts: {len(prompts)} prompts but {len(seeds)} seeds")
    device = next(lm.parameters()).device
    batch = tokenizer(list(prompts), padding=True, padding_side="left", return_tensors="pt").to(device)
    prompt_length = batch["input_ids"].shape[1]
    positions = getattr(lm.config, "max_position_embeddings", None)
    if positions is not None and prompt_length + max_new_tokens > positions:
        raise DppmgError(
            f"text prompts of {prompt_length} tokens plus max_new_tokens={max_new_tokens} exceed the text "
            f"generator's {positions} positions"
        )
    was_training = lm.training
    lm.eval()
    out = lm.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,  # greedy over RowSampler's scores, which keep the token it drew
        logits_processor=LogitsProcessorList([RowSampler(seeds, temperature, 0, 1.0, device)]),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    lm.train(was_training)
    completion = out[:, prompt_length:]
    is_eos = completion == tokenizer.eos_token_id
    # Tokens after the first EOS are padding that generate appended once the sequence had finished.
    after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    completion_mask = (~after_eos).long()
    attention = torch.cat([batch["attention_mask"], completion_mask], dim=1)
    texts = [t.strip() for t in tokenizer.batch_decode(completion, skip_special_tokens=True)]
    return TextSamples(out, attention, completion_mask, prompt_length, texts)


def completion_log_probs(lm: PreTrainedModel, samples: TextSamples, temperature: float) -> Tensor:
    """float32 [B, C]: log p(token) of every completion token under the current LM at `temperature`.

    Differentiable with respect to whatever requires gradients (the injected token rows reach the logits
    through the prompt). Positions are `cumsum(mask) - 1`, the ones `generate` used under left padding.
    """
    mask = samples.attention_mask
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = lm(input_ids=samples.input_ids, attention_mask=mask, position_ids=position_ids).logits
    p = samples.prompt_length
    scores = logits[:, p - 1 : -1].float() / temperature  # the logits that predicted each completion token
    targets = samples.input_ids[:, p:]
    return torch.log_softmax(scores, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
