"""The generators: tiny builders, from_pretrained loading from a saved folder, batched generation."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from dppmg.config import Config, GeneratorConfig, load_config
from dppmg.device import sampling_precision
from dppmg.errors import DppmgError
from stage2_generation.generators import (
    MANIFEST_FILE,
    Generators,
    build_generators,
    build_text_tokenizer,
    build_tiny_image_pipeline,
    build_tiny_lm,
    generate_images,
    generate_texts,
    image_shape,
    load_generators,
    load_image_pipeline,
    load_text_generator,
    save_generators,
)
from stage2_generation.injection import HOLDER_NAME

TEXTS = [
    "This rustic red lamp in wood brings warmth to any kitchen.",
    "Minimalist ceramic black checked mirror for the home office.",
    "Add character to your bedroom with a bohemian spotted lamp crafted from porcelain.",
    "A modern blue striped cushion in cotton for the living room.",
    "Industrial green clock in steel, made for the bathroom.",
    "lamp",
    "mirror",
    "clock",
]
PROMPTS = ["red lamp", "a modern blue striped cushion in cotton for the", "clock"]
SIDE = 32
# Tiny sizes: every test here builds and runs these in well under a second.
TINY = GeneratorConfig(
    text_vocab=400,
    text_max_length=32,
    text_dim=32,
    text_layers=1,
    text_heads=2,
    image_size=SIDE,
    unet_channels=[16, 32],
    unet_heads=2,
    text_encoder_vocab=100,
    text_encoder_max_length=16,
    text_encoder_dim=32,
    text_encoder_layers=1,
    text_encoder_heads=2,
    text_encoder_from_scorer=False,  # tests with the scorer's text tower pass one explicitly
)


@pytest.fixture(scope="module")
def gen() -> Generators:
    return build_generators(TINY, TEXTS, seed=0)


@pytest.fixture(scope="module")
def saved(gen: Generators, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_generators(gen, tmp_path_factory.mktemp("gen") / "generators")


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- tokenizer ------------------------------------------------------------------------------------------


def test_text_tokenizer_round_trips_and_marks_the_start():
    tok = build_text_tokenizer(TEXTS, vocab_size=400, max_length=32)
    assert [tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2, 3]
    assert tok.model_max_length == 32
    # Byte-level: corpus texts, lower-cased words and unseen characters all come back exactly.
    for text in [*TEXTS, "red lamp, wooden mirror.", "Ünïcödé and spaces  twice", "zzz qqq"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    # The merges learned something: a frequent word is one token, not its letters.
    assert len(tok(" lamp", add_special_tokens=False)["input_ids"]) == 1


def test_text_tokenizer_is_deterministic_and_needs_texts():
    a = build_text_tokenizer(TEXTS, 400, 32)
    b = build_text_tokenizer(list(TEXTS), 400, 32)
    assert a.get_vocab() == b.get_vocab()
    with pytest.raises(DppmgError, match="non-empty"):
        build_text_tokenizer([None, ""], 400, 32)


# --- tiny LM --------------------------------------------------------------------------------------------


def test_tiny_lm_forward_loss_and_generate_shapes():
    tok = build_text_tokenizer(TEXTS, 400, TINY.text_max_length)
    lm = build_tiny_lm(tok, TINY, seed=0)
    assert lm.config.vocab_size == len(tok) and lm.config.n_positions == TINY.text_max_length
    ids = {"pad": tok.pad_token_id, "bos": tok.bos_token_id, "eos": tok.eos_token_id}
    for where in (lm.config, lm.generation_config):
        assert (where.pad_token_id, where.bos_token_id, where.eos_token_id) == tuple(ids.values())
    batch = tok(TEXTS[:3], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = lm(**batch, labels=labels)
    assert out.logits.shape == (*batch["input_ids"].shape, len(tok))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    # Untrained: the loss is near log(V), the uniform guess.
    assert abs(out.loss.item() - np.log(len(tok))) < 1.0
    gen = lm.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[0] == 3 and batch["input_ids"].shape[1] < gen.shape[1] <= batch["input_ids"].shape[1] + 5


def test_generate_texts_left_padding_gives_the_same_texts_as_one_by_one(gen: Generators):
    batched = generate_texts(gen.lm, gen.lm_tokenizer, PROMPTS, max_new_tokens=8, temperature=0)
    single = [
        generate_texts(gen.lm, gen.lm_tokenizer, [p], max_new_tokens=8, temperature=0)[0] for p in PROMPTS
    ]
    assert batched == single
    assert len(batched) == len(PROMPTS) and all(isinstance(t, str) for t in batched)


def test_generate_texts_is_reproducible_for_a_seed_and_keeps_the_mode(gen: Generators):
    gen.lm.train()
    try:
        args = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, batch_size=2)
        a = generate_texts(gen.lm, gen.lm_tokenizer, PROMPTS * 2, seed=1, **args)
        b = generate_texts(gen.lm, gen.lm_tokenizer, PROMPTS * 2, seed=1, **args)
        c = generate_texts(gen.lm, gen.lm_tokenizer, PROMPTS * 2, seed=2, **args)
        assert gen.lm.training  # switched to eval for generating, then back
    finally:
        gen.lm.eval()
    assert a == b and a != c


def test_sampled_texts_do_not_depend_on_the_batch_or_the_shard(gen: Generators):
    """Text i is drawn by its own generator (seed, i): a shard of the list, batched differently, gets the same
    texts as the whole list (what lets stage 2 split held-out pairs across processes)."""
    prompts = PROMPTS * 2
    args = dict(max_new_tokens=10, temperature=1.0, seed=4, progress=False)
    whole = generate_texts(gen.lm, gen.lm_tokenizer, prompts, batch_size=3, **args)
    odd = list(range(1, len(prompts), 2))
    shard = generate_texts(
        gen.lm, gen.lm_tokenizer, [prompts[i] for i in odd], batch_size=2, indices=odd, **args
    )
    assert shard == [whole[i] for i in odd]
    assert len(set(whole)) > 1


def test_generate_texts_refuses_a_prompt_that_does_not_fit(gen: Generators):
    with pytest.raises(DppmgError, match=r"exceeds the text generator's 32 positions"):
        generate_texts(gen.lm, gen.lm_tokenizer, ["lamp " * 20], max_new_tokens=20)


# --- tiny image pipeline ----------------------------------------------------------------------------------


def test_tiny_pipeline_structure(gen: Generators):
    pipe = gen.pipe
    assert pipe.vae is None and pipe.vae_scale_factor == 1
    assert pipe.unet.config.in_channels == pipe.unet.config.out_channels == 3
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    # Cross-attention below the full resolution only (16 px here), never at 32 px.
    assert not hasattr(pipe.unet.down_blocks[0], "attentions")
    assert all(len(b.attentions) > 0 for b in pipe.unet.down_blocks[1:])
    tok = pipe.tokenizer
    assert pipe.text_encoder.config.eos_token_id == tok.eos_token_id != 2
    assert tok.model_max_length == TINY.text_encoder_max_length
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.steps_offset == 1


@pytest.mark.parametrize("attention_levels", [0, 1, 2])
def test_attention_sits_at_the_lowest_resolution_levels_and_the_middle_block(attention_levels: int):
    cfg = dataclasses.replace(TINY, unet_channels=[8, 16, 16], unet_attention_levels=attention_levels)
    unet = build_tiny_image_pipeline(TEXTS, cfg).unet
    attended = [hasattr(b, "attentions") for b in unet.down_blocks]
    assert attended == [False] * (3 - attention_levels) + [True] * attention_levels
    assert [hasattr(b, "attentions") for b in unet.up_blocks] == attended[::-1]
    assert len(unet.mid_block.attentions) > 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_scheduler_predicts_what_the_config_says(prediction_type: str):
    pipe = build_tiny_image_pipeline(TEXTS, dataclasses.replace(TINY, prediction_type=prediction_type))
    assert pipe.scheduler.config.prediction_type == prediction_type
    assert generate_images(pipe, PROMPTS[:1], steps=2).shape == (1, SIDE, SIDE, 3)


def test_tiny_scheduler_clips_the_predicted_image(gen: Generators):
    # thresholding with sample_max_value=1 is plain clipping to [-1, 1] (the module docstring says why).
    x0 = torch.randn(2, 3, 8, 8) * 3
    clipped = gen.pipe.scheduler._threshold_sample(x0.clone())
    assert torch.equal(clipped, x0.clamp(-1, 1))


def test_generate_images_shapes_and_per_image_seeds(gen: Generators):
    images = generate_images(gen.pipe, PROMPTS, steps=2, guidance=3.0, seed=0, batch_size=2)
    assert images.shape == (len(PROMPTS), SIDE, SIDE, 3) and images.dtype == np.uint8
    assert images.std() > 0  # not a constant image
    # Image i's noise depends on (seed, i) only: a different batch size gives (numerically) the same image.
    again = generate_images(gen.pipe, PROMPTS, steps=2, guidance=3.0, seed=0, batch_size=3)
    assert np.abs(images.astype(int) - again.astype(int)).max() <= 1
    other = generate_images(gen.pipe, PROMPTS[:1], steps=2, guidance=3.0, seed=1)
    assert np.abs(other[0].astype(int) - images[0].astype(int)).mean() > 1
    assert generate_images(gen.pipe, [], steps=2).shape == (0, SIDE, SIDE, 3)


def test_bf16_sampling_stays_close_to_fp32_and_keeps_the_sampler_in_fp32(gen: Generators, monkeypatch):
    seen = []
    step = gen.pipe.scheduler.step

    def watched(model_output, t, sample, *args, **kwargs):
        seen.append((model_output.dtype, sample.dtype))
        return step(model_output, t, sample, *args, **kwargs)

    monkeypatch.setattr(gen.pipe.scheduler, "step", watched)
    kwargs = {"steps": 4, "guidance": 1.5, "seed": 0, "progress": False}
    fp32 = generate_images(gen.pipe, PROMPTS, **kwargs, precision="fp32").astype(int)
    assert set(seen) == {(torch.float32, torch.float32)}
    seen.clear()
    bf16 = generate_images(gen.pipe, PROMPTS, **kwargs, precision="bf16").astype(int)
    # The UNet answers in bfloat16; the DDIM update and the sample it keeps stay float32.
    assert set(seen) == {(torch.bfloat16, torch.float32)}
    assert bf16.shape == fp32.shape
    assert 0 < np.abs(bf16 - fp32).mean() < 4  # of 255: the same images, to bfloat16's rounding
    assert not torch.is_autocast_enabled("cpu")  # the block ended with the call


def test_sampling_precision_auto_means_bf16_only_on_a_cpu_with_amx(monkeypatch):
    assert sampling_precision("fp32") == "fp32" and sampling_precision("bf16", "cuda") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert sampling_precision("auto", "cpu") == "bf16"
    assert sampling_precision("auto", torch.device("cuda", 0)) == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert sampling_precision("auto") == "fp32"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the private check
    assert sampling_precision("auto") == "fp32"


def test_config_names_a_bad_precision():
    with pytest.raises(
        DppmgError, match=r"stage2\.generation\.precision='fp16' is not one of: auto, fp32, bf16"
    ):
        load_config(None, ["stage2.generation.precision=fp16"])


# --- building, saving, loading ------------------------------------------------------------------------------


def test_build_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_generators(TINY, TEXTS, seed=5)
    assert torch.equal(torch.rand(3), expected)
    b = build_generators(TINY, TEXTS, seed=5)
    c = build_generators(TINY, TEXTS, seed=6)
    for part in (lambda g: g.lm, lambda g: g.pipe.unet, lambda g: g.pipe.text_encoder):
        assert same_state(part(a), part(b))
        assert not same_state(part(a), part(c))
    assert a.lm_tokenizer.get_vocab() == b.lm_tokenizer.get_vocab()
    assert a.pipe.tokenizer.get_vocab() == b.pipe.tokenizer.get_vocab()
    assert a.info == {"text": "tiny", "image": "tiny", "seed": 5}


def test_save_then_load_gives_the_same_generations(gen: Generators, saved: Path):
    assert (saved / MANIFEST_FILE).is_file()
    loaded = load_generators(saved)
    assert loaded.info == gen.info
    assert same_state(loaded.lm, gen.lm) and same_state(loaded.pipe.unet, gen.pipe.unet)
    assert loaded.lm_tokenizer.get_vocab() == gen.lm_tokenizer.get_vocab()
    args = dict(max_new_tokens=8, temperature=1.0, seed=3)
    assert generate_texts(loaded.lm, loaded.lm_tokenizer, PROMPTS, **args) == generate_texts(
        gen.lm, gen.lm_tokenizer, PROMPTS, **args
    )
    img = dict(steps=2, guidance=3.0, seed=4)
    np.testing.assert_array_equal(
        generate_images(loaded.pipe, PROMPTS, **img), generate_images(gen.pipe, PROMPTS, **img)
    )


def test_build_generators_loads_named_models(saved: Path):
    cfg = dataclasses.replace(TINY, text_model=str(saved / "text"), image_pipeline=str(saved / "image"))
    named = build_generators(cfg, texts=["unused"], seed=99)
    assert named.info == {"text": str(saved / "text"), "image": str(saved / "image"), "seed": 99}
    # The saved tokenizers, not ones built from "unused".
    assert "lamp" in named.pipe.tokenizer.get_vocab() and len(named.lm_tokenizer) > 260


def test_missing_or_unloadable_sources_name_the_path(tmp_path: Path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(DppmgError, match=f"text model not found: {missing}"):
        load_text_generator(missing)
    with pytest.raises(DppmgError, match=f"image generator not found: {missing}"):
        load_image_pipeline(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DppmgError, match=f"cannot load the text model '{empty}'"):
        load_text_generator(empty)
    with pytest.raises(DppmgError, match=f"cannot load the image generator '{empty}'"):
        load_image_pipeline(empty)
    with pytest.raises(DppmgError, match=f"{empty}: not a saved generators folder"):
        load_generators(empty)
    # A hub id that is not cached, with the hub offline (conftest sets HF_HUB_OFFLINE=1).
    with pytest.raises(DppmgError, match="cannot load the text model 'dppmg-test/no-such-model'"):
        load_text_generator("dppmg-test/no-such-model")


def test_save_refuses_generators_with_injected_tokens(tmp_path: Path):
    g = build_generators(TINY, TEXTS, seed=0)
    g.lm.get_input_embeddings().add_module(HOLDER_NAME, torch.nn.Module())  # what inject_tokens attaches
    with pytest.raises(DppmgError, match="injected preference tokens"):
        save_generators(g, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_non_square_pipeline_makes_and_saves_images_of_its_shape(tmp_path: Path):
    tall = dataclasses.replace(TINY, image_size=16, image_height=24)  # 2:3, like a poster
    gen = build_generators(tall, TEXTS, seed=0)
    assert image_shape(gen.pipe) == (24, 16)
    images = generate_images(gen.pipe, PROMPTS, steps=2, guidance=1.0, progress=False)
    assert images.shape == (3, 24, 16, 3) and images.dtype == np.uint8
    assert generate_images(gen.pipe, [], steps=2, progress=False).shape == (0, 24, 16, 3)
    loaded = load_generators(save_generators(gen, tmp_path / "tall"))
    assert image_shape(loaded.pipe) == (24, 16)
    again = generate_images(loaded.pipe, PROMPTS, steps=2, guidance=1.0, progress=False)
    assert np.array_equal(images, again)


def test_a_named_text_model_is_not_copied_into_a_saved_folder_and_loads_by_name(
    gen: Generators, saved: Path, tmp_path: Path
):
    folder = save_generators(gen, tmp_path / "by-name", text_source=str(saved / "text"))
    assert not (folder / "text").exists()
    loaded = load_generators(folder)
    ids = torch.tensor([[2, 10, 11]])
    assert torch.equal(loaded.lm(ids).logits, gen.lm(ids).logits)


def test_tiny_image_pipeline_needs_texts():
    with pytest.raises(DppmgError, match="non-empty"):
        build_tiny_image_pipeline([], TINY)


# --- config ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_size": 24, "unet_channels": [16, 32, 64, 64, 64]}, "divisible by 2\\^4"),
        ({"image_size": 20, "unet_channels": [16, 32]}, "multiple of 8"),
        ({"unet_channels": [32]}, "at least two"),
        ({"unet_heads": 3}, "unet_heads"),
        ({"text_dim": 30, "text_heads": 4}, "text_dim"),
        ({"text_layers": 0}, "text_layers must be >= 1"),
        ({"beta_schedule": "cosine"}, "beta_schedule"),
        ({"unet_attention_levels": 3}, "unet_attention_levels must be in \\[0, 2\\]"),
        # With no attention level the middle block still attends, at the last level's width.
        ({"unet_attention_levels": 0, "unet_channels": [32, 64, 90]}, "divide the channels \\[90\\]"),
        ({"prediction_type": "x0"}, "prediction_type"),
        ({"image_height": 20}, "image_height \\(20\\) must be a multiple of 8"),
        ({"image_height": 0}, "image_height must be >= 1"),
        ({"dtype": "float64"}, "dtype"),
    ],
)
def test_config_rejects_bad_generator_sizes(changes: dict, message: str):
    cfg = Config()
    cfg.stage2.generators = dataclasses.replace(cfg.stage2.generators, **changes)
    with pytest.raises(DppmgError, match=message):
        cfg.validate()


def test_default_generator_config_is_valid():
    cfg = Config().validate()
    assert cfg.stage2.generators.image_pipeline is None and cfg.stage2.generators.unet_channels == [
        32,
        64,
        128,
    ]
