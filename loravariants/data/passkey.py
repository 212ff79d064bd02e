"""Passkey retrieval prompts, as in LongLoRA's passkey test (itself after Mohtashami & Jaggi).

::

    [task description] [filler ... filler] The pass key is 12345. Remember it. 12345 is the
    pass key. [filler ... filler] What is the pass key? The pass key is

The filler ("The grass is green. The sky is blue. ...") is repeated sentence by sentence until
the prompt has the requested number of tokens (never more; fewer by less than one filler
sentence). The key is a random integer in [1, 50000] and its depth (the share of filler before
it) is random, both drawn from ``seed``, unless given.
"""

from __future__ import annotations

import random

__all__ = ["TASK", "FILLER", "KEY_LINE", "QUESTION", "passkey_prompt"]

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
_SENTENCES = [s.strip() + "." for s in FILLER.split(".") if s.strip()]


def _text(key: str, n_filler: int, depth: float) -> str:
    before = round(n_filler * depth)
    filler = [_SENTENCES[i % len(_SENTENCES)] for i in range(n_filler)]
    parts = [TASK, *filler[:before], KEY_LINE.format(key=key), *filler[before:], QUESTION]
    return " ".join(parts)


def passkey_prompt(
    tokenizer,
    length: int,
    seed: int = 0,
    key: int | str | None = None,
    depth: float | None = None,
) -> tuple[list[int], str]:
    """A passkey prompt of about ``length`` tokens (special tokens included).

    Args:
        tokenizer: any transformers tokenizer; the prompt is encoded with its special tokens.
        length: target prompt length in tokens; the result has at most ``length`` tokens and
            fewer by less than one filler sentence (a handful of tokens).
        seed: draws the key and the depth when they are not given.
        key: the pass key (default: random integer in [1, 50000]).
        depth: share of the filler placed before the key, in [0, 1] (default: random).

    Returns:
        ``(prompt_ids, answer)``: the prompt's token ids and the key as a string.

    Raises:
        ValueError: ``depth`` outside [0, 1], or ``length`` too short for the prompt without
            filler.
    """
    rng = random.Random(seed)
    key = str(rng.randint(1, 50000) if key is None else key)
    depth = rng.random() if depth is None else depth
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")

    def n_tokens(n_filler: int) -> int:
        return len(tokenizer(_text(key, n_filler, depth))["input_ids"])

    base = n_tokens(0)
    if length < base:
        raise ValueError(f"length must be >= {base} (the prompt without filler), got {length}")
    # Estimate from the per-sentence cost, then step to the largest count that fits.
    per = max(1.0, (n_tokens(len(_SENTENCES)) - base) / len(_SENTENCES))
    n = max(0, int((length - base) / per))
    while n > 0 and n_tokens(n) > length:
        n -= 1
    while n_tokens(n + 1) <= length:
        n += 1
    return tokenizer(_text(key, n, depth))["input_ids"], key
