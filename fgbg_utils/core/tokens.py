"""Where a word sits in a tokenized prompt, found with the model's own tokenizer (never by
splitting on spaces). A word that splits into several BPE tokens keeps all its positions."""
from __future__ import annotations

import re


class TokenError(ValueError):
    """The object word is missing from the prompt or unknown to the tokenizer."""


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def _special_counts(tokenizer) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after the text (1, 1 for CLIP)."""
    full = tokenizer("photo").input_ids
    bare = _ids(tokenizer, "photo")
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return i, len(full) - i - len(bare)
    return 0, 0


def word_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Token positions (in the model input, special tokens counted) of the first `word` in `prompt`."""
    m = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, flags=re.IGNORECASE)
    if m is None:
        raise TokenError(f"the word {word!r} is not in the prompt {prompt!r}; set `object` (or "
                         f"`parts`) to a word of the prompt, or change `prompt`.")
    before = _ids(tokenizer, prompt[:m.start()].rstrip())
    upto = _ids(tokenizer, prompt[:m.end()])
    if upto[:len(before)] != before or len(upto) == len(before):
        raise TokenError(f"could not locate {word!r} in the tokens of {prompt!r}.")
    offset, suffix = _special_counts(tokenizer)
    positions = list(range(offset + len(before), offset + len(upto)))
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and all(i == unk for i in upto[len(before):]):
        raise TokenError(f"the word {word!r} is unknown to this model's tokenizer (it maps to "
                         f"{tokenizer.unk_token!r}); use a word from its vocabulary as `object`.")
    limit = tokenizer.model_max_length - suffix  # truncation keeps the end token in the last slot
    if positions[-1] >= limit:
        raise TokenError(f"{word!r} falls beyond the tokenizer's {limit} tokens in {prompt!r}; "
                         f"shorten the prompt.")
    return positions


def prompt_positions(tokenizer, prompt: str, words: list[str]) -> dict[str, list[int]]:
    """Positions of each word; the stage-01 map is the sum over all of them."""
    return {w: word_positions(tokenizer, prompt, w) for w in words}
