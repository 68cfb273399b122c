"""Put stage 1's preference tokens into a generator's vocabulary: one helper for the LLM and the text encoder.

The recipe is diffusers' textual inversion (add the tokens to the tokenizer, resize the embeddings, train only
the new rows), except that the new rows are not free vectors but a learned function of the stage-1 codebook:

    row(l, k) = W · c[l, k] / s_l + b + offset[l, k]        c: codebook [L, K, d],  s_l = mean_k |c[l, k]|

W [D, d] and b [D] (the projection, shared by a modality's L*K tokens) and the optional offset [L*K, D] (zero
at start) are the *token-associated parameters*, the only ones that train. Dividing by s_l gives every residual
level the same input scale: the fine levels' codes are much shorter than level 0's and would otherwise all
start as near-copies of b.

How the rows reach the model: `inject_tokens` attaches a `PreferenceTokens` module to the model's input
embedding module (as its child `preference_tokens`, so that `model.parameters()`, and optimizers built from it
such as trl's, include it) and a forward hook there that replaces the embedding output at the new ids by the
rows above. The embedding table stays a frozen parameter whose old rows never change and whose new rows are
never read. We use a hook rather than textual inversion's practice of training the whole table and restoring
the old rows after every step because then the rest of the model is unchanged by construction (nothing else
has `requires_grad`), the table can stay tied to an LM head, and the rows stay a function of the codebook.

The output head: resizing gives the head (tied, as in GPT-2, or not) rows for the new ids, but the tokens are
inputs only. A forward hook on the head sets their logits to MASKED_LOGIT, so nothing that samples from the
logits (`generate`, trl's trainers) ever emits them, and the logits of the original vocabulary are exactly
those of the original head.

Code words (`word_pieces`): a level-0 code may also be spelt as several free rows, the multi-vector tokens of
textual inversion. Code (0, k) with n pieces gets the strings `<pt_0_k_w0>` .. `<pt_0_k_w{n-1}>`, ids after the
L*K code tokens, rows started at the embeddings of its code words' pieces (stage2_generation/code_words.py);
`InjectedTokens.prompt` spells a user's codes with them. They train like the rest of the token parameters.

Limits: the hook sees token ids, so a caller that passes `inputs_embeds` bypasses it. Embedding modules that
scale their output (Gemma-style `embed_scale`) get the rows scaled the same way.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dppmg.errors import DppmgError
from dppmg.io import atomic_path, commit_dir, staging_dir, write_json, write_text
from dppmg.tokens import TokenCheckpoint

# The logit of a preference token. Not -inf: trl logs the entropy, and p·log p of a masked token would be
# 0·(-inf) = NaN. exp(-1e4) is exactly 0 in float32, and -1e4 stays finite in float16 even at temperature 0.2.
MASKED_LOGIT = -1e4
HOLDER_NAME = "preference_tokens"  # the child of the input embedding module that holds the token rows
SCALE_EPS = 1e-8  # guards the level scale of an all-zero codebook level
KIND = "dppmg-injected-tokens"
FORMAT_VERSION = 1
TEXT_ROWS_FILE = "token_rows.safetensors"
TEXTUAL_INVERSION_FILE = "learned_embeds.safetensors"  # diffusers' default textual-inversion weight name
README_FILE = "README.md"
EXPANSIONS_FILE = "expansions.json"  # {level-0 code token: the word-row strings that spell it}


class TokenRows(nn.Module):
    """The embedding rows of one modality's L*K tokens, computed from its codebook (formula in the module docstring).

    Args:
        codebook: float [L, K, d], the stage-1 residual-VQ codebook.
        reference: float [V, D], the existing embedding rows; the new rows start with their mean and spread.
        first_id: vocabulary id of token (0, 0); token (l, k) has id first_id + l*K + k.
        per_row_offset: learn a free offset [L*K, D] per token on top of the projection (zero at start).
        word_pieces: level-0 code -> ids (rows of `reference`) its word rows start at; they follow the L*K code
            tokens, code by code in ascending order (`word_spans`).
    """

    def __init__(
        self,
        codebook: torch.Tensor,
        reference: torch.Tensor,
        first_id: int,
        per_row_offset: bool = True,
        word_pieces: dict[int, list[int]] | None = None,
    ):
        super().__init__()
        levels, size, dim = codebook.shape
        device = reference.device
        book = codebook.to(device, torch.float32)
        level_scale = book.norm(dim=-1).mean(dim=1).clamp_min(SCALE_EPS)  # [L]
        # Derived from the checkpoint, so not part of the saved parameters.
        self.register_buffer(
            "inputs", (book / level_scale[:, None, None]).reshape(levels * size, dim), persistent=False
        )
        self.levels, self.codebook_size, self.first_id = levels, size, first_id
        self.projection = nn.Linear(dim, reference.shape[1], device=device)
        self.offset = (
            nn.Parameter(torch.zeros(levels * size, reference.shape[1], device=device))
            if per_row_offset
            else None
        )
        self._init_like(reference)
        # The ids each spelt level-0 code's rows started at, and {code: (index of its first word row, count)}
        self.word_pieces: dict[int, list[int]] = {}
        self.word_spans: dict[int, tuple[int, int]] = {}
        ids: list[int] = []
        for code, pieces in sorted((word_pieces or {}).items()):
            if not 0 <= code < size or not pieces:
                raise DppmgError(
                    f"word rows for level-0 code {code}: expected a code in [0, {size}) and >= 1 piece"
                )
            self.word_pieces[int(code)] = [int(i) for i in pieces]
            self.word_spans[int(code)] = (len(ids), len(pieces))
            ids.extend(pieces)
        self.word_rows = (
            nn.Parameter(reference.detach().float()[torch.tensor(ids, device=device)].clone())
            if ids
            else None
        )

    @property
    def num_code_tokens(self) -> int:
        return self.levels * self.codebook_size

    @property
    def num_words(self) -> int:
        return 0 if self.word_rows is None else len(self.word_rows)

    @property
    def num_tokens(self) -> int:
        return self.num_code_tokens + self.num_words

    @torch.no_grad()
    def _init_like(self, reference: torch.Tensor) -> None:
        """b = the reference rows' mean; W random, rescaled so |W x| averages the rows' distance from that mean."""
        reference = reference.float()
        mean = reference.mean(dim=0)
        spread = (reference - mean).norm(dim=1).mean()
        self.projection.bias.copy_(mean)
        length = (self.inputs @ self.projection.weight.T).norm(dim=1).mean()
        if length > 0:
            self.projection.weight.mul_(spread / length)

    def forward(self) -> torch.Tensor:
        """All rows in token-id order, [L*K + words, D]."""
        rows = self.projection(self.inputs)
        if self.offset is not None:
            rows = rows + self.offset
        return rows if self.word_rows is None else torch.cat([rows, self.word_rows])

    def mask_logits(self, module: nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
        """Forward hook of the output head: these tokens' logits [..., V] become MASKED_LOGIT."""
        ids = torch.arange(self.first_id, self.first_id + self.num_tokens, device=logits.device)
        return logits.index_fill(-1, ids, MASKED_LOGIT)

    def extra_repr(self) -> str:
        words = f", word_rows={self.num_words} for {len(self.word_spans)} codes" if self.word_spans else ""
        return f"levels={self.levels}, codebook_size={self.codebook_size}, first_id={self.first_id}{words}"


class PreferenceTokens(nn.Module):
    """Every modality injected into one model; a child of its input embedding module, named HOLDER_NAME."""

    def __init__(self):
        super().__init__()
        self.rows = nn.ModuleDict()

    def embed(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of the input embedding: the output [..., D] at the new ids becomes their rows."""
        ids = args[0] if args else kwargs["input"]
        scale = getattr(module, "embed_scale", None)
        for block in self.rows.values():
            local = ids - block.first_id
            inside = (local >= 0) & (local < block.num_tokens)
            if not bool(inside.any()):
                continue  # the usual case while generating: no rows to compute
            rows = block() if scale is None else block() * scale
            picked = rows[local.clamp(0, block.num_tokens - 1)].to(output.dtype)  # [..., D]
            output = torch.where(inside.unsqueeze(-1), picked, output)
        return output


@dataclass
class InjectedTokens:
    """One modality's tokens in one model, as `inject_tokens` returns them.

    Args:
        modality: "text" or "image".
        token_strings: the L*K strings, level-major (the checkpoint's `token_strings(modality)`), then the word
            rows' strings (`word_string`), code by code.
        token_ids: int64 [L*K + words], their ids in the model's vocabulary, same order.
        module: the rows' parameters (`projection`, `offset`), attached to the model.
        content_hash: the dataset hash of the token checkpoint; saved parameters load only onto the same tokens.
    """

    modality: str
    token_strings: list[str]
    token_ids: torch.Tensor
    module: TokenRows
    content_hash: str

    @property
    def projection(self) -> nn.Linear:
        return self.module.projection

    @property
    def offset(self) -> nn.Parameter | None:
        return self.module.offset

    def rows(self) -> torch.Tensor:
        """The current rows, [L*K, D], differentiable."""
        return self.module()

    def parameters(self) -> list[nn.Parameter]:
        """The token-associated parameters: the only trainable ones."""
        return list(self.module.parameters())

    def prompt(self, codes: Sequence[int]) -> str:
        """A user's codes (one per level) as prompt text: "<pt_0_17><pt_1_3>", or with word rows the level-0
        code's words alone, "<pt_0_17_w0><pt_0_17_w1>..." (a code without words keeps its own token)."""
        block = self.module
        if not block.word_spans:
            return "".join(
                self.token_strings[level * block.codebook_size + c] for level, c in enumerate(codes)
            )
        return self._spelling(codes[0])

    def expansions(self) -> dict[str, str]:
        """{level-0 code token: the word-row strings that spell it}, for the codes that have word rows."""
        return {self.token_strings[code]: self._spelling(code) for code in self.module.word_spans}

    def _spelling(self, code: int) -> str:
        """Level-0 `code` in a prompt: its word rows' strings, or its own token when it has none."""
        span = self.module.word_spans.get(code)
        if span is None:
            return self.token_strings[code]
        start = self.module.num_code_tokens + span[0]
        return "".join(self.token_strings[start : start + span[1]])

    def named_rows(self) -> dict[str, torch.Tensor]:
        """{token string: row [D]}, detached float32 copies on the CPU, for exporting."""
        rows = self.rows().detach().to("cpu", torch.float32)
        return {s: row.clone() for s, row in zip(self.token_strings, rows)}

    def describe(self) -> dict[str, Any]:
        """What saved parameters must match to load onto these tokens."""
        return {
            "levels": self.module.levels,
            "codebook_size": self.module.codebook_size,
            "codebook_dim": self.module.projection.in_features,
            "embedding_dim": self.module.projection.out_features,
            "per_row_offset": self.offset is not None,
            "content_hash": self.content_hash,
            # The ids each spelt code's rows started at (None without word rows, as in files written before
            # them): a file loads only onto the same spelling, and `saved_word_pieces` rebuilds it.
            "word_pieces": {str(c): ids for c, ids in self.module.word_pieces.items()} or None,
        }


# ---------------------------------------------------------------------------------------------------------
# Injecting


def inject_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ckpt: TokenCheckpoint,
    modality: str,
    *,
    content_hash: str | None = None,
    expect: dict[str, Any] | None = None,
    per_row_offset: bool = True,
    seed: int = 0,
    word_pieces: dict[int, list[int]] | None = None,
) -> InjectedTokens:
    """Add `modality`'s L*K tokens to `tokenizer` and `model`, with rows computed from the codebook; freeze the rest.

    Works for a causal LM and for a diffusion text encoder alike, and may be called once per modality on the
    same model. Afterwards only the returned `parameters()` (and those of earlier injections into this model)
    require gradients.

    Args:
        content_hash: the dataset's content hash; the checkpoint must have been learned on it. None checks only
            the sizes (for a caller without a dataset).
        expect: sizes the checkpoint must have, as in `TokenCheckpoint.check_compatible`.
        per_row_offset: give each token a learned offset on top of the projection.
        seed: seeds the projection's random initialisation (the global RNG is left as it was, on CPU),
            so the same checkpoint gives the same rows whatever ran before, e.g. a warm-start or a cache load.
        word_pieces: level-0 code -> ids in this tokenizer of its code words' pieces: the code also gets one
            row per piece, started at that piece's embedding (module docstring, "Code words").
    """
    expect = dict(expect or {})
    expect["modalities"] = list(dict.fromkeys([*expect.get("modalities", []), modality]))
    ckpt.check_compatible(ckpt.content_hash if content_hash is None else content_hash, expect)
    strings = ckpt.token_strings(modality)
    for code, pieces in sorted((word_pieces or {}).items()):
        strings += [word_string(strings[code], j) for j in range(len(pieces))]
    embedding = _input_embedding(model)
    holder = getattr(embedding, HOLDER_NAME, None)
    if holder is not None and modality in holder.rows:
        raise DppmgError(
            f"{modality} preference tokens are already injected into this {type(model).__name__}"
        )
    vocab = tokenizer.get_vocab()
    clash = [s for s in strings if s in vocab]
    if clash:
        raise DppmgError(
            f"the tokenizer already has {len(clash)} of the {modality} token strings (e.g. {clash[0]}, id "
            f"{vocab[clash[0]]}); inject into a tokenizer without them"
        )

    # The rows that exist for the tokenizer's vocabulary (not padding rows of a padded table) set the scale.
    reference = embedding.weight.detach()[: min(len(tokenizer), embedding.num_embeddings)]
    first_id = _add_tokens(tokenizer, strings)
    head_before = model.get_output_embeddings()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = TokenRows(ckpt.codebooks[modality], reference, first_id, per_row_offset, word_pieces)
        # Never shrink: a padded table (more rows than the tokenizer has tokens) may already hold the new ids.
        # (The new table rows are drawn at random, but never read: the hook replaces them.)
        model.resize_token_embeddings(
            max(embedding.num_embeddings, first_id + block.num_tokens), mean_resizing=False
        )
    if model.get_input_embeddings() is not embedding:
        raise RuntimeError(
            "resize_token_embeddings replaced the input embedding module; the hook relies on it"
        )
    if holder is None:
        holder = PreferenceTokens()
        embedding.add_module(HOLDER_NAME, holder)
        embedding.register_forward_hook(holder.embed, with_kwargs=True)
    holder.rows[modality] = block

    head = model.get_output_embeddings()
    if head is not None:
        # An untied head is a new module after resizing, so earlier modalities need their masks again.
        masked = [block] if head is head_before else list(holder.rows.values())
        for b in masked:
            head.register_forward_hook(b.mask_logits)

    model.requires_grad_(False)
    holder.requires_grad_(True)
    ids = torch.arange(first_id, first_id + block.num_tokens, dtype=torch.int64)
    return InjectedTokens(modality, strings, ids, block, ckpt.content_hash)


def word_string(code_token: str, j: int) -> str:
    """The string of a code's j-th word row: "<pt_0_17>" -> "<pt_0_17_w0>"."""
    return f"{code_token[:-1]}_w{j}>"


def _input_embedding(model: PreTrainedModel) -> nn.Embedding:
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise DppmgError(
            f"{type(model).__name__}'s input embeddings are a {type(embedding).__name__}, not an nn.Embedding; "
            "token injection needs a plain embedding table"
        )
    return embedding


def _add_tokens(tokenizer: PreTrainedTokenizerBase, strings: list[str]) -> int:
    """Add the strings as special tokens and return the first new id (the ids are consecutive).

    Special, so that they are never split and `decode(..., skip_special_tokens=True)` drops them.
    """
    tokenizer.add_tokens(strings, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(strings)
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise DppmgError(
            f"{type(tokenizer).__name__} gave the {len(strings)} new tokens non-consecutive ids "
            f"({ids[0]}..{ids[-1]}); injection needs one block of ids"
        )
    return ids[0]


def trainable_parameters(injected: Sequence[InjectedTokens]) -> list[nn.Parameter]:
    """The token-associated parameters of several injections, each once (for one optimizer)."""
    params: dict[int, nn.Parameter] = {}
    for inj in injected:
        for p in inj.parameters():
            params.setdefault(id(p), p)
    return list(params.values())


# ---------------------------------------------------------------------------------------------------------
# Saving and loading the token-associated parameters


def save_injected(path: str | Path, injected: Sequence[InjectedTokens]) -> None:
    """Write the token-associated parameters of `injected` (only those: a small file) to a safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for inj in injected:
        for name, tensor in inj.module.state_dict().items():
            tensors[f"{inj.modality}.{name}"] = tensor.detach().to("cpu").contiguous()
        entries[inj.modality] = inj.describe()
    metadata = {"kind": KIND, "format_version": str(FORMAT_VERSION), "modalities": json.dumps(entries)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file; a DppmgError naming the file when it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError) as e:
        raise DppmgError(f"{path}: cannot read {what}: {e}") from None


def saved_word_pieces(path: str | Path, modality: str = "text") -> dict[int, list[int]] | None:
    """The spelling (level-0 code -> piece ids) a token-parameter file's `modality` rows were made with, so that a
    finished run's tokens are rebuilt as they were trained, whatever the data or the tokenizer would give today."""
    path = Path(path)
    _, metadata = _read_safetensors(path, "token parameters")
    entry = json.loads(metadata.get("modalities", "{}")).get(modality) or {}
    pieces = entry.get("word_pieces")
    return None if not pieces else {int(c): [int(i) for i in ids] for c, ids in pieces.items()}


def load_injected(path: str | Path, injected: Sequence[InjectedTokens]) -> None:
    """Load parameters written by `save_injected` into `injected` (fresh injections of the same checkpoint).

    The parameters are copied in place, so optimizers that already hold them stay valid.
    """
    path = Path(path)
    tensors, metadata = _read_safetensors(path, "token parameters")
    if metadata.get("kind") != KIND or metadata.get("format_version") != str(FORMAT_VERSION):
        raise DppmgError(
            f"{path}: not a DPPMG token-parameter file (kind {metadata.get('kind')!r}, format "
            f"{metadata.get('format_version')!r}; expected {KIND!r}, {FORMAT_VERSION})"
        )
    entries = json.loads(metadata["modalities"])
    for inj in injected:
        if inj.modality not in entries:
            raise DppmgError(f"{path}: holds {sorted(entries)} token parameters, not {inj.modality!r}")
        saved, here = entries[inj.modality], inj.describe()
        problems = [
            f"{k}: file has {saved.get(k)}, model has {v}" for k, v in here.items() if saved.get(k) != v
        ]
        if problems:
            raise DppmgError(
                f"{path}: the {inj.modality} token parameters do not fit these tokens:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        prefix = f"{inj.modality}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        inj.module.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------
# Exporting for use without dppmg (DESIGN.md, stage2/export/)

_TEXT_README = """# DPPMG {modality} preference tokens: {count} tokens, {dim}-dim embedding rows

This folder is the tokenizer with the tokens added, and `{rows_file}` = {{token string: embedding row}}.
Load them into the base model they were trained with:

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained("<this folder>")
    model = AutoModelForCausalLM.from_pretrained("<base model>")
    model.resize_token_embeddings(max(len(tokenizer), model.get_input_embeddings().num_embeddings))
    rows = load_file("<this folder>/{rows_file}")
    ids = tokenizer.convert_tokens_to_ids(list(rows))
    model.get_input_embeddings().weight.data[ids] = torch.stack(list(rows.values()))
    model.generation_config.suppress_tokens = ids  # the tokens are prompt inputs, never outputs

A user's tokens, e.g. `<pt_0_17><pt_1_3>`, go at the start of the prompt (`dppmg tokens show` lists them).
"""

_EXPANSIONS_NOTE = """
These tokens are spelt with code words (stage2.{modality}_code_words): the prompt holds the user's level-0 token
alone, replaced by the rows that spell it, as diffusers expands a multi-vector textual-inversion token.
`{expansions}` maps each spelt token to its rows' strings, e.g. `{example}` -> `{spelt}`; a level-0 token
missing from it is used as it is:

    import json
    spelt = json.load(open("<this folder>/{expansions}"))
    prompt = spelt.get(level0_token, level0_token) + "{suffix}"
"""

_IMAGE_README = """# DPPMG {modality} preference tokens: {count} tokens, {dim}-dim text-encoder rows

`{rows_file}` is in diffusers' textual-inversion format, {{token string: embedding row}}, one entry per token:

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionPipeline.from_pretrained("<base pipeline>")
    rows = load_file("<this folder>/{rows_file}")
    pipe.load_textual_inversion(list(rows.values()), token=list(rows))

A user's tokens, e.g. `<pi_0_250><pi_1_9>`, go at the start of the prompt (`dppmg tokens show` lists them).
"""


def export_text_tokens(
    injected: InjectedTokens, tokenizer: PreTrainedTokenizerBase, folder: str | Path
) -> Path:
    """Write the tokenizer (with the tokens) and `token_rows.safetensors` (their rows) into `folder`, atomically."""
    rows = injected.named_rows()
    readme = _TEXT_README.format(
        modality=injected.modality,
        count=len(rows),
        dim=injected.projection.out_features,
        rows_file=TEXT_ROWS_FILE,
    )
    readme += _expansions_note(injected, "red lamp:")

    def extra(stage: Path) -> None:
        tokenizer.save_pretrained(str(stage))
        _write_expansions(injected, stage)

    return _write_export(folder, TEXT_ROWS_FILE, rows, readme, extra=extra)


def _expansions_note(injected: InjectedTokens, suffix: str) -> str:
    """The README's paragraph on spelt level-0 tokens ("" when no code is spelt)."""
    expansions = injected.expansions()
    if not expansions:
        return ""
    example = next(iter(expansions))
    return _EXPANSIONS_NOTE.format(
        modality=injected.modality, expansions=EXPANSIONS_FILE, example=example, spelt=expansions[example],
        suffix=suffix,
    )  # fmt: skip


def _write_expansions(injected: InjectedTokens, stage: Path) -> None:
    expansions = injected.expansions()
    if expansions:
        write_json(stage / EXPANSIONS_FILE, expansions)


def export_image_tokens(injected: InjectedTokens, folder: str | Path) -> Path:
    """Write the rows in diffusers' textual-inversion format to `folder`/learned_embeds.safetensors, atomically."""
    rows = injected.named_rows()
    readme = _IMAGE_README.format(
        modality=injected.modality,
        count=len(rows),
        dim=injected.projection.out_features,
        rows_file=TEXTUAL_INVERSION_FILE,
    ) + _expansions_note(injected, "red lamp")
    return _write_export(
        folder, TEXTUAL_INVERSION_FILE, rows, readme, extra=lambda stage: _write_expansions(injected, stage)
    )


def _write_export(
    folder: str | Path,
    rows_file: str,
    rows: dict[str, torch.Tensor],
    readme: str,
    extra: Callable[[Path], Any] | None = None,
) -> Path:
    """Build the export folder in a staging folder and rename it into place; return the rows file's path."""
    folder = Path(folder)
    stage = staging_dir(folder)
    try:
        if extra is not None:
            extra(stage)
        # The order in the metadata restores the level-major token order (safetensors sorts the keys).
        save_file(rows, str(stage / rows_file), metadata={"token_strings": json.dumps(list(rows))})
        write_text(stage / README_FILE, readme)
        commit_dir(stage, folder)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return folder / rows_file


def load_exported_tokens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows_file: str | Path
) -> torch.Tensor:
    """Write exported rows into a plain model, as a user without dppmg would (see the exports' README).

    Adds the token strings the tokenizer lacks, grows the table, sets the rows, and for a model with an output
    head suppresses the tokens in `generate`. No hooks, nothing trainable. Returns the tokens' ids, [N].
    """
    rows_file = Path(rows_file)
    rows, metadata = _read_safetensors(rows_file, "token rows")
    strings = json.loads(metadata["token_strings"]) if "token_strings" in metadata else list(rows)
    vocab = tokenizer.get_vocab()
    missing = [s for s in strings if s not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(strings)
    embedding = _input_embedding(model)
    model.resize_token_embeddings(max(embedding.num_embeddings, max(ids) + 1), mean_resizing=False)
    weight = model.get_input_embeddings().weight
    if weight.shape[1] != rows[strings[0]].shape[-1]:
        raise DppmgError(
            f"{rows_file}: rows are {rows[strings[0]].shape[-1]}-dim, the model's embeddings {weight.shape[1]}-dim "
            "(a different base model?)"
        )
    with torch.no_grad():
        weight[ids] = torch.stack([rows[s] for s in strings]).to(weight.dtype)
    if model.get_output_embeddings() is not None:
        suppressed = set(model.generation_config.suppress_tokens or [])
        model.generation_config.suppress_tokens = sorted(suppressed | set(ids))
    return torch.tensor(ids, dtype=torch.int64)
