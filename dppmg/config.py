"""Configuration: nested dataclasses, merged defaults → YAML → `key=value` overrides, validated once.

The shape follows facebookresearch/lingua: `OmegaConf.structured` gives a typed schema, so an unknown
key or a value of the wrong type is an error at start-up that names the key. `validate()` then checks
what types cannot (choices, ranges, cross-field rules). The object is never changed after that.
Mappings merge key by key, except those of `REPLACED_MAPPINGS` (the reward weights): a source that gives one
whole replaces it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import StringNode

from dppmg.errors import DppmgError

IMAGE_ENCODERS = ("scorer", "efficientnet-lite0")  # features.image_encoder (dppmg/image_encoder.py)
# stage2.generation.image_judge_reference: the real images the judge compares with, at full size or at the
# generation shape (stage2_generation/judges.py)
JUDGE_REFERENCES = ("full", "shape")
PRECISIONS = ("auto", "fp32", "bf16")  # stage2.generation.precision (dppmg/device.py)
# Mappings that a source replaces, where OmegaConf would merge them into the defaults: a reward ablation
# `stage2.rl.weights={consistency: 1.0}` must leave one term, not add it to the four default ones.
REPLACED_MAPPINGS = ("stage2.rl.weights",)


@dataclass
class SyntheticConfig:
    """The embedded synthetic world: items with visual and textual attributes, users with true tastes."""

    n_users: int = 1000
    n_items: int = 600
    interactions_per_user: float = 20.0  # mean history length; lengths are Poisson around it
    min_interactions_per_user: int = 5
    image_size: int = 32
    # Choice model: utility = image_weight·match(image taste) + text_weight·match(text taste)
    #                         + popularity_weight·log-popularity + temperature·Gumbel noise.
    # Each weight multiplies the *share* of that modality's attributes that match (2 visual, 3 textual), so 2 and 3
    # give every single attribute the same pull (1.0): neither modality's taste is the easier one to learn.
    image_weight: float = 2.0
    text_weight: float = 3.0
    popularity_weight: float = 0.25
    temperature: float = 0.5
    # How often an item's text names each of its visual attributes (real product text mentions colour
    # sometimes, not always): 0 makes the text blind to the image, 1 makes it a caption.
    visual_mention_prob: float = 0.6
    start_timestamp: int = 1_600_000_000


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | movielens | amazon2023 | mmrec | custom
    name: str = "default"  # processed dataset goes to <root>/processed/<name>/
    root: str = "data"
    raw_dir: str | None = None  # where the source files are (not used by the synthetic world)
    overwrite: bool = False  # replace a processed dataset that was built from a different config
    # Source files, relative to raw_dir (or absolute). None means the source's usual names.
    items_file: str | None = None  # custom: items table; amazon2023: the meta JSONL
    interactions_file: str | None = None  # custom: interactions table; amazon2023: the reviews JSONL
    images_dir: str | None = None  # posters (movielens) or product images (amazon2023, custom)
    mmrec_name: str | None = None  # mmrec: <name>.inter; None = the single *.inter in raw_dir
    max_tags: int = 10  # movielens: most frequent tags per movie written into the text
    # Filtering, in this order: unknown items, implicit threshold, de-duplication, images, k-core.
    unknown_items: str = "error"  # error | drop: interactions whose item is not in the items table
    rating_threshold: float | None = None  # keep rating >= threshold (implicit feedback); None keeps all
    dedupe: str = "last"  # first | last | none: repeated (user, item) pairs, by timestamp
    image_policy: str = "skip"  # skip | error: items whose image is missing or unreadable
    min_user_interactions: int = 0  # k-core, applied until both hold
    min_item_interactions: int = 0
    split: str = "leave_last_out"  # leave_last_out | random | given (the source's own split column)
    split_ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    @property
    def processed_dir(self) -> Path:
        return Path(self.root) / "processed" / self.name

    def raw_path(self, name: str | None) -> Path | None:
        """A source file or folder: absolute as given, else relative to raw_dir."""
        if name is None:
            return None
        p = Path(name)
        if p.is_absolute() or self.raw_dir is None:
            return p
        return Path(self.raw_dir) / p


@dataclass
class ScorerConfig:
    """The CLIP-style scorer: a pretrained CLIPModel, or a tiny one trained on the dataset's pairs."""

    pretrained: str | None = None  # hub id or local folder; None trains the tiny default
    image_size: int = 32
    patch_size: int = 8  # 16 patches at 32 px: 3-5x faster than 4 px patches and better held-out recall here
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    projection_dim: int = 64
    max_text_length: int = 64
    max_vocab: int = 8000
    epochs: int = 80
    batch_size: int = 128
    lr: float = 1e-3
    heldout_fraction: float = 0.1  # items kept out of training to report retrieval recall@1/5


@dataclass
class FeaturesConfig:
    text_encoder: str = (
        "all-MiniLM-L6-v2"  # the packaged offline copy; or any HF / sentence-transformers id or path
    )
    text_batch_size: int = 128
    text_max_length: int = 128
    # Stage 1's image item features: "scorer" (the scorer's image tower, trained on the dataset) or a pretrained
    # encoder that ships offline, "efficientnet-lite0" (ImageNet; `make models`). The scorer is built either way.
    image_encoder: str = "scorer"
    device: str = "cpu"  # cpu | cuda | auto
    # Text features cached by (encoder, texts) so reruns are cheap; dequantized GGUF models under models/.
    cache_dir: str = "data/cache"
    scorer: ScorerConfig = field(default_factory=ScorerConfig)


@dataclass
class TrackingConfig:
    """Where a run's metrics, media and token artifacts go (dppmg/tracking.py, README "Experiment tracking")."""

    # auto: WANDB_MODE if set, else online with a W&B API key and offline without | online | offline | disabled
    mode: str = "auto"
    project: str = "dppmg"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Stage1Config:
    """The modal-specific GNN, the residual-VQ quantizer and their training."""

    modalities: list[str] = field(
        default_factory=lambda: ["text", "image"]
    )  # those present in the dataset are used
    dim: int = 64
    layers: int = 3  # LightGCN propagation layers
    item_id_embedding: bool = True  # add a learned id embedding to each modality's projected item features
    id_branch: bool = False  # an extra collaborative branch over ids only (LightGCN); gets no tokens
    knn_k: int = 0  # >0: add a per-modality item-item kNN graph (LATTICE / FREEDOM); 0 = off
    knn_weight: float = 0.5  # share of the item-item graph in the item representation when knn_k > 0
    # >0: weight each train edge by 2^(-r / h), r its rank from the end of the user's history (0 = most recent),
    # so propagation leans on what a user watched lately (leave-last-out tests the next item). 0 = binary edges.
    recency_halflife: float = 0.0
    # How a branch's user vector is made. graph: a free user embedding propagated over the user–item graph
    # (LightGCN). history: the recency-weighted mean of the branch's vectors of the user's history_length latest
    # train items (2^(-r / history_halflife) for the r-th latest), trained to predict every history's next item
    # from the items before it (stage1_preference/history.py). Leave-last-out tests the next item, which the
    # history encoder models and the graph encoder does not (BENCHMARKS.md, "Stage 1: the history encoder").
    user_encoder: str = "graph"
    history_length: int = 10
    history_halflife: float = 3.0
    # bpr: one sampled negative per positive. softmax: cross-entropy over every item (memory batch × items; for
    # catalogues up to some tens of thousands of items).
    loss: str = "bpr"
    # Modal specificity: remove from the text features what the image features predict (item text that
    # describes the picture would otherwise leak visual taste into the text tokens). Needs both modalities.
    text_specific: bool = True
    # A free per-user embedding in each modality branch (LightGCN-style). Off, a user's modality vector is built
    # only from the features of items around them, so it cannot absorb the other modality's taste.
    user_embedding: bool = True
    # Training
    epochs: int = 60
    batch_size: int = 4096
    # Every step propagates the whole graph, so a fixed batch makes an epoch O(E²); above this many steps the batch
    # grows instead (O(E) epochs on large graphs). 0 = never grow. The default world and ml-latest-small stay below.
    max_steps_per_epoch: int = 16
    lr: float = 5e-3
    reg_weight: float = 1e-4  # L2 on the batch's layer-0 embeddings (LightGCN convention)
    patience: int = 10  # epochs without a better validation Recall@20 before stopping
    eval_every: int = 1
    # Users the per-epoch validation (early stopping, best checkpoint) ranks every item for: a random sample of
    # this many, drawn once from the seed; 0 = all. Full ranking costs users × items, so on 5M interactions
    # (250k users, 100k items) one validation takes longer than an epoch. The test metrics always use every user.
    valid_users: int = 0
    # Quantizer
    vq_levels: int = 3
    vq_codebook_size: int = 256
    vq_warmup_epochs: int = 5  # epochs of continuous training before the quantizer joins
    vq_commitment_weight: float = 0.25
    vq_dead_code_threshold: float = 2.0  # EMA cluster size below which a code is replaced
    vq_loss_weight: float = 1.0
    # Distinct users quantized per step (a random subset beyond this; 0 = all). Bounds the VQ's cost on large
    # graphs; the default world and ml-latest-small have fewer users per batch.
    vq_users_per_step: int = 4096
    # Users whose whole tuple collides are always counted; with this on, the token checkpoint gets one more level
    # whose code is the user's rank among the users sharing the tuple, so every user has distinct tokens.
    collision_level: bool = False
    quantized_bpr_weight: float = 1.0  # BPR also on quantized user vectors, so the tokens carry the ranking
    ks: list[int] = field(default_factory=lambda: [10, 20, 50])
    probe_heldout_fraction: float = 0.2  # users held out when probing tokens for their true preferences
    overwrite: bool = False  # replace a finished stage 1 of this run_name that had a different config
    device: str = "cpu"  # cpu | cuda | auto
    # Seeds stage 1's initialisation, sampling and probes; null takes the run's `seed`. Set it to retrain stage 1
    # on the same dataset (`seed` also seeds the dataset: its splits and scorer), e.g. to measure seed variance.
    seed: int | None = None

    def resolved_seed(self, run_seed: int) -> int:
        return run_seed if self.seed is None else self.seed


@dataclass
class GeneratorConfig:
    """Stage 2's generators: pretrained ones named by hub id or folder, or tiny ones built from these sizes.

    The tiny text generator is a GPT-2 with a byte-level BPE tokenizer over the dataset's texts. The tiny image
    generator is a Stable-Diffusion pipeline in pixel space (no VAE: at 32 px a VAE would only blur): a CLIP text
    encoder with a word-level tokenizer, a UNet conditioned on it by cross-attention, and a DDIM scheduler.
    """

    # Causal LM: a packaged offline model (SmolLM2-135M-Instruct, `make models`), a GGUF file, a local folder or a
    # hub id (dppmg/models.py); None builds the tiny GPT-2 below.
    text_model: str | None = None
    dtype: str = "float32"  # of a pretrained text model: float32 | bfloat16 | float16 (GPUs)
    text_vocab: int = 4000  # tiny LM's BPE vocabulary with its special tokens (preference tokens come on top)
    text_max_length: int = 64  # tiny LM's positions: prompt + generated tokens must fit
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 2
    image_pipeline: str | None = None  # Stable-Diffusion pipeline (hub id or folder); None = the tiny one
    image_size: int = 32  # tiny pipeline's width in pixels (and its height unless image_height is set)
    # The tiny pipeline's height; None = square. Posters are 2:3: 32 wide, 48 high.
    image_height: int | None = None
    # One UNet level per entry, each halving the side. Cross-attention (with self-attention) sits at the
    # lowest-resolution `unet_attention_levels` levels and in the middle block, never at full resolution:
    # attention at 32 px triples the cost (REFERENCE.md).
    unet_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    unet_attention_levels: int = 1  # 0 leaves only the middle block's attention
    unet_layers_per_block: int = 1
    unet_heads: int = 4  # attention heads in the UNet's transformer blocks; must divide their channels
    # Also condition every UNet block on an attention-pooled summary of the prompt, added to the time embedding
    # (diffusers' addition_embed_type="text"). Cross-attention alone at 8 px barely learned colour words in a
    # few CPU minutes: judge colour accuracy 0.12 (chance) against 0.32 with it (BENCHMARKS.md, "warm-start").
    unet_text_time_embedding: bool = True
    unet_text_time_heads: int = 4  # heads of that pooling attention; must divide text_encoder_dim
    # The tiny pipeline's text encoder and tokenizer are a copy of the dataset's scorer's text tower (trained on
    # the items' texts and images, as Stable Diffusion takes CLIP's), frozen during the warm-start. A new encoder
    # trained with the UNet in a few CPU minutes never learned colour words: judge colour accuracy 0.09-0.32
    # against 0.73 with the scorer's (BENCHMARKS.md, "warm-start"). False builds a new one from the sizes below.
    text_encoder_from_scorer: bool = True
    text_encoder_vocab: int = 2000  # tiny CLIP text encoder's word-level vocabulary, special tokens excluded
    text_encoder_max_length: int = 32  # tokens per image prompt (the pipeline pads every prompt to this)
    text_encoder_dim: int = 64  # also the UNet's cross-attention width (it attends to these hidden states)
    text_encoder_layers: int = 2
    text_encoder_heads: int = 2
    scheduler_steps: int = 1000  # diffusion training timesteps
    # Noise schedule of the tiny pipeline: DDPM's linear betas, the usual choice for pixel-space 32 px models.
    beta_schedule: str = "linear"  # linear | scaled_linear | squaredcos_cap_v2
    beta_start: float = 1e-4
    beta_end: float = 0.02
    clip_sample: bool = True  # clip each DDIM step's predicted image to [-1, 1] (pixel space's range)
    # What the tiny UNet predicts: epsilon | v_prediction | sample (the noise, the velocity, the clean image).
    # sample: recognizable items after a few minutes of CPU training, where epsilon still leaves visible noise.
    prediction_type: str = "sample"
    device: str = "cpu"  # cpu | cuda | auto


@dataclass
class WarmStartConfig:
    """Supervised warm-start of the generators on the dataset's items, before any personalization.

    Text: the LM learns item text from a prompt made of the item's keywords (and, in the hint copies, a few of
    the text's own words before them). Image: the diffusion model learns the item's image from its caption (the
    item text; the keywords when it has none or for the 1 - image_caption_prob share). Both are cached per
    dataset, scorer and config.
    """

    # The text part takes ~35 s on 2 CPU cores, the image part 0.2-0.4 s a step at batch 16 (750 small steps drew
    # cleaner shapes than 450 steps at batch 32 or 1300 at batch 8 in the same time). 3000 image steps (loss 0.054
    # -> 0.026 at the end of the run, against 750) are what teach the default world's generator its patterns: asked
    # for "striped", "checked", "polka-dot" or "plain", the attribute judge read the asked pattern in 0.97 / 0.73 /
    # 0.20 / 0.48 of 64 images, against 0.33 / 0.27 / 0.41 / 0.25 after 750 steps (colours: 0.70 against 0.77 on
    # average), and `none` drew the target's category 0.70 of the time instead of 0.36 (BENCHMARKS.md, "What the
    # image generator can draw"; benchmarks/probe_image_words.py).
    text_steps: int = 3000  # LM optimizer steps; 0 skips the text part
    image_steps: int = 3000  # diffusion optimizer steps; 0 skips the image part
    batch_size: int = 16
    lr_text: float = 3e-3
    lr_image: float = 1e-3
    # The LM prompt; the item text is the continuation. The user's preference tokens go where {tokens} is, or
    # first when the template has no {tokens}.
    text_prompt: str = "{keywords}:"
    # Instruction LLMs: the prompt becomes the user message of the tokenizer's chat template (after text_system as
    # the system message, when set), and the text is the assistant's answer.
    text_chat: bool = False
    text_system: str = ""
    # Extra copies of each item whose prompt starts with 1..text_hint_words words of its own text, so the LM learns
    # to follow what precedes the keywords (where the preference tokens go); 0 trains on the keywords alone.
    # With 2 copies and 1000 steps the LM wrote the hinted style, material and room words in 0.16 of the judged
    # attributes (keywords alone: 0.13); with 6 copies and 3000 steps in 0.82 (0.16)
    # (benchmarks/probe_text_hints.py; BENCHMARKS.md, "The text generator follows hint words").
    text_hint_copies: int = 6
    text_hint_words: int = 3
    image_prompt: str = "{keywords}"  # the image generator's prompt ({tokens} as in text_prompt)
    # Share of image prompts replaced by "" during training, so classifier-free guidance has an unconditional model.
    uncond_prob: float = 0.1
    # Share of image prompts replaced by the item's text (its caption): the diffusion model learns to follow
    # descriptive words such as colours and patterns, which is what lets preference tokens steer it later
    # (a model trained on keywords alone only ever learns the category).
    image_caption_prob: float = 1.0
    max_grad_norm: float = 1.0
    # Learning rate: linear warm-up over this share of each part's steps, then cosine decay to 0.
    warmup: float = 0.05
    # Decay of an exponential moving average of the UNet and text-encoder weights; when > 0 the saved generators
    # hold the average instead of the last weights. Off: after the cosine decay to 0 it drew no better images.
    ema_decay: float = 0.0


@dataclass
class GroundingConfig:
    """Supervised grounding of the injected tokens on the training users' own interactions (user u, item i).

    Text: the LM loss of i's text given u's text tokens and i's keywords. Image: the diffusion loss of i's image
    given u's image tokens and i's keywords. Only the token-associated parameters train.
    """

    text_steps: int = 300  # 0 skips the text part
    # Each costs about 0.55 s at batch 32 (the UNet's backward is needed). Held-out personalization_image after
    # 150 / 300 / 600 steps: 0.061 / 0.090 / 0.090 (BENCHMARKS.md, "Stage 2").
    image_steps: int = 300
    batch_size: int = 32
    text_batch_size: int = 0  # examples per text step; 0 = batch_size (a real LLM's step costs far more)
    # Target tokens of an item text the LM loss counts (the rest is cut); 0 = all. A real LLM's step costs in
    # proportion to the sequence, and it never writes more than generation.max_new_tokens anyway.
    text_max_tokens: int = 0
    lr: float = 1e-2
    max_grad_norm: float = 1.0
    # Whether text grounding trains the rows that spell level-0 codes with code words (stage2.text_code_words); RL
    # trains them either way. The LM loss of the item texts takes them away from their words faster than it teaches
    # them anything the judge sees: held-out hit_text 0.462 at the words, 0.413 / 0.410 / 0.413 after 300 steps at
    # lr 1e-2 / 1e-3 / 3e-3 (training users' 0.541 falls to ~0.45 too; BENCHMARKS.md, "Text tokens spelt with code
    # words: the method").
    text_word_rows: bool = False
    # The same for the image side's word rows (stage2.image_code_words). Grounding them with the diffusion loss of the
    # items' images made them crowd out the target: held-out target_hit_image after RL 0.750 -> 0.453, fidelity -8 %
    # (the reward's own term), hit_image 0.586 -> 0.562 (BENCHMARKS.md, "What the image generator can draw, and
    # image tokens spelt with code words").
    image_word_rows: bool = False
    # Share of each user's interactions grounding trains on, the most typical first (grounding.typical_pairs);
    # 1 uses them all. Held-out personalization_image after grounding at 1 / 0.5 / 0.3 / 0.2: 0.090 / 0.117 / 0.150
    # / 0.158, and personalization_text at 1 / 0.3 / 0.2: 0.367 / 0.390 / 0.397; 0.1 against 0.2, three generation
    # seeds: combined personalization gain over none +8.0 % against +7.9 % (BENCHMARKS.md, "Stage 2").
    typical_share: float = 0.1


ADVANTAGE_KINDS = ("total", "per_component")


@dataclass
class RLConfig:
    """PPO-style fine-tuning of the token-associated parameters on the combined reward.

    Each iteration is a text round (GRPO: G sampled texts per (user, target), group-relative advantages, a
    clipped ratio per token) and an image round (DDPO: G stochastic DDIM samples per pair, per-pair advantage
    normalisation, a clipped ratio per denoising step). Every rollout is paired with the other modality's
    generation for the same (user, target), so the consistency term couples the two.
    """

    iterations: int = 6  # 0 skips RL (heldout.rl then equals heldout.grounded)
    pairs_per_round: int = 8  # distinct (training user, target) pairs per round
    group_size: int = 4  # samples per pair; advantages are normalised within each pair's group
    minibatch_size: int = 8  # samples per PPO update
    # PPO passes over a text round's samples. With 4 (16 updates on 32 samples) the text round over-fitted its 8 pairs:
    # held-out consistency fell 0.059 below grounding; with 1 it rose 0.030 (BENCHMARKS.md, "Stage 2").
    text_epochs: int = 1
    image_epochs: int = 2  # PPO passes over an image round's samples (each costs a UNet backward per step)
    clip_range: float = 0.2
    adv_clip_max: float = 5.0
    # A round's remaining updates are skipped once the mean approximate KL to the rollout policy exceeds this.
    max_approx_kl: float = 0.1
    # "total": normalise the weighted total within each group (GRPO, DDPO). "per_component": normalise each reward
    # within its group first, then weight and sum, so a weight sets a component's share of the advantage whatever
    # its spread (rl._advantages).
    advantage: str = "total"
    # After strong grounding, 1e-2 undid it: the first image update reached an approximate KL of 5-30 and held-out
    # reward fell by 0.11. At 3e-3 / 1e-3 the KL stays ~0.01, every planned update runs, and reward and consistency
    # rise above grounding (BENCHMARKS.md, "Stage 2": RL learning rates).
    lr_text: float = 3e-3
    lr_image: float = 1e-3
    max_grad_norm: float = 1.0
    text_temperature: float = (
        1.0  # sampling temperature of the text rollouts (and of their log-probabilities)
    )
    image_steps: int = 10  # DDIM steps of an image rollout
    eta: float = 1.0  # DDIM noise weight of the rollouts: > 0 makes each step a Gaussian policy
    # The reward: registered reward names (stage2_generation/rewards.py) and their weights. A mapping given whole
    # (in a YAML file, or `stage2.rl.weights={consistency: 1.0}`) replaces this one, so an ablation keeps only
    # the terms it names; one key (`stage2.rl.weights.fidelity=0`) edits the current mapping. Stage 2 checks
    # the names against the registry when it starts (this module imports no stage package).
    weights: dict[str, float] = field(
        default_factory=lambda: {
            "personalization_text": 1.0,
            # 2: with 1, the updates traded image personalization for consistency, whose spread dominates the
            # group-normalised advantages; 2 raised both (4 did not help further).
            "personalization_image": 2.0,
            "consistency": 1.0,
            "fidelity": 0.5,
        }
    )


@dataclass
class GenerationConfig:
    """Generation for evaluation, the gallery and `dppmg generate`."""

    heldout_users: int = 64  # users kept out of grounding and RL; stage2/metrics.json is measured on them
    # Images drawn per held-out pair (each from its own noise; one text per pair): every per-pair metric is the
    # mean over them. The sampling noise of one image is a large part of a small image effect's interval: on the
    # MovieLens run, rl - none on judge_history_last5 went from +0.0031 [-0.0001, +0.0064] with 1 image to
    # +0.0025 [+0.0004, +0.0047] with 4 (BENCHMARKS.md, "images per pair").
    images_per_pair: int = 1
    gallery_users: int = 8  # held-out users shown in stage2/gallery.html
    max_new_tokens: int = 40
    temperature: float = 0.7  # text sampling temperature; <= 0 decodes greedily
    image_steps: int = 20  # DDIM steps (eta = 0)
    # Classifier-free guidance scale; 1 turns it off. The tiny default generators do best at 1-1.5: held-out
    # personalization_image after grounding at guidance 1 / 1.5 / 2 / 3 / 4 / 5: 0.193 / 0.183 / 0.171 / 0.158 /
    # 0.139 / 0.122, and fidelity is higher too (BENCHMARKS.md, "Stage 2"). Pretrained Stable Diffusion wants ~7.5.
    guidance: float = 1.5
    batch_size: int = 32
    # Precision of image sampling (never of training): fp32 | bf16 (the UNet and the prompt encoder under bfloat16
    # autocast) | auto (bf16 on a CPU with AMX tiles, where it is 2x faster, else fp32; dppmg/device.py). On the
    # default world bf16 moves no eval metric significantly (BENCHMARKS.md, "Sampling in bfloat16"). Not part of
    # the stage-2 fingerprint, like the device; stage2/metrics.json and eval/results.json record what ran.
    precision: str = "auto"
    # A pretrained image encoder that judges the generated images, independently of the reward (which uses the
    # scorer): similarity to the user's history images and to the target image in its feature space, plus SSIM.
    # null: no judge (the synthetic world has its attribute judge). "efficientnet-lite0" ships offline.
    image_judge: str | None = None
    # Cosines in the catalogue-centred feature space (the mean item-image feature subtracted first). Raw cosines
    # of pooled CNN features share a large common direction, and at 32 x 48 they could not tell a user's own next
    # poster from a random one (liked - random +0.0002 [-0.0046, +0.0052] on the last 5 history posters); centred,
    # +0.0058 [+0.0018, +0.0100] (benchmarks/judge_headroom.py; BENCHMARKS.md, "The EfficientNet judge's headroom").
    image_judge_centered: bool = True
    image_judge_reference: str = "full"  # full: the real images at full size | shape: at the generation shape


@dataclass
class Stage2Config:
    """Stage 2: generators, token injection, grounding, RL, generation."""

    generators: GeneratorConfig = field(default_factory=GeneratorConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    overwrite: bool = False  # replace a finished stage-2 result of another config
    # Each level-0 text code is spelt as the BPE pieces of its top N code words (the words that set apart its users'
    # items, by lift over the training interactions; stage2_generation/code_words.py): one token row per piece,
    # started at the piece's embedding, then RL-trained (grounding leaves them: grounding.text_word_rows). The text
    # prompt then holds the user's level-0 code alone. 0: one row per code and level, a projection of the codebook
    # (the paper's tokens). Default world, `make eval`: held-out hit_text 0.280 with 0, 0.495 [0.443, 0.545] with 5
    # (BENCHMARKS.md, "Text tokens spelt with code words: the method").
    text_code_words: int = 5
    # The same spelling for level-0 image codes, in the image pipeline's text encoder's tokenizer: one row per piece
    # of the top N code words, started at its embedding; the image prompt then holds the user's level-0 code alone
    # (grounding leaves the rows: grounding.image_word_rows). 0: one row per code and level (the paper's tokens).
    # Default world, one stage 2 each, held-out hit_image after RL 0.438 with 0 and 0.586 with 5
    # (BENCHMARKS.md, "What the image generator can draw, and image tokens spelt with code words").
    image_code_words: int = 5
    # The run whose finished stage 1 this run's stage 2 uses (runs/<stage1_run>/stage1 is linked into this run's
    # folder); unset: this run's own. Stage-2 sweeps set it, so that every trial shares one stage 1.
    stage1_run: str | None = None


EVAL_METHODS = (
    "none",  # the same generators prompted with the target keywords only
    "pmg",  # PMG (WWW 2024): LLM keywords + soft preference embeddings, best of N by z
    "dppmg_sft",  # DPPMG after grounding, before RL
    "dppmg",  # DPPMG after grounding and RL (stage 2's result)
    "dppmg_continuous",  # ablation: the continuous preference vectors injected as one soft token per user
    "text_tokens_only",  # ablation: DPPMG's tokens in the text prompt only
    "image_tokens_only",  # ablation: DPPMG's tokens in the image prompt only
    "dppmg_no_consistency",  # ablation: RL from the grounded tokens with the consistency term removed
    "oracle",  # synthetic world only: catalogue items that match the user's true tastes
    # DPPMG's tokens with PMG's selection: eval.pmg.candidates images per pair, the best by z at eval.pmg.alpha
    # (PMG's image cost). Not in the default list: name it in eval.methods.
    "dppmg_best_of_n",
)
DEFAULT_EVAL_METHODS = tuple(m for m in EVAL_METHODS if m != "dppmg_best_of_n")


@dataclass
class PMGConfig:
    """PMG (Shen et al., WWW 2024) as this project runs it; eval/results.md says which extractor ran."""

    # The LLM that reads the history as natural language: it picks the preference keywords (by likelihood, from
    # the catalogue's vocabulary) and produces the soft preference embeddings. A packaged name, GGUF file, folder
    # or hub id (dppmg/models.py). When it is not installed, or with "stand-in", the stage-2 text generator
    # stands in, and eval/results.md says so.
    llm: str = "SmolLM2-135M-Instruct"
    history_items: int = 10  # most recent history items written into the prompt
    num_keywords: int = 5  # preference keywords per user
    vocabulary_size: int = 300  # candidate keywords: the catalogue's most frequent content words
    soft_tokens: int = (
        4  # trainable soft-prompt tokens (P-Tuning v2 style) whose LLM states become embeddings
    )
    train_steps: int = 150  # diffusion-loss steps of the soft embeddings on training users' target items
    train_users: int = 256  # training users whose keywords are extracted for that training
    lr: float = 1e-3
    batch_size: int = 16
    candidates: int = 4  # N images per pair; the one with the highest z = a log d_p + (1 - a) log d_t is kept
    alpha: float = 0.5  # a in z: the weight of the preference score d_p against the target score d_t


@dataclass
class EvalConfig:
    """`dppmg eval` / `make eval`: every method on the same held-out pairs, scored by one metric list."""

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_EVAL_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # generation seeds; CIs pool pairs and seeds
    max_pairs: int = 0  # evaluate the first N of stage 2's held-out pairs (0: all of them)
    sample_users: int = 6  # held-out users shown side by side on eval/index.html
    # Personalization-versus-fidelity trade-off curves: PMG at each alpha, DPPMG after RL at each fidelity weight.
    tradeoff_alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    tradeoff_fidelity_weights: list[float] = field(default_factory=lambda: [0.0, 2.0])
    bootstrap_samples: int = 2000
    # PMG's downstream use: each held-out user's generated image (and text), made from the user alone, as extra
    # ranking features on top of stage 1; Recall@20 on the test items with and without them (evaluation/
    # downstream.py). The feature weight is chosen among downstream_weights on the validation items.
    downstream_methods: list[str] = field(default_factory=lambda: ["none", "pmg", "dppmg"])
    downstream_weights: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.5, 1.0])
    overwrite: bool = False  # recompute methods whose cached generations exist
    pmg: PMGConfig = field(default_factory=PMGConfig)


@dataclass
class Config:
    seed: int = 0
    run_name: str = "default"
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name

    def validate(self) -> Config:
        d = self.data
        _choice("data.source", d.source, ("synthetic", "movielens", "amazon2023", "mmrec", "custom"))
        _choice("data.unknown_items", d.unknown_items, ("error", "drop"))
        _choice("data.dedupe", d.dedupe, ("first", "last", "none"))
        _choice("data.image_policy", d.image_policy, ("skip", "error"))
        _choice("data.split", d.split, ("leave_last_out", "random", "given"))
        _choice("features.device", self.features.device, ("cpu", "cuda", "auto"))
        _choice("features.image_encoder", self.features.image_encoder, IMAGE_ENCODERS)
        if d.source not in ("synthetic",) and d.raw_dir is None:
            raise DppmgError(
                f"data.raw_dir is required for data.source={d.source!r}: the folder with the source files"
            )
        if d.split == "given" and d.source != "mmrec":
            raise DppmgError("data.split=given needs a source with its own split column (data.source=mmrec)")
        if (
            len(d.split_ratios) != 3
            or any(r < 0 for r in d.split_ratios)
            or abs(sum(d.split_ratios) - 1) > 1e-6
        ):
            raise DppmgError(
                f"data.split_ratios must be three non-negative numbers that sum to 1, got {d.split_ratios}"
            )
        for key in ("min_user_interactions", "min_item_interactions", "max_tags"):
            if getattr(d, key) < 0:
                raise DppmgError(f"data.{key} must be >= 0, got {getattr(d, key)}")
        if not d.name or "/" in d.name:
            raise DppmgError(f"data.name must be a plain folder name, got {d.name!r}")
        s = d.synthetic
        for key in ("n_users", "n_items", "image_size"):
            if getattr(s, key) < 1:
                raise DppmgError(f"data.synthetic.{key} must be >= 1, got {getattr(s, key)}")
        if s.interactions_per_user < 1 or s.min_interactions_per_user < 1:
            raise DppmgError(
                "data.synthetic.interactions_per_user and min_interactions_per_user must be >= 1"
            )
        if s.min_interactions_per_user > s.n_items:
            raise DppmgError("data.synthetic.min_interactions_per_user cannot exceed data.synthetic.n_items")
        if not 0 <= s.visual_mention_prob <= 1:
            raise DppmgError(
                f"data.synthetic.visual_mention_prob must be in [0, 1], got {s.visual_mention_prob}"
            )
        if s.temperature <= 0:
            raise DppmgError(f"data.synthetic.temperature must be > 0, got {s.temperature}")
        sc = self.features.scorer
        if sc.pretrained is None and sc.image_size % sc.patch_size:
            raise DppmgError(
                f"features.scorer.image_size ({sc.image_size}) must be a multiple of patch_size ({sc.patch_size})"
            )
        if not 0 < sc.heldout_fraction < 1:
            raise DppmgError(f"features.scorer.heldout_fraction must be in (0, 1), got {sc.heldout_fraction}")
        st = self.stage1
        _choice("stage1.device", st.device, ("cpu", "cuda", "auto"))
        _choice("tracking.mode", self.tracking.mode, ("auto", "online", "offline", "disabled"))
        for m in st.modalities:
            _choice("stage1.modalities", m, ("text", "image"))
        _choice("stage1.user_encoder", st.user_encoder, ("graph", "history"))
        _choice("stage1.loss", st.loss, ("bpr", "softmax"))
        if st.history_halflife <= 0:
            raise DppmgError(f"stage1.history_halflife must be > 0, got {st.history_halflife}")
        for key in ("dim", "layers", "epochs", "batch_size", "vq_levels", "vq_codebook_size", "eval_every",
                    "history_length"):  # fmt: skip
            if getattr(st, key) < 1:
                raise DppmgError(f"stage1.{key} must be >= 1, got {getattr(st, key)}")
        for key in ("vq_users_per_step", "valid_users"):
            if getattr(st, key) < 0:
                raise DppmgError(f"stage1.{key} must be >= 0 (0 = all), got {getattr(st, key)}")
        if st.recency_halflife < 0:
            raise DppmgError(
                f"stage1.recency_halflife must be >= 0 (0 = binary edges), got {st.recency_halflife}"
            )
        if st.max_steps_per_epoch < 0:
            raise DppmgError(
                f"stage1.max_steps_per_epoch must be >= 0 (0 = off), got {st.max_steps_per_epoch}"
            )
        if st.epochs <= st.vq_warmup_epochs:
            raise DppmgError(
                f"stage1.epochs ({st.epochs}) must exceed stage1.vq_warmup_epochs ({st.vq_warmup_epochs}): "
                "the tokens come from epochs after the warm-up"
            )
        if 20 not in st.ks:
            raise DppmgError(
                f"stage1.ks must include 20 (early stopping and metrics.json use Recall@20), got {st.ks}"
            )
        if not 0 < st.probe_heldout_fraction < 1:
            raise DppmgError(
                f"stage1.probe_heldout_fraction must be in (0, 1), got {st.probe_heldout_fraction}"
            )
        if not self.run_name or "/" in self.run_name:
            raise DppmgError(f"run_name must be a plain folder name, got {self.run_name!r}")
        _validate_generators(self.stage2.generators)
        _validate_warmstart(self.stage2.warmstart)
        _validate_stage2(self.stage2)
        _validate_eval(self.eval)
        return self


def _validate_generators(g: GeneratorConfig) -> None:
    key = "stage2.generators"
    _choice(f"{key}.device", g.device, ("cpu", "cuda", "auto"))
    _choice(f"{key}.beta_schedule", g.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
    _choice(f"{key}.prediction_type", g.prediction_type, ("epsilon", "v_prediction", "sample"))
    _choice(f"{key}.dtype", g.dtype, ("float32", "bfloat16", "float16"))
    if g.image_height is not None and g.image_height < 1:
        raise DppmgError(f"{key}.image_height must be >= 1 or null (square), got {g.image_height}")
    sizes = (
        "text_vocab", "text_max_length", "text_dim", "text_layers", "text_heads", "image_size",
        "unet_layers_per_block", "unet_heads", "unet_text_time_heads", "text_encoder_vocab", "text_encoder_max_length",
        "text_encoder_dim", "text_encoder_layers", "text_encoder_heads", "scheduler_steps",
    )  # fmt: skip
    for name in sizes:
        if getattr(g, name) < 1:
            raise DppmgError(f"{key}.{name} must be >= 1, got {getattr(g, name)}")
    if len(g.unet_channels) < 2 or any(c < 1 for c in g.unet_channels):
        raise DppmgError(
            f"{key}.unet_channels must be at least two positive sizes (cross-attention needs a level below the "
            f"full resolution), got {g.unet_channels}"
        )
    for dim, heads in (
        ("text_dim", "text_heads"),
        ("text_encoder_dim", "text_encoder_heads"),
        ("text_encoder_dim", "unet_text_time_heads"),
    ):
        if getattr(g, dim) % getattr(g, heads):
            raise DppmgError(
                f"{key}.{dim} ({getattr(g, dim)}) must be a multiple of {key}.{heads} ({getattr(g, heads)})"
            )
    levels = len(g.unet_channels)
    if not 0 <= g.unet_attention_levels < levels:
        raise DppmgError(
            f"{key}.unet_attention_levels must be in [0, {levels - 1}] (never the full-resolution level of the "
            f"{levels}), got {g.unet_attention_levels}"
        )
    # The levels with cross-attention, and the middle block at the last level's width.
    attended = sorted(set(g.unet_channels[levels - g.unet_attention_levels :] + g.unet_channels[-1:]))
    if any(c % g.unet_heads for c in attended):
        raise DppmgError(
            f"{key}.unet_heads ({g.unet_heads}) must divide the channels {attended} of the attention levels"
        )
    for name, side in (("image_size", g.image_size), ("image_height", g.image_height)):
        if side is None:
            continue
        if side % 2 ** (levels - 1):
            raise DppmgError(
                f"{key}.{name} ({side}) must be divisible by 2^{levels - 1}: the UNet halves it "
                f"between its {levels} levels ({key}.unet_channels={g.unet_channels})"
            )
        if side % 8:
            raise DppmgError(f"{key}.{name} ({side}) must be a multiple of 8 (diffusers' pipeline checks it)")
    if not 0 < g.beta_start < g.beta_end < 1:
        raise DppmgError(f"{key}: need 0 < beta_start < beta_end < 1, got {g.beta_start}, {g.beta_end}")


def _validate_warmstart(w: WarmStartConfig) -> None:
    key = "stage2.warmstart"
    for name in ("text_steps", "image_steps", "text_hint_copies"):
        if getattr(w, name) < 0:
            raise DppmgError(f"{key}.{name} must be >= 0 (0 skips that part), got {getattr(w, name)}")
    for name in ("batch_size", "text_hint_words"):
        if getattr(w, name) < 1:
            raise DppmgError(f"{key}.{name} must be >= 1, got {getattr(w, name)}")
    for name in ("lr_text", "lr_image", "max_grad_norm"):
        if getattr(w, name) <= 0:
            raise DppmgError(f"{key}.{name} must be > 0, got {getattr(w, name)}")
    if not 0 <= w.image_caption_prob <= 1:
        raise DppmgError(f"{key}.image_caption_prob must be in [0, 1], got {w.image_caption_prob}")
    if not 0 <= w.uncond_prob < 1:
        raise DppmgError(f"{key}.uncond_prob must be in [0, 1), got {w.uncond_prob}")
    if not 0 <= w.warmup < 1:
        raise DppmgError(f"{key}.warmup must be in [0, 1), got {w.warmup}")
    if not 0 <= w.ema_decay < 1:
        raise DppmgError(f"{key}.ema_decay must be in [0, 1) (0 = no average), got {w.ema_decay}")
    for name in ("text_prompt", "image_prompt"):
        if "{keywords}" not in getattr(w, name):
            raise DppmgError(f"{key}.{name} must contain {{keywords}}, got {getattr(w, name)!r}")
        if getattr(w, name).count("{tokens}") > 1:
            raise DppmgError(f"{key}.{name} may contain {{tokens}} once, got {getattr(w, name)!r}")


def _validate_stage2(s2: Stage2Config) -> None:
    g, r, gen = s2.grounding, s2.rl, s2.generation
    checks: list[tuple[str, float, float]] = [  # (key, value, smallest allowed)
        ("text_code_words", s2.text_code_words, 0),
        ("image_code_words", s2.image_code_words, 0),
        ("grounding.text_steps", g.text_steps, 0),
        ("grounding.image_steps", g.image_steps, 0),
        ("grounding.batch_size", g.batch_size, 1),
        ("grounding.text_max_tokens", g.text_max_tokens, 0),
        ("grounding.text_batch_size", g.text_batch_size, 0),
        ("rl.iterations", r.iterations, 0),
        ("rl.pairs_per_round", r.pairs_per_round, 1),
        ("rl.minibatch_size", r.minibatch_size, 1),
        ("rl.text_epochs", r.text_epochs, 0),
        ("rl.image_epochs", r.image_epochs, 0),
        ("rl.image_steps", r.image_steps, 1),
        ("generation.heldout_users", gen.heldout_users, 1),
        ("generation.images_per_pair", gen.images_per_pair, 1),
        ("generation.gallery_users", gen.gallery_users, 0),
        ("generation.max_new_tokens", gen.max_new_tokens, 1),
        ("generation.image_steps", gen.image_steps, 1),
        ("generation.batch_size", gen.batch_size, 1),
    ]
    for key, value, low in checks:
        if value < low:
            raise DppmgError(f"stage2.{key} must be >= {low}, got {value}")
    if r.group_size < 2:
        raise DppmgError(
            f"stage2.rl.group_size must be >= 2 (advantages are relative within a group), got {r.group_size}"
        )
    for key, value in (
        ("grounding.lr", g.lr), ("grounding.max_grad_norm", g.max_grad_norm), ("rl.lr_text", r.lr_text),
        ("rl.lr_image", r.lr_image), ("rl.max_grad_norm", r.max_grad_norm), ("rl.clip_range", r.clip_range),
        ("rl.adv_clip_max", r.adv_clip_max), ("rl.max_approx_kl", r.max_approx_kl),
        ("rl.text_temperature", r.text_temperature), ("generation.guidance", gen.guidance),
    ):  # fmt: skip
        if value <= 0:
            raise DppmgError(f"stage2.{key} must be > 0, got {value}")
    _choice("stage2.rl.advantage", r.advantage, ADVANTAGE_KINDS)
    if gen.image_judge is not None:
        _choice("stage2.generation.image_judge", gen.image_judge, IMAGE_ENCODERS[1:])
    _choice("stage2.generation.image_judge_reference", gen.image_judge_reference, JUDGE_REFERENCES)
    _choice("stage2.generation.precision", gen.precision, PRECISIONS)
    if not 0 < g.typical_share <= 1:
        raise DppmgError(
            f"stage2.grounding.typical_share must be in (0, 1] (1 grounds on every interaction), "
            f"got {g.typical_share}"
        )
    if not 0 < r.eta <= 1:
        raise DppmgError(
            f"stage2.rl.eta must be in (0, 1] (0 would make the DDIM policy deterministic), got {r.eta}"
        )
    if not r.weights:
        raise DppmgError("stage2.rl.weights is empty: name at least one reward")


def _validate_eval(e: EvalConfig) -> None:
    if not e.methods:
        raise DppmgError("eval.methods is empty: name at least one of " + ", ".join(EVAL_METHODS))
    for m in e.methods:
        _choice("eval.methods", m, EVAL_METHODS)
    if len(set(e.methods)) != len(e.methods):
        raise DppmgError(f"eval.methods names a method twice: {e.methods}")
    if not e.seeds or len(set(e.seeds)) != len(e.seeds):
        raise DppmgError(f"eval.seeds must be distinct integers, at least one, got {e.seeds}")
    if e.max_pairs < 0:
        raise DppmgError(f"eval.max_pairs must be >= 0 (0: every held-out pair), got {e.max_pairs}")
    if e.sample_users < 0 or e.bootstrap_samples < 100:
        raise DppmgError("eval.sample_users must be >= 0 and eval.bootstrap_samples >= 100")
    p = e.pmg
    for key in (
        "history_items",
        "num_keywords",
        "vocabulary_size",
        "soft_tokens",
        "batch_size",
        "candidates",
    ):
        if getattr(p, key) < 1:
            raise DppmgError(f"eval.pmg.{key} must be >= 1, got {getattr(p, key)}")
    if p.num_keywords > p.vocabulary_size:
        raise DppmgError("eval.pmg.num_keywords cannot exceed eval.pmg.vocabulary_size")
    if p.train_steps < 0 or p.train_users < 1 or p.lr <= 0:
        raise DppmgError("eval.pmg.train_steps must be >= 0, train_users >= 1 and lr > 0")
    for a in (p.alpha, *e.tradeoff_alphas):
        if not 0 <= a <= 1:
            raise DppmgError(f"eval.pmg.alpha and eval.tradeoff_alphas must be in [0, 1], got {a}")
    if any(w < 0 for w in e.tradeoff_fidelity_weights):
        raise DppmgError(f"eval.tradeoff_fidelity_weights must be >= 0, got {e.tradeoff_fidelity_weights}")
    for m in e.downstream_methods:
        _choice("eval.downstream_methods", m, tuple(x for x in EVAL_METHODS if x != "oracle"))
    if any(w < 0 for w in e.downstream_weights):
        raise DppmgError(f"eval.downstream_weights must be >= 0, got {e.downstream_weights}")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DppmgError(f"{key}={value!r} is not one of: {', '.join(choices)}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """defaults → YAML file → `key=value` overrides → validate. Errors name the key and the source."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DppmgError(f"config file not found: {path}")
        try:
            cfg = _merge(cfg, OmegaConf.load(path))
        except OmegaConfBaseException as e:
            raise DppmgError(f"{path}: {_describe(e)}") from None
        except Exception as e:  # YAML syntax errors come from the yaml package
            raise DppmgError(f"{path}: cannot read YAML: {e}") from None
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise DppmgError(f"command-line override {item!r} is not of the form key=value")
    for item in overrides:  # one at a time: a later item may replace a mapping an earlier one edited
        try:
            key, text = item.split("=", 1)
            source = OmegaConf.from_dotlist([item])
            parsed = OmegaConf.select(source, key)
            # A string field takes the text as written: run_name=off stays "off", not YAML's False, and 007
            # stays "007"; null still clears an optional one.
            if isinstance(parsed, bool | int | float) and _is_string_field(cfg, key):
                source = OmegaConf.create({})
                OmegaConf.update(source, key, text)
            cfg = _merge(cfg, source, assigned=key)
        except OmegaConfBaseException as e:
            raise DppmgError(f"command line: {_describe(e)}") from None
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise DppmgError(f"config: {_describe(e)}") from None
    assert isinstance(obj, Config)
    return obj.validate()


def _is_string_field(cfg: DictConfig, key: str) -> bool:
    """Whether `key` names a string field of the structured config (its override's text is then taken as is)."""
    node: Any = cfg
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)
    if not isinstance(node, DictConfig) or leaf not in node:
        return False
    return isinstance(node._get_node(leaf), StringNode)


def _merge(cfg: DictConfig, source: DictConfig, assigned: str = "") -> DictConfig:
    """`cfg` merged with `source`, a YAML file ("" assigned) or one override that assigns the key `assigned`.

    OmegaConf merges mappings key by key; the mappings of `REPLACED_MAPPINGS` are replaced instead when the
    source gives them whole (the file, or an override of that key or of one that encloses it).
    """
    for key in REPLACED_MAPPINGS:
        whole = not assigned or key == assigned or key.startswith(assigned + ".")
        if whole and OmegaConf.is_dict(OmegaConf.select(source, key)):
            OmegaConf.update(cfg, key, {}, merge=False)
    return OmegaConf.merge(cfg, source)


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).split("\n")[0]
    if key and ":" in key:  # no key of the schema has one: a flow mapping without its space
        return f"key '{key}': YAML reads `{{a:1}}` as the one key 'a:1'; write `{{a: 1}}`"
    if "not in" in msg and key:
        return f"unknown key '{key}'{_did_you_mean(key)}"
    return f"key '{key}': {msg}" if key else msg


def _did_you_mean(key: str) -> str:
    """'; did you mean 'data.min_user_interactions'?' for the closest key of the schema beside `key`, or ''."""
    parent, _, name = key.rpartition(".")
    schema = OmegaConf.structured(Config)
    node = OmegaConf.select(schema, parent) if parent else schema
    if not OmegaConf.is_dict(node):
        return ""
    close = difflib.get_close_matches(name, [str(k) for k in node], n=1)
    return f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
