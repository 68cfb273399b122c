"""`dppmg tokens export RUN --format ...`: a finished run's preference tokens, for use without dppmg.

Three formats, each a folder with a README that shows how to load it:

- `safetensors`: one file of plain tensors, per modality the stage-1 codebooks [L, K, d], every user's codes
  [U, L] and continuous vectors [U, d], and (once stage 2 has finished) the tuned token rows [L*K, D] in each
  generator's embedding space; `manifest.json` holds the token strings, the user ids and the base models.
- `textual-inversion`: the image tokens in diffusers' textual-inversion format (`learned_embeds.safetensors`),
  which `StableDiffusionPipeline.load_textual_inversion` reads into the base pipeline.
- `hf`: the text tokens as a transformers tokenizer with the tokens added, and their embedding rows.

`with_base=True` also copies the base image pipeline (textual-inversion) or writes the base LM with the rows
already in its table (hf), so that the folder loads with `from_pretrained` alone, on another machine. Without it,
`base.json` names the base by path or hub id. The tiny pixel-space pipeline has no VAE; its README says the two
lines stock diffusers needs for it (`vae=None`, `vae_scale_factor = 1`, `output_type="latent"`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dppmg.errors import DppmgError
from dppmg.io import commit_dir, read_json, staging_dir, write_json, write_text
from dppmg.models import dequantized_folder, resolve_causal_lm
from dppmg.tokens import MANIFEST_FILE, TokenCheckpoint
from stage2_generation.generators import IMAGE_DIR, TEXT_DIR
from stage2_generation.generators import MANIFEST_FILE as GENERATORS_MANIFEST
from stage2_generation.injection import (
    README_FILE,
    TEXT_ROWS_FILE,
    export_image_tokens,
    export_text_tokens,
    load_exported_tokens,
)

FORMATS = ("safetensors", "textual-inversion", "hf")
EXPORT_FILE = "tokens.safetensors"  # the safetensors format's tensors
BASE_FILE = "base.json"  # which base model the rows belong to
BASE_DIR = "base"  # with_base: the base model itself

_SAFETENSORS_README = """# DPPMG preference tokens of run `{run}`: plain tensors

`{tensors}` (read it with `safetensors.torch.load_file`), per modality m in {modalities}:

- `codebook.m` [levels, codebook_size, d]: the residual-VQ codebooks of stage 1;
- `codes.m` [users, levels] (int64): each user's code per level; user i is `manifest.json` users.ids[i];
- `user_vectors.m` [users, d]: the continuous preference vectors the codes quantize;
{rows_line}
Token strings are level-major: row `level * codebook_size + code` is `manifest.json`
modalities.m.token_strings[level * codebook_size + code], e.g. `<pt_0_17>`. A user's tokens, one per level,
go at the start of a prompt.
"""

_ROWS_LINE = (
    "- `rows.m` [rows, D]: the tokens' embedding rows after stage 2, in the space of the base model that\n"
    "  `manifest.json` modalities.m.base names (the LM's input embeddings for text, the diffusion pipeline's text\n"
    "  encoder for images); row i is the token modalities.m.row_strings[i]: the levels * codebook_size code\n"
    "  tokens, then any word rows that spell level-0 codes (modalities.m.expansions maps such a code token to\n"
    "  them; a text prompt then holds the user's level-0 token alone, spelt this way).\n"
)

_PIXEL_SPACE_NOTE = """
This base pipeline works in pixel space and has no VAE. Stock diffusers loads and runs it with:

    pipe = StableDiffusionPipeline.from_pretrained("{base}", vae=None, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.vae_scale_factor = 1  # diffusers assumes 8 without a VAE; the UNet denoises the pixels themselves
    pipe.load_textual_inversion(list(rows.values()), token=list(rows))
    x = pipe("<tokens> keywords", height={height}, width={width}, output_type="latent").images  # [B, 3, H, W]
    images = (x.clamp(-1, 1) + 1) / 2  # RGB in [0, 1]
"""


def export_run(
    run: str | Path,
    fmt: str,
    out: str | Path | None = None,
    with_base: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Export run `run` (a name under runs/ or a run folder) in format `fmt`; returns the export folder.

    `out` defaults to runs/<run>/export/<fmt>. An existing `out` is replaced only with `overwrite`, and then
    only once the new folder is complete.
    """
    if fmt not in FORMATS:
        raise DppmgError(f"--format {fmt!r} is not one of: {', '.join(FORMATS)}")
    folder = _run_folder(run)
    out = Path(out) if out is not None else folder / "export" / fmt
    if out.exists() and not overwrite:
        raise DppmgError(f"{out} exists; pass --overwrite to replace it, or --out another folder")
    stage2_done = (folder / "stage2" / "metrics.json").is_file()
    if fmt != "safetensors" and not stage2_done:
        raise DppmgError(
            f"--format {fmt} exports stage 2's tuned token rows, and {folder} has no finished stage 2 "
            f"({folder / 'stage2' / 'metrics.json'} is missing); run `make stage2` first, or use --format safetensors"
        )
    ckpt = TokenCheckpoint.load(folder / "stage1" / "tokens")
    components = load_tuned(folder, progress) if stage2_done else None
    stage = staging_dir(out)
    try:
        if fmt == "safetensors":
            _write_safetensors(stage, folder.name, ckpt, components)
        elif fmt == "textual-inversion":
            _write_textual_inversion(stage, components, with_base)
        else:
            _write_hf(stage, components, with_base)
        commit_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def _run_folder(run: str | Path) -> Path:
    for folder in (Path(run), Path("runs") / str(run)):
        if (folder / "stage1" / "tokens" / MANIFEST_FILE).is_file():
            return folder
    raise DppmgError(
        f"no token checkpoint for run {str(run)!r}: looked for stage1/tokens/{MANIFEST_FILE} in {run} and "
        f"runs/{run}; run `make stage1` (or `dppmg stage1 CONFIG run_name=...`) first"
    )


@dataclass
class Tuned:
    """A finished run's policy with its tuned tokens loaded, and where its base generators live.

    Args:
        policy: the generators with the tokens injected (stage2_generation.policy.Policy).
        generators: the warm-start cache folder the base generators load from (generators.json, text/, image/).
        model_cache: features.cache_dir, where GGUF text models keep their dequantized copy.
    """

    policy: Any
    generators: Path
    model_cache: Path


def load_tuned(folder: Path, progress: bool = True) -> Tuned:
    """The run's generators with its tuned tokens loaded, as stage 2 left them."""
    from stage2_generation.pipeline import TOKENS_FILE, load_components, run_config

    cfg = run_config(folder)
    c = load_components(cfg, progress, trained=folder / "stage2" / TOKENS_FILE)
    generators = c.policy.gen.info.get("folder")
    if generators is None or not (Path(generators) / GENERATORS_MANIFEST).is_file():
        raise DppmgError(
            f"the run's warm-started generators are not in the cache ({generators}); rerun stage 2"
        )
    return Tuned(c.policy, Path(generators), Path(cfg.features.cache_dir))


def image_base(t: Tuned) -> str:
    """The base pipeline the image rows belong to (the warm-start saves every pipeline, tiny or pretrained)."""
    return str(t.generators / IMAGE_DIR)


def text_base(t: Tuned) -> str:
    """The base LM the text rows belong to: the cached warm-started LM, or the pretrained one it left untouched."""
    source = read_json(t.generators / GENERATORS_MANIFEST).get("text_source")
    if source is None:
        return str(t.generators / TEXT_DIR)
    model = resolve_causal_lm(source)
    if model.kind in ("packaged", "gguf"):  # transformers reads the dequantized folder, not the GGUF file
        return str(dequantized_folder(Path(model.location), t.model_cache))
    return str(model.location)


def _write_safetensors(stage: Path, run: str, ckpt: TokenCheckpoint, c: Tuned | None) -> None:
    tensors: dict[str, torch.Tensor] = {}
    manifest = {k: v for k, v in ckpt.manifest.items() if k != "metrics"}
    manifest["kind"] = "dppmg-token-export"
    for m in ckpt.modalities:
        tensors |= {
            f"codebook.{m}": ckpt.codebooks[m],
            f"codes.{m}": ckpt.codes[m],
            f"user_vectors.{m}": ckpt.user_vectors[m],
        }
        injected = getattr(c.policy, m, None) if c is not None else None
        if injected is not None:
            tensors[f"rows.{m}"] = torch.stack(list(injected.named_rows().values())).contiguous()
            manifest["modalities"][m]["base"] = text_base(c) if m == "text" else image_base(c)
            manifest["modalities"][m]["row_strings"] = list(injected.token_strings)
            manifest["modalities"][m]["expansions"] = injected.expansions()
        manifest["modalities"][m]["tensors"] = {
            k: f"{k}.{m}" for k in ("codebook", "codes", "user_vectors", *(["rows"] if injected else []))
        }
    save_file(tensors, str(stage / EXPORT_FILE), metadata={"kind": "dppmg-token-export"})
    write_json(stage / MANIFEST_FILE, manifest)
    readme = _SAFETENSORS_README.format(
        run=run, tensors=EXPORT_FILE, modalities=", ".join(ckpt.modalities),
        rows_line=_ROWS_LINE if c is not None else "- (no `rows.m`: stage 2 has not finished)\n",
    )  # fmt: skip
    write_text(stage / README_FILE, readme)


def _need(c: Tuned, modality: str) -> Any:
    injected = getattr(c.policy, modality)
    if injected is None:
        raise DppmgError(
            f"the run has no {modality} tokens to export (its stage-1 modalities lack {modality!r})"
        )
    return injected


def _into(stage: Path, write: Callable[[Path], Any]) -> None:
    """Run an injection.export_* writer (it builds its own folder atomically) and move its files into `stage`."""
    inner = stage / "tokens"
    write(inner)
    for f in inner.iterdir():
        f.rename(stage / f.name)
    inner.rmdir()


def _write_textual_inversion(stage: Path, c: Tuned, with_base: bool) -> None:
    injected = _need(c, "image")
    _into(stage, lambda inner: export_image_tokens(injected, inner))
    base = image_base(c)
    pipe = c.policy.gen.pipe
    readme = (stage / README_FILE).read_text(encoding="utf-8")
    if with_base:
        shutil.copytree(base, stage / BASE_DIR)
        base = f"<this folder>/{BASE_DIR}"
    if pipe.vae is None:
        from stage2_generation.generators import image_shape

        height, width = image_shape(pipe)
        readme += _PIXEL_SPACE_NOTE.format(base=base, height=height, width=width)
    write_text(stage / README_FILE, readme.replace("<base pipeline>", base))
    write_json(stage / BASE_FILE, {"image_pipeline": base, "pixel_space": pipe.vae is None})


def _write_hf(stage: Path, c: Tuned, with_base: bool) -> None:
    injected = _need(c, "text")
    # The tokenizer as stage 2 used it (the tokens already added), saved with save_pretrained.
    _into(stage, lambda inner: export_text_tokens(injected, c.policy.gen.lm_tokenizer, inner))
    base = text_base(c)
    readme = (stage / README_FILE).read_text(encoding="utf-8").replace("<base model>", base)
    if with_base:
        _write_base_lm(stage, base)
        readme += (
            "\nThis folder also holds the base model with the rows written into its embedding table, so\n"
            '`AutoModelForCausalLM.from_pretrained("<this folder>")` loads the tokens with no further step.\n'
        )
    write_text(stage / README_FILE, readme)
    write_json(stage / BASE_FILE, {"text_model": base, "with_base": with_base})


def _write_base_lm(stage: Path, base: str) -> None:
    """The base LM, loaded as a user would, with the exported rows written in, saved beside the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(stage))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    load_exported_tokens(model, tokenizer, stage / TEXT_ROWS_FILE)
    model.save_pretrained(str(stage))


def export_summary(out: Path) -> str:
    """One line per file of an export folder, for the command line."""
    files = sorted(p for p in out.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files) / 2**20
    shown = [str(p.relative_to(out)) for p in files if p.parent == out]
    return f"wrote {out} ({len(files)} files, {size:.1f} MB): " + ", ".join(shown)
