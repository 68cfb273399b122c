"""dppmg/models.py and dppmg/image_encoder.py on tiny stand-ins: no real weights are read.

A tiny random Llama with a small byte-level BPE tokenizer is written to a GGUF file the way llama.cpp writes one
(q/k permuted, float32 tensors, tokenizer metadata), so that loading it back must reproduce the model exactly.
The image encoder is the untrained EfficientNet-Lite0 (`weights=None`).
"""

import importlib.machinery
import importlib.util
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import assert_generate_never_emits, text_token_checkpoint
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dppmg.errors import DppmgError
from dppmg.image_encoder import (
    EfficientNetEncoder,
    as_pixels01,
    build_image_encoder,
    encode_image_files,
)
from dppmg.models import (
    SOURCE_FILE,
    dequantized_folder,
    load_causal_lm,
    packaged,
    prepare_models,
    resolve_causal_lm,
)
from dppmg.tokens import TokenCheckpoint
from stage2_generation.injection import MASKED_LOGIT, inject_tokens, trainable_parameters

# The tiny Llama, shaped like SmolLM2: tied embeddings, grouped-query attention, ChatML special tokens 0, 1, 2.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
UNK, BOS, EOS = 0, 1, 2
LAYERS, HIDDEN, HEADS, KV_HEADS, FFN = 2, 32, 4, 2, 64
POSITIONS = 64
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "a small red lamp on a wooden table",
    "the blue chair is comfortable, and the lamp is bright",
    "Hello world! 123 numbers and ünïcödé letters.",
]
SAMPLE = "Hello, a small red lamp! 123 ünïcödé"
CHAT_SAMPLE = "<|im_start|>user\nthe blue chair<|im_end|>\n<|im_start|>assistant\n"
SMOLLM = packaged("SmolLM2-135M-Instruct")
EFFICIENTNET = packaged("efficientnet-lite0")


# --- a tiny Llama and its GGUF file ---------------------------------------------------------------------


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE over CORPUS (about 300 tokens), without BOS on encoding, like SmolLM2's."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=SPECIALS[UNK], bos_token=SPECIALS[BOS], eos_token=SPECIALS[EOS]
    )


def make_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


# HF module → GGUF tensor name inside block N (gguf's "standardized tensor names").
BLOCK_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q and k rows: HF's rotate-half layout → interleaved pairs.

    transformers undoes it on load, so writing without it would load a different model.
    """
    rows = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, rows, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """The model's float32 tensors under their GGUF names; no `output.weight`, so the head stays tied."""
    out = {}
    for name, tensor in model.state_dict().items():
        w = tensor.numpy()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "model.norm.weight":
            out["output_norm.weight"] = w
        elif name.startswith("model.layers."):
            _, _, block, *module, _ = name.split(".")
            module = ".".join(module)
            if module == "self_attn.q_proj":
                w = llama_cpp_permute(w, HEADS)
            elif module == "self_attn.k_proj":
                w = llama_cpp_permute(w, KV_HEADS)
            out[f"blk.{block}.{BLOCK_TENSORS[module]}.weight"] = w
        else:
            assert name == "lm_head.weight", name  # tied to token_embd
    return out


def write_gguf(path: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> Path:
    """`model` and `tokenizer` as a float32 llama GGUF file, with the metadata transformers reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    vocab = sorted(tokenizer.backend_tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(POSITIONS)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(model.config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(model.config.rms_norm_eps)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in SPECIALS else 1 for token, _ in vocab])  # 3: control, 1: normal
    writer.add_token_merges([" ".join(pair) for pair in merges])
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_unk_token_id(UNK)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in gguf_tensors(model).items():
        writer.add_tensor(name, np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    tokenizer = make_tokenizer()
    return make_llama(len(tokenizer)), tokenizer


@pytest.fixture
def gguf_file(tmp_path, tiny) -> Path:
    return write_gguf(tmp_path / "gguf" / "tiny-llama.gguf", *tiny)


def logits(model, tokenizer, text: str = SAMPLE) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokenizer(text)["input_ids"]])).logits


def fake_packages(monkeypatch, folders: dict[str, Path | None]) -> None:
    """Make `importlib.util.find_spec` see each named package in its folder (None: not installed)."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name not in folders:
            return real(name, *args, **kwargs)
        if folders[name] is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folders[name])]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


# --- loading causal LMs ------------------------------------------------------------------------------------


def test_a_gguf_file_loads_as_the_model_and_tokenizer_it_was_written_from(tmp_path, tiny, gguf_file):
    original, original_tokenizer = tiny
    cache = tmp_path / "cache"
    model, tokenizer = load_causal_lm(gguf_file, cache_dir=cache)

    assert isinstance(model, LlamaForCausalLM) and not model.training
    c = model.config
    shape = (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads)
    assert shape == (LAYERS, HIDDEN, HEADS, KV_HEADS)
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    for text in (SAMPLE, CHAT_SAMPLE):
        assert tokenizer(text)["input_ids"] == original_tokenizer(text)["input_ids"]
    assert tokenizer(CHAT_SAMPLE)["input_ids"][0] == BOS  # a special token stays whole
    assert tokenizer.decode(tokenizer(SAMPLE)["input_ids"]) == SAMPLE
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (EOS, EOS)  # no pad token in the file: EOS
    assert tokenizer.chat_template == CHAT_TEMPLATE
    # Exact up to float rounding only if q and k were un-permuted as llama.cpp permuted them.
    torch.testing.assert_close(
        logits(model, tokenizer), logits(original, original_tokenizer), rtol=0, atol=1e-6
    )

    folder = dequantized_folder(gguf_file, cache)
    assert folder.parent == cache / "models" and folder.name.startswith("tiny-llama-")
    assert json.loads((folder / SOURCE_FILE).read_text())["gguf"] == str(gguf_file)
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())


def test_a_second_load_reads_the_dequantized_folder_not_the_gguf_file(tmp_path, tiny, gguf_file):
    cache = tmp_path / "cache"
    first, tokenizer = load_causal_lm(gguf_file, cache_dir=cache)
    expected = logits(first, tokenizer)
    folder = dequantized_folder(gguf_file, cache)

    # Zero the file but keep its size and modification time, the folder's key: it can no longer be parsed,
    # so a load that succeeds did not read it.
    stat = gguf_file.stat()
    gguf_file.write_bytes(bytes(stat.st_size))
    os.utime(gguf_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert dequantized_folder(gguf_file, cache) == folder
    with pytest.raises(DppmgError, match="tiny-llama.gguf"):
        load_causal_lm(gguf_file)  # straight from the (now zeroed) file

    second, second_tokenizer = load_causal_lm(gguf_file, cache_dir=cache)
    assert torch.equal(logits(second, second_tokenizer), expected)
    assert sorted(p.name for p in (cache / "models").iterdir()) == [folder.name]  # nothing new was written


def test_a_changed_gguf_file_gets_its_own_folder(gguf_file, tmp_path):
    before = dequantized_folder(gguf_file, tmp_path)
    stat = gguf_file.stat()
    os.utime(gguf_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert dequantized_folder(gguf_file, tmp_path) != before


def test_without_a_cache_a_gguf_file_loads_straight_from_the_file(tmp_path, tiny, gguf_file):
    original, original_tokenizer = tiny
    model, tokenizer = load_causal_lm(gguf_file)
    torch.testing.assert_close(
        logits(model, tokenizer), logits(original, original_tokenizer), rtol=0, atol=1e-6
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf"]  # no folder written anywhere
    assert sorted(p.name for p in gguf_file.parent.iterdir()) == [gguf_file.name]


def test_a_saved_folder_loads_with_eos_padding_and_the_dtype_asked_for(tmp_path, tiny):
    original, tokenizer = tiny
    folder = tmp_path / "saved"
    original.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert tokenizer.pad_token is None

    model, loaded_tokenizer = load_causal_lm(folder)
    assert torch.equal(logits(model, loaded_tokenizer), logits(original, tokenizer))
    assert loaded_tokenizer.pad_token == SPECIALS[EOS]
    assert model.generation_config.pad_token_id == EOS
    half, _ = load_causal_lm(str(folder), dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with pytest.raises(DppmgError, match="dtype 'float64' is not one of: float32, bfloat16, float16"):
        load_causal_lm(folder, dtype="float64")


def test_names_resolve_to_packaged_models_gguf_files_folders_and_hub_ids(tmp_path, monkeypatch, gguf_file):
    monkeypatch.chdir(tmp_path)  # so that "owner/name" is not a folder by accident
    package = tmp_path / "site" / SMOLLM.module
    (package / "weights").mkdir(parents=True)
    (package / "weights" / SMOLLM.file).write_bytes(b"")
    fake_packages(monkeypatch, {SMOLLM.module: package})
    (tmp_path / "saved").mkdir()

    assert resolve_causal_lm(gguf_file) == resolve_causal_lm(str(gguf_file))
    cases = {
        "smollm2-135m-INSTRUCT": ("packaged", str(package / "weights" / SMOLLM.file)),
        "gguf/tiny-llama.gguf": ("gguf", str(gguf_file.resolve())),
        "saved": ("folder", "saved"),
        "HuggingFaceTB/SmolLM2-1.7B-Instruct": ("hub", "HuggingFaceTB/SmolLM2-1.7B-Instruct"),
        "gpt2": ("hub", "gpt2"),
    }
    for name, (kind, location) in cases.items():
        source = resolve_causal_lm(name)
        assert (source.name, source.kind, source.location) == (name, kind, location)


def test_a_packaged_gguf_loads_and_prepares_through_the_same_cache(tmp_path, monkeypatch, tiny):
    """The packaged name takes the GGUF route: here the package folder holds the tiny model under SmolLM2's name."""
    original, original_tokenizer = tiny
    package = tmp_path / "site" / SMOLLM.module
    gguf_path = write_gguf(package / SMOLLM.file, *tiny)
    fake_packages(monkeypatch, {SMOLLM.module: package})
    cache = tmp_path / "cache"

    rows = prepare_models(cache, [SMOLLM.name])
    folder = dequantized_folder(gguf_path, cache)
    assert rows == [{"name": SMOLLM.name, "kind": "causal_lm", "ready": str(folder)}]
    assert (folder / SOURCE_FILE).is_file()
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert prepare_models(cache, [SMOLLM.name]) == rows  # idempotent: nothing rewritten
    assert (folder / "model.safetensors").stat().st_mtime_ns == written

    model, tokenizer = load_causal_lm(SMOLLM.name.upper(), cache_dir=cache)
    torch.testing.assert_close(
        logits(model, tokenizer), logits(original, original_tokenizer), rtol=0, atol=1e-6
    )


# --- loader errors --------------------------------------------------------------------------------------


def test_missing_paths_and_files_that_are_not_gguf_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"not a model")
    (tmp_path / "notes.gguf").write_text("not a model either\n")
    with pytest.raises(DppmgError, match=r"'missing\.gguf': no such GGUF file"):
        load_causal_lm("missing.gguf")
    with pytest.raises(DppmgError, match="text model not found: no/such/folder"):
        load_causal_lm("no/such/folder")
    with pytest.raises(DppmgError, match="text model not found"):
        load_causal_lm(tmp_path / "absent")  # a Path is never a hub id
    with pytest.raises(DppmgError, match="is a file but not a .gguf file"):
        load_causal_lm("weights.bin")
    with pytest.raises(DppmgError, match="notes.gguf.*not a GGUF file"):
        load_causal_lm("notes.gguf", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_a_model_folder_with_truncated_weights_is_a_clear_error_naming_it(tmp_path, tiny):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    weights = tmp_path / "lm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(DppmgError, match=r"cannot load the text model .*lm'.*(incomplete|deserializing)"):
        load_causal_lm(tmp_path / "lm")


@pytest.mark.parametrize("cut", ["header", "tensors"])
@pytest.mark.parametrize("cached", [True, False])
def test_a_truncated_gguf_file_is_a_clear_error_naming_it(tmp_path, gguf_file, cut, cached):
    data = gguf_file.read_bytes()
    # The header and metadata (tokens, merges) take the first few kB, the float32 tensors the rest.
    gguf_file.write_bytes(data[:1000] if cut == "header" else data[: len(data) - 5000])
    cache = tmp_path / "cache" if cached else None
    with pytest.raises(DppmgError, match="tiny-llama.gguf"):
        load_causal_lm(gguf_file, cache_dir=cache)
    if cached:
        models_dir = tmp_path / "cache" / "models"
        assert not models_dir.exists() or not any(models_dir.iterdir())  # no half-written folder


def test_a_packaged_model_whose_package_is_missing_says_make_models(tmp_path, monkeypatch):
    fake_packages(monkeypatch, {SMOLLM.module: None, EFFICIENTNET.module: None})
    with pytest.raises(
        DppmgError, match=r"'SmolLM2-135M-Instruct' is not installed: run `make models`"
    ) as err:
        load_causal_lm("SmolLM2-135M-Instruct", cache_dir=tmp_path)
    assert SMOLLM.install in str(err.value)
    with pytest.raises(DppmgError, match="make models"):
        prepare_models(tmp_path, ["SmolLM2-135M-Instruct"])
    with pytest.raises(
        DppmgError, match=r"image encoder 'efficientnet-lite0' is not installed: run `make models`"
    ):
        EfficientNetEncoder()


def test_a_packaged_model_whose_package_lacks_the_file_says_reinstall(tmp_path, monkeypatch):
    (tmp_path / SMOLLM.module).mkdir()
    fake_packages(monkeypatch, {SMOLLM.module: tmp_path / SMOLLM.module})
    with pytest.raises(DppmgError, match=f"holds no {SMOLLM.file}: reinstall it"):
        resolve_causal_lm(SMOLLM.name)


def test_a_hub_id_that_is_not_cached_offline_says_so(monkeypatch, tmp_path):
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is unset: the test would ask the hub")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        DppmgError, match=r"'nobody-dppmg/no-such-model' \(name a local folder.*or allow the hub\)"
    ):
        load_causal_lm("nobody-dppmg/no-such-model", cache_dir=tmp_path)


# --- token injection into a Llama with tied embeddings ---------------------------------------------------

TOKEN_SIZES = (2, 8, 6)  # levels L, codebook size K, codebook dim d
USER_CODES = [[3, 5], [6, 1], [0, 0]]  # [U, L]: users 0 and 1 differ at both levels
HASH = "0123456789abcdef"


@pytest.fixture
def ckpt(tmp_path) -> TokenCheckpoint:
    return text_token_checkpoint(tmp_path / "tokens", *TOKEN_SIZES, USER_CODES, HASH)


@pytest.fixture
def injected(ckpt):
    tokenizer = make_tokenizer()
    model = make_llama(len(tokenizer))
    vocab = len(tokenizer)
    before = {
        "plain": logits(model, tokenizer),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }
    inj = inject_tokens(model, tokenizer, ckpt, "text", content_hash=HASH)
    return model, tokenizer, inj, vocab, before


def test_injection_into_a_tied_llama_trains_only_the_token_rows_and_keeps_the_old_logits(injected):
    model, tokenizer, inj, vocab, before = injected
    levels, size, _ = TOKEN_SIZES
    assert inj.token_ids.tolist() == list(range(vocab, vocab + levels * size))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after the resize
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if any(p is q for q in inj.parameters())}
    assert len(trainable) == 3  # projection weight and bias, offset
    assert {id(p) for p in trainable_parameters([inj])} == {id(p) for p in inj.parameters()}

    after = logits(model, tokenizer)  # a prompt without preference tokens
    assert after.shape[-1] == vocab + levels * size
    torch.testing.assert_close(after[..., :vocab], before["plain"], rtol=0, atol=1e-6)
    assert (after[..., vocab:] == MASKED_LOGIT).all()
    for key, value in before["state"].items():
        assert torch.equal(model.state_dict()[key][: value.shape[0]], value), key


def test_a_users_tokens_change_the_output_and_the_loss_reaches_their_rows(injected, ckpt):
    model, tokenizer, inj, vocab, _ = injected
    _, size, _ = TOKEN_SIZES
    prompts = [ckpt.user_prompt(u, "text") + "red lamp:" for u in (0, 1)]
    ids = tokenizer(prompts[0])["input_ids"]
    assert ids[:2] == [vocab + 0 * size + 3, vocab + 1 * size + 5]  # user 0's codes (3, 5), one id each
    last = [logits(model, tokenizer, p)[0, -1, :vocab] for p in [*prompts, "red lamp:"]]
    assert not torch.allclose(last[0], last[1], atol=1e-4)  # two users, two outputs
    assert not torch.allclose(last[0], last[2], atol=1e-4)  # tokens or none

    target = tokenizer(" a small wooden table", add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids + target])
    labels = input_ids.clone()
    labels[0, : len(ids)] = -100  # only the target counts
    model(input_ids=input_ids, labels=labels).loss.backward()

    assert inj.projection.weight.grad is not None and inj.projection.weight.grad.abs().sum() > 0
    used = torch.zeros(inj.offset.shape[0], dtype=torch.bool)
    used[[0 * size + 3, 1 * size + 5]] = True
    row_grad = inj.offset.grad.abs().sum(dim=1)
    assert (row_grad[used] > 0).all() and (row_grad[~used] == 0).all()  # exactly the rows in the prompt
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_generate_on_a_llama_never_emits_a_preference_token(injected, ckpt):
    model, tokenizer, inj, vocab, _ = injected
    new = set(inj.token_ids.tolist())
    # Make the preference tokens the head's favourites whatever the hidden state: the final norm keeps only
    # component 0, and the tokens' (tied) head rows are ±100 there, where the vocabulary's are ~0.02.
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 10.0
        rows = model.lm_head.weight[inj.token_ids]
        rows.zero_()
        rows[:, 0] = 100.0 * torch.tensor([1.0, -1.0]).repeat(len(new) // 2)
        model.lm_head.weight[inj.token_ids] = rows
    ids = torch.tensor([tokenizer(ckpt.user_prompt(0, "text") + "red lamp:")["input_ids"]])
    out = model(input_ids=ids, output_hidden_states=True)
    unmasked = out.hidden_states[-1] @ model.lm_head.weight.T  # [1, T, V]
    assert int(unmasked[0, -1].argmax()) in new

    assert_generate_never_emits(model, ids, new)


# --- the image encoder's feature path, untrained ---------------------------------------------------------


@pytest.fixture(scope="module")
def encoder() -> EfficientNetEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return EfficientNetEncoder(weights=None)


def draw(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3]: a colour gradient with a bright rectangle, different for every seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = rng.uniform(0, 255, 3) * (0.5 + 0.5 * np.stack([yy, xx, 1 - yy], axis=-1))
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    base[top : top + height // 3, left : left + width // 3] = rng.uniform(150, 255, 3)
    return base.astype(np.uint8)


def test_features_are_unit_rows_whatever_the_input_type_and_batch_size(encoder):
    images = np.stack([draw(60, 90, seed) for seed in range(2)])  # [N, H, W, 3], not the network's side
    assert encoder.weights is None and repr(encoder).startswith("EfficientNetEncoder(weights=None")
    feats = encoder.encode(images)
    assert feats.shape == (2, 1280) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    assert np.abs(feats[0] - feats[1]).max() > 1e-4  # not one constant vector

    floats = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # [N, 3, H, W] in [0, 1]
    assert torch.equal(as_pixels01(images), floats)
    assert torch.equal(as_pixels01(floats.double()), floats)
    np.testing.assert_allclose(encoder.features(floats).numpy(), feats, atol=1e-6)
    np.testing.assert_allclose(encoder.encode(images, batch_size=1), feats, atol=1e-5)


def test_encode_image_files_reads_in_chunks_what_encode_sees_after_the_resize(encoder, tmp_path):
    side = encoder.input_side
    images = [draw(60, 90, 0), draw(side, side, 1), draw(300, 200, 2)[..., 0]]  # the last: grey
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])

    def resized(path: Path) -> np.ndarray:  # RGB, bicubic, aspect not kept (as load_image_array reads)
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((side, side), Image.Resampling.BICUBIC))

    expected = encoder.encode(np.stack([resized(p) for p in paths]))
    got = encode_image_files(encoder, paths, progress=False, chunk=2)  # a full chunk and a partial one
    assert got.shape == (3, encoder.dim)
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((32, 32, 3), np.uint8), r"must be a batch \[N, H, W, 3\] uint8 or \[N, 3, H, W\] float"),
        (np.zeros((1, 3, 32, 32), np.uint8), r"uint8 images must be \[N, H, W, 3\], got \(1, 3, 32, 32\)"),
        (np.zeros((1, 32, 32, 3), np.float32), r"float images must be \[N, 3, H, W\] in \[0, 1\]"),
        (torch.zeros(2, 1, 32, 32), r"float images must be \[N, 3, H, W\] in \[0, 1\], got \(2, 1, 32, 32\)"),
    ],
)
def test_images_of_the_wrong_shape_are_refused(encoder, images, message):
    with pytest.raises(DppmgError, match=message):
        encoder.encode(images)


def unreadable_weights(folder: Path) -> dict[str, Path]:
    """Files a user might pass as weights that are not EfficientNet-Lite0's state dict."""
    folder.mkdir()
    files = {
        name: folder / f"{name}.pth" for name in ("garbage", "empty", "truncated", "module", "other keys")
    }
    files["garbage"].write_bytes(b"not a state dict")
    files["empty"].write_bytes(b"")
    torch.save({"w": torch.zeros(1000)}, files["truncated"])
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:500])
    torch.save(torch.nn.Linear(2, 2), files["module"])  # a pickled module: refused by weights_only
    torch.save({"stem.weight": torch.zeros(1)}, files["other keys"])
    return files


def test_unknown_encoders_and_unreadable_weights_are_refused(tmp_path):
    with pytest.raises(
        DppmgError, match="unknown image encoder 'resnet50'; available offline: efficientnet-lite0"
    ):
        build_image_encoder("resnet50")
    for name, path in unreadable_weights(tmp_path / "weights").items():
        with pytest.raises(DppmgError, match=f"{name}.pth: cannot load EfficientNet-Lite0 weights: .+"):
            EfficientNetEncoder(weights=path)
