"""Where a word sits in a tokenized prompt, found with the model's own tokenizer (never by
splitting on spaces). A word that splits into several BPE tokens keeps all its positions.

`prompt_positions` gives {word: positions}; `describe_words` adds the BPE pieces, whether the
word was split and how often it occurs, and `describe_lines` turns that into lines stage 01 can
print. A word that occurs more than once is located at its FIRST occurrence (a warning says so):
a later occurrence may belong to another phrase ("a bird next to a bird feeder")."""
from __future__ import annotations

import logging
import re
import warnings

log = logging.getLogger(__name__)


class TokenError(ValueError):
    """The object word is missing from the prompt or unknown to the tokenizer."""


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False).input_ids if text else []


def _special_counts(tokenizer) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after the text (1, 1 for CLIP)."""
    full = tokenizer("photo").input_ids
    bare = _ids(tokenizer, "photo")
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return i, len(full) - i - len(bare)
    return 0, 0


def _occurrences(prompt: str, word: str) -> list[re.Match]:
    return list(re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, flags=re.IGNORECASE))


def _check_text(prompt: str, word: str) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise TokenError(f"the prompt is empty ({prompt!r}); set `prompt` to a sentence with the "
                         f"object word, e.g. 'a photo of a {{object}}'.")
    if not isinstance(word, str) or not word.strip():
        raise TokenError(f"an empty word ({word!r}) was asked for in {prompt!r}; set `object` (and "
                         f"every `parts` entry) to a non-empty word of the prompt.")


def _locate(tokenizer, prompt: str, word: str) -> tuple[list[int], list[int], int]:
    """(positions in the model input, token ids of the word, number of occurrences)."""
    _check_text(prompt, word)
    found = _occurrences(prompt, word)
    if not found:
        raise TokenError(f"the word {word!r} is not in the prompt {prompt!r}; set `object` (or "
                         f"`parts`) to a word of the prompt, or change `prompt`.")
    m = found[0]
    before = _ids(tokenizer, prompt[:m.start()].rstrip())
    upto = _ids(tokenizer, prompt[:m.end()])
    if upto[:len(before)] != before or len(upto) == len(before):
        raise TokenError(f"could not locate {word!r} in the tokens of {prompt!r}.")
    offset, _ = _special_counts(tokenizer)
    return list(range(offset + len(before), offset + len(upto))), upto[len(before):], len(found)


def _check_known(tokenizer, word: str, ids: list[int]) -> None:
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and all(i == unk for i in ids):
        raise TokenError(f"the word {word!r} is unknown to this model's tokenizer (it maps to "
                         f"{tokenizer.unk_token!r}); use a word from its vocabulary as `object`.")


def _check_limit(tokenizer, prompt: str, word: str, positions: list[int],
                 max_length: int | None = None) -> None:
    offset, suffix = _special_counts(tokenizer)
    n = tokenizer.model_max_length if max_length is None else int(max_length)
    limit = n - suffix  # truncation keeps the end token in the last slot
    if positions[-1] >= limit:
        total = offset + len(_ids(tokenizer, prompt)) + suffix
        raise TokenError(f"{word!r} falls beyond the tokenizer's {limit} tokens in {prompt!r}: it is at "
                         f"token position(s) {positions} of {total}, but the text encoder reads only "
                         f"{n} tokens ({n - offset - suffix} of text), so the word would be cut off. "
                         f"Shorten `prompt` or put the object word earlier.")


def word_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Token positions (in the model input, special tokens counted) of the first `word` in `prompt`."""
    positions, ids, _ = _locate(tokenizer, prompt, word)
    _check_known(tokenizer, word, ids)
    _check_limit(tokenizer, prompt, word, positions)
    return positions


def describe_words(tokenizer, prompt: str, words: list[str],
                   max_length: int | None = None) -> dict[str, dict]:
    """Per word: positions, BPE pieces (`tokens`), `split` (more than one token), `occurrences`
    in the prompt. Raises TokenError like `word_positions`. `max_length`: tokens the text encoder
    reads (default the tokenizer's model_max_length; T5 segments: the pipeline's max_sequence_length)."""
    out = {}
    for w in words:
        positions, ids, count = _locate(tokenizer, prompt, w)
        _check_known(tokenizer, w, ids)
        _check_limit(tokenizer, prompt, w, positions, max_length)
        out[w] = {"positions": positions, "tokens": tokenizer.convert_ids_to_tokens(ids),
                  "split": len(ids) > 1, "occurrences": count}
    return out


def describe_lines(info: dict[str, dict]) -> list[str]:
    """Human-readable lines for `describe_words`' result (stage 01 prints them)."""
    lines = []
    for w, d in info.items():
        how = (f"split into {len(d['tokens'])} tokens {d['tokens']}; the map sums all of them"
               if d["split"] else f"one token {d['tokens'][0]!r}")
        lines.append(f"{w!r}: token position(s) {d['positions']}, {how}")
        if d["occurrences"] > 1:
            lines.append(f"{w!r} occurs {d['occurrences']} times in the prompt; only the first "
                         f"occurrence is used")
    return lines


def prompt_positions(tokenizer, prompt: str, words: list[str]) -> dict[str, list[int]]:
    """Positions of each word; the stage-01 map is the sum over all of them. Split words are
    logged (INFO, logger `fgbg_utils.core.tokens`); a repeated word gives a warning."""
    info = describe_words(tokenizer, prompt, words)
    for w, d in info.items():
        if d["split"]:
            log.info("%r splits into %d tokens %s at positions %s; the map sums them",
                     w, len(d["tokens"]), d["tokens"], d["positions"])
        if d["occurrences"] > 1:
            warnings.warn(f"{w!r} occurs {d['occurrences']} times in the prompt {prompt!r}; only the "
                          f"first occurrence (token positions {d['positions']}) is used", stacklevel=2)
    return {w: d["positions"] for w, d in info.items()}
