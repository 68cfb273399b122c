"""Token injection into a tiny GPT-2 (text tokens) and a tiny CLIP text encoder (image tokens)."""

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import assert_generate_never_emits
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from dppmg.errors import DppmgError
from dppmg.tokens import TokenCheckpoint, save_token_checkpoint
from stage2_generation.injection import (
    EXPANSIONS_FILE,
    MASKED_LOGIT,
    README_FILE,
    TEXT_ROWS_FILE,
    TEXTUAL_INVERSION_FILE,
    InjectedTokens,
    export_image_tokens,
    export_text_tokens,
    inject_tokens,
    load_exported_tokens,
    load_injected,
    save_injected,
    saved_word_pieces,
    trainable_parameters,
)

WORDS = ["[UNK]", "[PAD]", "[BOS]", "[EOS]", "a", "red", "blue", "wooden", "small", "lamp", "chair", "table"]
PAD, BOS, EOS = 1, 2, 3
SIZES = {"text": (2, 8, 4), "image": (3, 8, 6)}  # modality -> (levels L, codebook size K, codebook dim d)
K = 8
HASH = "feedbeef00000000"
USERS = 4
MAX_LEN = 16
MODALITIES = ["text", "image"]  # text tokens go into the GPT-2, image tokens into the CLIP text encoder
PREFIX = {"text": "pt", "image": "pi"}


# --- fixtures: tiny models, their tokenizer, a token checkpoint -------------------------------------------


def make_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=MAX_LEN,
    )


def make_model(modality: str) -> PreTrainedModel:
    torch.manual_seed(0)
    ids = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}
    if modality == "text":
        config = GPT2Config(vocab_size=len(WORDS), n_positions=32, n_embd=32, n_layer=2, n_head=2, **ids)
        return GPT2LMHeadModel(config).eval()
    config = CLIPTextConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LEN,
        **ids,
    )
    return CLIPTextModel(config).eval()


def save_ckpt(folder: Path, content_hash: str = HASH, sizes: dict = SIZES, seed: int = 0) -> TokenCheckpoint:
    g = torch.Generator().manual_seed(seed)
    save_token_checkpoint(
        folder,
        codebooks={m: torch.randn(L, k, d, generator=g) for m, (L, k, d) in sizes.items()},
        codes={m: torch.randint(0, k, (USERS, L), generator=g) for m, (L, k, _) in sizes.items()},
        user_vectors={m: torch.randn(USERS, d, generator=g) for m, (_, _, d) in sizes.items()},
        user_ids=[f"u{i}" for i in range(USERS)],
        dataset={"name": "tiny", "path": str(folder / "none"), "content_hash": content_hash},
        config={},
    )
    return TokenCheckpoint.load(folder)


@pytest.fixture
def ckpt(tmp_path) -> TokenCheckpoint:
    return save_ckpt(tmp_path / "tokens")


def injected_pair(ckpt: TokenCheckpoint, modality: str, **kwargs):
    model, tokenizer = make_model(modality), make_tokenizer()
    inj = inject_tokens(model, tokenizer, ckpt, modality, content_hash=HASH, **kwargs)
    return model, tokenizer, inj


def prompt(modality: str) -> str:
    p = PREFIX[modality]
    return f"<{p}_0_3><{p}_1_7> lamp"


def encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


def output(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the LM, last hidden state of the text encoder."""
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def randomize(inj: InjectedTokens, seed: int = 1) -> None:
    """Move the token parameters away from their initialisation, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in inj.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


# --- tokenizer and rows --------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", MODALITIES)
def test_tokens_are_added_whole_with_consecutive_ids(ckpt, modality):
    model, tokenizer, inj = injected_pair(ckpt, modality)
    L, _, _ = SIZES[modality]
    assert inj.token_strings == ckpt.token_strings(modality)
    assert inj.token_ids.tolist() == list(range(len(WORDS), len(WORDS) + L * K))
    assert tokenizer.convert_tokens_to_ids(inj.token_strings) == inj.token_ids.tolist()
    # level-major: token (l, k) is entry l*K + k
    assert tokenizer(prompt(modality))["input_ids"] == [
        int(inj.token_ids[0 * K + 3]),
        int(inj.token_ids[1 * K + 7]),
        WORDS.index("lamp"),
    ]
    assert model.get_input_embeddings().num_embeddings == len(WORDS) + L * K
    assert tokenizer.decode(encode(tokenizer, prompt(modality))[0], skip_special_tokens=True) == "lamp"


@pytest.mark.parametrize("modality", MODALITIES)
def test_new_rows_are_the_projected_codebook_and_old_rows_are_unchanged(ckpt, modality):
    model, tokenizer = make_model(modality), make_tokenizer()
    table = model.get_input_embeddings().weight.detach().clone()
    inj = inject_tokens(model, tokenizer, ckpt, modality, content_hash=HASH)
    randomize(inj)  # a non-zero offset, so that the check covers it
    embedding = model.get_input_embeddings()

    book = ckpt.codebooks[modality]  # [L, K, d]
    scale = book.norm(dim=-1).mean(dim=1)  # [L]
    x = (book / scale[:, None, None]).reshape(-1, book.shape[-1])
    expected = x @ inj.projection.weight.T + inj.projection.bias + inj.offset
    new = embedding(inj.token_ids[None])[0]
    assert torch.equal(new, inj.rows())
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-6)

    old_ids = torch.arange(len(WORDS))
    assert torch.equal(embedding(old_ids[None])[0], table)
    assert torch.equal(embedding.weight[: len(WORDS)], table)
    # a prompt mixing both kinds of ids gets each from its own source
    mixed = embedding(encode(tokenizer, prompt(modality)))[0]
    assert torch.equal(mixed[0], inj.rows()[3]) and torch.equal(mixed[1], inj.rows()[K + 7])
    assert torch.equal(mixed[2], table[WORDS.index("lamp")])


@pytest.mark.parametrize("modality", MODALITIES)
def test_new_rows_start_at_the_scale_of_the_existing_rows(ckpt, modality):
    model, _, inj = injected_pair(ckpt, modality)
    table = model.get_input_embeddings().weight.detach()[: len(WORDS)]
    mean = table.mean(dim=0)
    assert torch.equal(inj.offset, torch.zeros_like(inj.offset))
    torch.testing.assert_close(inj.projection.bias.detach(), mean)
    spread = (table - mean).norm(dim=1).mean()
    torch.testing.assert_close((inj.rows() - mean).norm(dim=1).mean(), spread)
    ratio = inj.rows().detach().norm(dim=1).mean() / table.norm(dim=1).mean()
    assert 0.5 < float(ratio) < 2.0


def test_the_seed_alone_sets_the_initial_rows(ckpt):
    """Whatever ran before (a warm-start, a cache load) must not change the rows: runs are then comparable."""
    rows = {}
    for global_seed, seed in ((1, 3), (2, 3), (1, 4)):
        model, tokenizer = make_model("text"), make_tokenizer()
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        inj = inject_tokens(model, tokenizer, ckpt, "text", content_hash=HASH, seed=seed)
        rows[global_seed, seed] = inj.rows().detach()
        assert torch.equal(torch.get_rng_state(), state)  # the global generator was left where it was
    assert torch.equal(rows[1, 3], rows[2, 3])
    assert not torch.equal(rows[1, 3], rows[1, 4])


# --- freezing --------------------------------------------------------------------------------------------


def loss_of(model: PreTrainedModel, ids: torch.Tensor, modality: str) -> torch.Tensor:
    if modality == "text":
        labels = ids.clone()
        labels[:, :2] = -100  # the preference tokens are the prompt, not targets
        return model(input_ids=ids, labels=labels).loss
    return model(input_ids=ids).last_hidden_state.pow(2).mean()


@pytest.mark.parametrize("modality", MODALITIES)
def test_a_training_step_changes_the_token_parameters_and_nothing_else(ckpt, modality):
    model, tokenizer = make_model(modality), make_tokenizer()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    inj = inject_tokens(model, tokenizer, ckpt, modality, content_hash=HASH)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    optimizer = torch.optim.Adam(trainable_parameters([inj]), lr=1e-2)
    ids = encode(tokenizer, prompt(modality) + " a red table")
    loss_of(model, ids, modality).backward()
    optimizer.step()
    after = model.state_dict()

    token_keys = {n for n, p in model.named_parameters() if any(p is q for q in inj.parameters())}
    assert len(token_keys) == 3  # projection weight and bias, offset
    assert {n for n, p in model.named_parameters() if p.requires_grad} == token_keys
    assert all(p.grad is None for n, p in model.named_parameters() if n not in token_keys)
    assert set(after) == set(before)
    for key in after:
        if key in token_keys:
            assert not torch.equal(after[key], before[key]), f"{key} did not train"
        else:
            assert torch.equal(after[key], before[key]), f"{key} changed"
    # and injection itself kept every pre-existing value (the table only grew)
    for key, value in original.items():
        assert torch.equal(after[key][: value.shape[0]], value), f"{key} differs from the original model"


@pytest.mark.parametrize("tied", [True, False])
def test_two_modalities_in_one_model_train_and_mask_together(ckpt, tied):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=1, n_head=2, tie_word_embeddings=tied)
    model, tokenizer = GPT2LMHeadModel(config).eval(), make_tokenizer()
    text = inject_tokens(model, tokenizer, ckpt, "text", content_hash=HASH)
    image = inject_tokens(model, tokenizer, ckpt, "image", content_hash=HASH)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    assert int(image.token_ids[0]) == int(text.token_ids[-1]) + 1
    assert {p for p in model.parameters() if p.requires_grad} == set(trainable_parameters([text, image]))
    embedding = model.get_input_embeddings()
    both = embedding(encode(tokenizer, "<pt_0_3><pi_2_5> lamp"))[0]
    assert torch.equal(both[0], text.rows()[3]) and torch.equal(both[1], image.rows()[2 * K + 5])
    assert torch.equal(embedding(encode(tokenizer, "<pi_1_2>"))[0, 0], image.rows()[K + 2])
    # the untied head is a new module after the second resize: both modalities must still be masked
    logits = model(input_ids=encode(tokenizer, "<pt_0_3> lamp")).logits
    assert (logits[..., text.token_ids] == MASKED_LOGIT).all()
    assert (logits[..., image.token_ids] == MASKED_LOGIT).all()
    assert (logits[..., : len(WORDS)] != MASKED_LOGIT).all()


def test_a_deep_copy_has_its_own_token_rows(ckpt):
    model, tokenizer, inj = injected_pair(ckpt, "text")
    ids = encode(tokenizer, prompt("text"))
    twin = copy.deepcopy(model)
    assert torch.equal(output(twin, ids), output(model, ids))
    with torch.no_grad():
        twin.get_input_embeddings().preference_tokens.rows["text"].offset.add_(1.0)
    assert not torch.equal(output(twin, ids), output(model, ids))
    assert torch.equal(model.get_input_embeddings()(inj.token_ids[None])[0], inj.rows())


class ScaledEmbedding(torch.nn.Embedding):
    """Like Gemma's input embeddings: the looked-up rows times a constant."""

    embed_scale = 3.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


def scaled_model() -> PreTrainedModel:
    model = make_model("text")
    scaled = ScaledEmbedding(len(WORDS), 32)
    scaled.weight = model.get_input_embeddings().weight  # the same parameter, still tied to the head
    model.set_input_embeddings(scaled)
    return model


def test_a_scaling_embedding_scales_the_rows_as_its_table_rows(tmp_path, ckpt):
    model, tokenizer = scaled_model(), make_tokenizer()
    inj = inject_tokens(model, tokenizer, ckpt, "text", content_hash=HASH)
    randomize(inj)
    torch.testing.assert_close(model.get_input_embeddings()(inj.token_ids[None])[0], 3.0 * inj.rows())
    # so the exported rows, written into the table of a plain scaled model, give the same outputs
    path = export_text_tokens(inj, tokenizer, tmp_path / "export")
    plain, fresh_tokenizer = scaled_model(), make_tokenizer()
    load_exported_tokens(plain, fresh_tokenizer, path)
    ids = encode(tokenizer, prompt("text"))
    old = torch.arange(len(WORDS))
    torch.testing.assert_close(output(plain, ids)[..., old], output(model, ids)[..., old])


# --- the LM head ------------------------------------------------------------------------------------------


def test_generate_never_emits_a_preference_token(ckpt):
    model, tokenizer, inj = injected_pair(ckpt, "text")
    new = set(inj.token_ids.tolist())
    # Make the new tokens the head's favourites: their (tied) rows and the final LayerNorm's bias point the
    # same way. Without the mask they would win every step.
    with torch.no_grad():
        direction = torch.zeros(32)
        direction[0] = 10.0
        model.get_input_embeddings().weight[inj.token_ids] = direction
        model.transformer.ln_f.bias.copy_(direction)
    ids = encode(tokenizer, prompt("text") + " a")
    out = model(input_ids=ids, output_hidden_states=True)
    unmasked = out.hidden_states[-1] @ model.lm_head.weight.T  # [1, T, V]
    assert int(unmasked[0, -1].argmax()) in new
    assert (out.logits[..., inj.token_ids] == MASKED_LOGIT).all()
    old = torch.arange(len(WORDS))
    assert torch.equal(out.logits[..., old], unmasked[..., old])

    assert_generate_never_emits(model, ids, new)


# --- refusing a checkpoint that does not fit --------------------------------------------------------------


def test_refuses_a_checkpoint_from_another_dataset(ckpt):
    model, tokenizer = make_model("text"), make_tokenizer()
    with pytest.raises(DppmgError, match="dataset hash") as err:
        inject_tokens(model, tokenizer, ckpt, "text", content_hash="0123456789abcdef")
    assert HASH in str(err.value) and "0123456789abcdef" in str(err.value)
    assert len(tokenizer) == len(WORDS)  # nothing was changed
    assert model.get_input_embeddings().num_embeddings == len(WORDS)


@pytest.mark.parametrize(
    ("expect", "message"),
    [
        ({"levels": {"text": 3}}, "levels of text: checkpoint has 2, expected 3"),
        ({"codebook_size": {"text": 16}}, "codebook_size of text: checkpoint has 8, expected 16"),
    ],
)
def test_refuses_a_checkpoint_of_other_sizes(ckpt, expect, message):
    model, tokenizer = make_model("text"), make_tokenizer()
    with pytest.raises(DppmgError, match=message):
        inject_tokens(model, tokenizer, ckpt, "text", content_hash=HASH, expect=expect)
    assert len(tokenizer) == len(WORDS)


def test_refuses_a_missing_modality_and_a_second_injection(tmp_path, ckpt):
    text_only = save_ckpt(tmp_path / "text-only", sizes={"text": SIZES["text"]})
    model, tokenizer = make_model("text"), make_tokenizer()
    with pytest.raises(DppmgError, match=r"missing \['image'\]"):
        inject_tokens(model, tokenizer, text_only, "image", content_hash=HASH)
    inject_tokens(model, tokenizer, ckpt, "text", content_hash=HASH)
    with pytest.raises(DppmgError, match="already injected"):
        inject_tokens(model, tokenizer, ckpt, "text", content_hash=HASH)
    with pytest.raises(DppmgError, match="already has 16 of the text token strings"):
        inject_tokens(make_model("text"), tokenizer, ckpt, "text", content_hash=HASH)


# --- saving, loading, exporting ----------------------------------------------------------------------------


@pytest.mark.parametrize("modality", MODALITIES)
def test_saved_token_parameters_load_into_a_fresh_injection(tmp_path, ckpt, modality):
    model, tokenizer, inj = injected_pair(ckpt, modality)
    randomize(inj)
    save_injected(tmp_path / "tokens.safetensors", [inj])
    assert set(load_file(tmp_path / "tokens.safetensors")) == {
        f"{modality}.projection.weight",
        f"{modality}.projection.bias",
        f"{modality}.offset",
    }

    torch.manual_seed(123)  # another initialisation, which loading must overwrite
    fresh_model, fresh_tokenizer = make_model(modality), make_tokenizer()
    fresh = inject_tokens(fresh_model, fresh_tokenizer, ckpt, modality, content_hash=HASH)
    assert not torch.equal(fresh.rows(), inj.rows())
    params = fresh.parameters()
    load_injected(tmp_path / "tokens.safetensors", [fresh])
    assert all(p is q for p, q in zip(fresh.parameters(), params))  # loaded in place
    assert torch.equal(fresh.rows(), inj.rows())
    ids = encode(tokenizer, prompt(modality))
    assert torch.equal(output(fresh_model, ids), output(model, ids))


def test_loading_refuses_parameters_of_other_tokens(tmp_path, ckpt):
    _, _, inj = injected_pair(ckpt, "text")
    save_injected(tmp_path / "tokens.safetensors", [inj])
    other = save_ckpt(tmp_path / "other", content_hash="0000111122223333")
    model, tokenizer = make_model("text"), make_tokenizer()
    elsewhere = inject_tokens(model, tokenizer, other, "text", content_hash="0000111122223333")
    with pytest.raises(DppmgError, match=f"content_hash: file has {HASH}, model has 0000111122223333"):
        load_injected(tmp_path / "tokens.safetensors", [elsewhere])
    _, _, image = injected_pair(ckpt, "image")
    with pytest.raises(DppmgError, match="not 'image'"):
        load_injected(tmp_path / "tokens.safetensors", [image])


def test_image_export_loads_with_diffusers_textual_inversion(tmp_path, ckpt):
    from diffusers.loaders import TextualInversionLoaderMixin

    class Loader(TextualInversionLoaderMixin):  # the part of a pipeline that load_textual_inversion uses
        hf_device_map = None
        components: dict = {}

    model, tokenizer, inj = injected_pair(ckpt, "image")
    randomize(inj)
    ids = encode(tokenizer, prompt("image"))
    expected = output(model, ids)
    path = export_image_tokens(inj, tmp_path / "export" / "image")
    assert path.name == TEXTUAL_INVERSION_FILE and (path.parent / README_FILE).is_file()
    rows = load_file(path)
    assert set(rows) == set(inj.token_strings)
    assert torch.equal(rows["<pi_1_7>"], inj.rows()[K + 7].detach())

    encoder, fresh_tokenizer = make_model("image"), make_tokenizer()
    Loader().load_textual_inversion(
        list(rows.values()), token=list(rows), tokenizer=fresh_tokenizer, text_encoder=encoder
    )  # as the export's README says
    assert torch.equal(output(encoder, encode(fresh_tokenizer, prompt("image"))), expected)

    encoder, fresh_tokenizer = make_model("image"), make_tokenizer()
    loaded = load_exported_tokens(encoder, fresh_tokenizer, path)
    assert loaded.tolist() == inj.token_ids.tolist()  # the metadata keeps the level-major order
    assert torch.equal(output(encoder, encode(fresh_tokenizer, prompt("image"))), expected)


def test_text_export_loads_into_a_plain_language_model(tmp_path, ckpt):
    model, tokenizer, inj = injected_pair(ckpt, "text")
    randomize(inj)
    ids = encode(tokenizer, prompt("text") + " a red")
    old = torch.arange(len(WORDS))
    expected = output(model, ids)[..., old]
    folder = tmp_path / "export" / "text"
    path = export_text_tokens(inj, tokenizer, folder)
    assert path == folder / TEXT_ROWS_FILE and (folder / README_FILE).is_file()
    assert set(load_file(path)) == set(inj.token_strings)

    fresh_tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    assert encode(fresh_tokenizer, prompt("text") + " a red").tolist() == ids.tolist()
    plain = make_model("text")
    loaded = load_exported_tokens(plain, fresh_tokenizer, path)
    assert not hasattr(plain.get_input_embeddings(), "preference_tokens")  # a plain model, no hooks
    assert torch.equal(output(plain, ids)[..., old], expected)
    assert plain.generation_config.suppress_tokens == loaded.tolist()
    generated = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert not set(loaded.tolist()) & set(generated[0, ids.shape[1] :].tolist())


# --- code words: level-0 codes spelt with several rows ------------------------------------------------------

PIECES = {3: [WORDS.index("red"), WORDS.index("wooden")], 5: [WORDS.index("blue")]}  # level-0 code -> ids


def test_word_rows_start_as_their_words_and_spell_the_level0_code(ckpt):
    model, tokenizer, inj = injected_pair(ckpt, "text", word_pieces=PIECES)
    L, _, _ = SIZES["text"]
    words = ["<pt_0_3_w0>", "<pt_0_3_w1>", "<pt_0_5_w0>"]
    assert inj.token_strings == ckpt.token_strings("text") + words
    assert inj.token_ids.tolist() == list(range(len(WORDS), len(WORDS) + L * K + 3))
    assert inj.expansions() == {"<pt_0_3>": "<pt_0_3_w0><pt_0_3_w1>", "<pt_0_5>": "<pt_0_5_w0>"}
    # The prompt holds the level-0 code alone: its words, or its own token when it has none.
    assert inj.prompt([3, 7]) == "<pt_0_3_w0><pt_0_3_w1>"
    assert inj.prompt([2, 7]) == "<pt_0_2>"
    # Before training, the rows are the words' embeddings: the LM reads the spelt code as the words themselves.
    spelt, plain = encode(tokenizer, inj.prompt([3, 7]) + " lamp"), encode(tokenizer, "red wooden lamp")
    assert spelt[0, :2].tolist() == inj.token_ids[L * K : L * K + 2].tolist()
    with torch.no_grad():
        assert torch.equal(output(model, spelt)[..., : len(WORDS)], output(model, plain)[..., : len(WORDS)])
    assert any(p is inj.module.word_rows for p in inj.parameters())
    generated = model.generate(
        spelt, attention_mask=torch.ones_like(spelt), max_new_tokens=6, do_sample=False
    )
    assert not set(inj.token_ids.tolist()) & set(generated[0, spelt.shape[1] :].tolist())

    _, _, plain_inj = injected_pair(ckpt, "text")
    assert plain_inj.prompt([3, 7]) == "<pt_0_3><pt_1_7>" and plain_inj.expansions() == {}
    with pytest.raises(DppmgError, match="level-0 code 9"):
        injected_pair(ckpt, "text", word_pieces={9: [4]})


def test_word_rows_save_load_and_refuse_other_spellings(tmp_path, ckpt):
    model, tokenizer, inj = injected_pair(ckpt, "text", word_pieces=PIECES)
    randomize(inj)
    save_injected(tmp_path / "tokens.safetensors", [inj])
    assert "text.word_rows" in load_file(tmp_path / "tokens.safetensors")
    fresh_model, _, fresh = injected_pair(ckpt, "text", word_pieces=PIECES)
    load_injected(tmp_path / "tokens.safetensors", [fresh])
    assert torch.equal(fresh.rows(), inj.rows())
    ids = encode(tokenizer, inj.prompt([3, 7]) + " lamp")
    assert torch.equal(output(fresh_model, ids), output(model, ids))
    for other in (None, {3: PIECES[3]}, {3: PIECES[3][::-1], 5: PIECES[5]}):  # the same count, other words
        _, _, elsewhere = injected_pair(ckpt, "text", word_pieces=other)
        with pytest.raises(DppmgError, match="word_pieces: file has"):
            load_injected(tmp_path / "tokens.safetensors", [elsewhere])
    # The file says how its tokens were spelt, so a finished run is rebuilt as it was trained.
    assert saved_word_pieces(tmp_path / "tokens.safetensors") == PIECES
    _, _, plain = injected_pair(ckpt, "text")
    save_injected(tmp_path / "plain.safetensors", [plain])
    assert saved_word_pieces(tmp_path / "plain.safetensors") is None


def test_text_export_with_word_rows_says_how_to_spell_the_codes(tmp_path, ckpt):
    model, tokenizer, inj = injected_pair(ckpt, "text", word_pieces=PIECES)
    randomize(inj)
    ids = encode(tokenizer, inj.prompt([3, 7]) + " lamp")
    expected = output(model, ids)[..., : len(WORDS)]
    folder = tmp_path / "export"
    path = export_text_tokens(inj, tokenizer, folder)
    spelt = json.loads((folder / EXPANSIONS_FILE).read_text())
    assert spelt == inj.expansions()
    assert EXPANSIONS_FILE in (folder / README_FILE).read_text()
    # As the README says: a plain model, the rows written in, the level-0 token replaced by its spelling.
    fresh_tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    plain = make_model("text")
    load_exported_tokens(plain, fresh_tokenizer, path)
    ids_plain = encode(fresh_tokenizer, spelt.get("<pt_0_3>", "<pt_0_3>") + " lamp")
    assert ids_plain.tolist() == ids.tolist()
    assert torch.equal(output(plain, ids_plain)[..., : len(WORDS)], expected)
    # Without word rows there is no spelling file.
    _, tokenizer, inj = injected_pair(ckpt, "text")
    export_text_tokens(inj, tokenizer, tmp_path / "plain")
    assert not (tmp_path / "plain" / EXPANSIONS_FILE).exists()


def test_image_export_with_word_rows_loads_with_diffusers_and_says_how_to_spell_the_codes(tmp_path, ckpt):
    from diffusers.loaders import TextualInversionLoaderMixin

    class Loader(TextualInversionLoaderMixin):
        hf_device_map = None
        components: dict = {}

    model, tokenizer, inj = injected_pair(ckpt, "image", word_pieces=PIECES)
    randomize(inj)
    text = inj.prompt([3, 7, 1]) + " lamp"
    assert text.startswith("<pi_0_3_w0><pi_0_3_w1>")
    expected = output(model, encode(tokenizer, text))
    folder = tmp_path / "export"
    path = export_image_tokens(inj, folder)
    spelt = json.loads((folder / EXPANSIONS_FILE).read_text())
    assert spelt == inj.expansions() and EXPANSIONS_FILE in (folder / README_FILE).read_text()
    rows = load_file(path)
    encoder, fresh_tokenizer = make_model("image"), make_tokenizer()
    Loader().load_textual_inversion(
        list(rows.values()), token=list(rows), tokenizer=fresh_tokenizer, text_encoder=encoder
    )  # as the export's README says, then the level-0 token replaced by its spelling
    ids = encode(fresh_tokenizer, spelt.get("<pi_0_3>", "<pi_0_3>") + " lamp")
    assert torch.equal(output(encoder, ids), expected)
    _, _, plain = injected_pair(ckpt, "image")
    export_image_tokens(plain, tmp_path / "plain")
    assert not (tmp_path / "plain" / EXPANSIONS_FILE).exists()
