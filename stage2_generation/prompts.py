"""Prompt templates: the keyword and token placeholders, chat formatting, and what joins a prompt and its target.

The warm-start trains on these prompts and `Policy` builds the personalized ones from them, so training and
generation see the same prompts; `target_separator` joins a prompt to its target in the warm-start's and the
grounding's text losses.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from transformers import PreTrainedTokenizerBase

from dppmg.config import WarmStartConfig
from dppmg.errors import DppmgError

KEYWORDS = "{keywords}"  # the placeholder in the prompt templates (str.replace, so other braces are literal)
TOKENS = "{tokens}"  # where a user's preference tokens go in a template (first when it has none)


def fill_prompt(template: str, keywords: Any, tokens: str = "") -> str:
    """The prompt for an item's keywords (missing keywords give the template with an empty phrase).

    `tokens` (a user's preference tokens, or hint words) go where the template says {tokens}, else first.
    """
    phrase = "" if keywords is None or pd.isna(keywords) else str(keywords).strip()
    filled = template.replace(KEYWORDS, phrase)
    if TOKENS in filled:
        return filled.replace(TOKENS, tokens).strip()
    return (tokens + filled.strip()).strip()


def target_separator(cfg: WarmStartConfig) -> str:
    """What joins a prompt and its target text: a space after "keywords:", nothing after a chat prompt."""
    return "" if cfg.text_chat else " "


def chat_prompt(tokenizer: PreTrainedTokenizerBase, message: str, system: str = "") -> str:
    """`message` as the user turn of the tokenizer's chat template, ending where the assistant's answer starts.

    An empty `system` leaves the system turn to the template (some add a default one). When the template writes
    the BOS token and the tokenizer also adds it on encoding, the template's copy is dropped, so that encoding the
    prompt gives one BOS, not two.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DppmgError(
            f"stage2.warmstart.text_chat is true, but the text model's tokenizer ({type(tokenizer).__name__}) has "
            "no chat template; set text_chat=false or use an instruction model"
        )
    turns = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": message}
    ]
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text
