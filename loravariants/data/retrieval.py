"""Synthetic retrieval mixed into pretraining: passkey prompts and key-value lookups in code.

A model that never had to fetch a fact from far back in its context cannot show what context
extension does to that ability. The built-in base therefore sees, besides plain source code,
blocks that end with one of two retrieval examples (each block is exactly ``context_length``
tokens; a random span of the code stream fills the front)::

    passkey:   ... code ... </s> <s> [task] [filler] The pass key is 12345. Remember it. ...
               [filler] What is the pass key? The pass key is 12345.
    key-value: ... code ... </s> <s> def f(x):          <- a window of a training document
                   retry_limit_38 = 40213                  <- assignments spread through it
                   ...  return x
                   assert retry_limit_38 == 40213          <- lookups at the end

The passkey prompt is exactly the one the evaluation uses (``data/passkey.py``), drawn from
seeds far from the evaluation's (which are ``seed * 1000 + trial`` for small seeds), so the
model learns the format, not the evaluation's keys. The answer is followed by ``.`` as in the
key line. Everything is drawn from one ``random.Random``: a seed gives the same blocks.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from .passkey import KEY_LINE, QUESTION, TASK, passkey_prompt

__all__ = [
    "PASSKEY_SEED_OFFSET",
    "passkey_min_tokens",
    "kv_lookup_text",
    "passkey_example",
    "kv_example",
    "retrieval_block",
    "RetrievalMixDataset",
]

#: training passkey prompts use seeds from here on; evaluation uses ``seed * 1000 + trial``
PASSKEY_SEED_OFFSET = 1_000_000_000

_WORDS = (
    "alpha", "batch", "buffer", "cache", "chunk", "count", "cursor", "delay", "depth", "field",
    "flag", "index", "limit", "mode", "offset", "port", "quota", "rank", "retry", "score",
    "size", "slot", "step", "timeout", "token", "total", "width", "level", "weight", "window",
)  # fmt: skip


def _name(rng: random.Random) -> str:
    return f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}_{rng.randint(10, 99)}"


def kv_lookup_text(code_lines: Sequence[str], rng: random.Random, n_pairs: int) -> str:
    """Code with ``n_pairs`` assignments ``name = value`` inserted at random lines and, after
    it, one ``assert name == value`` per pair in a shuffled order.

    Args:
        code_lines: the lines of a code window (without newlines).
        rng: the source of names, values and positions.
        n_pairs: assignments to spread (distinct names; values in [1, 50000]).

    Returns:
        The text, lines joined with ``\\n``.
    """
    names: list[str] = []
    while len(names) < n_pairs:
        name = _name(rng)
        if name not in names:
            names.append(name)
    pairs = [(name, rng.randint(1, 50000)) for name in names]
    lines = list(code_lines)
    # insert from the back so earlier positions stay valid; positions drawn before inserting
    positions = sorted((rng.randint(0, len(lines)) for _ in pairs), reverse=True)
    for pos, (name, value) in zip(positions, pairs, strict=True):
        lines.insert(pos, f"{name} = {value}")
    lookups = pairs[:]
    rng.shuffle(lookups)
    lines += [f"assert {name} == {value}" for name, value in lookups]
    return "\n".join(lines)


def passkey_min_tokens(tokenizer) -> int:
    """Tokens of the shortest passkey prompt (no filler, a 5-digit key), special tokens
    included."""
    return len(tokenizer(f"{TASK} {KEY_LINE.format(key=50000)} {QUESTION}")["input_ids"])


def passkey_example(tokenizer, max_tokens: int, rng: random.Random) -> tuple[list[int], int]:
    """A passkey prompt and its answer (``" <key>."``), at most ``max_tokens`` tokens.

    Returns:
        ``(ids, n_answer)``: the example's token ids and how many of its last tokens are the
        answer.

    The prompt length is uniform between half of ``max_tokens`` (at least the prompt without
    filler: about 80 tokens with the built-in tokenizer) and ``max_tokens``, less the answer;
    the key and its depth come from a seed drawn from ``rng``.

    Raises:
        ValueError: ``max_tokens`` leaves no room for the prompt without filler and its answer.
    """
    shortest = passkey_min_tokens(tokenizer)
    seed = PASSKEY_SEED_OFFSET + rng.randrange(1 << 30)
    length = rng.randint(min(max(max_tokens // 2, shortest), max_tokens), max_tokens)
    while True:
        if length < shortest:
            raise ValueError(
                f"a passkey example needs more than {max_tokens} tokens with this tokenizer "
                f"(the prompt alone takes {shortest}); raise context_length or set "
                f"passkey_fraction to 0"
            )
        prompt, key = passkey_prompt(tokenizer, length, seed=seed)
        answer = tokenizer(" " + key + ".", add_special_tokens=False)["input_ids"]
        overflow = len(prompt) + len(answer) - max_tokens
        if overflow <= 0:
            return prompt + answer, len(answer)
        length -= overflow


def kv_example(
    tokenizer, max_tokens: int, rng: random.Random, documents: Sequence[str], max_pairs: int = 3
) -> tuple[list[int], int]:
    """A window of one of ``documents`` with key-value assignments spread through it and the
    lookups at its end (:func:`kv_lookup_text`), at most ``max_tokens`` tokens.

    The window starts at a random line of a random document; lines are dropped from its front
    (and, past the last line, pairs) until the whole example fits, so the lookups are never cut.

    Returns:
        ``(ids, n_answer)``: the example's token ids and how many of its last tokens are the
        lookup lines (their tokenisation at the boundary may differ by a token).

    Raises:
        ValueError: not even one assignment and its lookup fit in ``max_tokens``.
    """
    n_pairs = rng.randint(1, max_pairs)
    text = ""
    for _ in range(10):  # a document with at least a few lines
        text = documents[rng.randrange(len(documents))]
        if text.count("\n") >= 4:
            break
    lines = text.split("\n")
    start = rng.randrange(len(lines))
    window = lines[start : start + max_tokens // 4]  # code averages more than 4 tokens a line
    kv_seed = rng.randrange(1 << 30)  # the same names and values at every attempt to fit
    while True:
        text = kv_lookup_text(window, random.Random(kv_seed), n_pairs)
        ids = tokenizer(text)["input_ids"]
        if len(ids) <= max_tokens:
            head = "\n".join(text.split("\n")[:-n_pairs]) + "\n"
            return ids, min(len(ids), max(1, len(ids) - len(tokenizer(head)["input_ids"])))
        if window:
            window = window[max(1, len(window) // 5) :]
        elif n_pairs > 1:
            n_pairs -= 1
        else:
            raise ValueError(
                f"a key-value example needs more than {max_tokens} tokens with this tokenizer; "
                f"raise context_length or set kv_fraction to 0"
            )


def retrieval_block(
    example: Sequence[int], stream: torch.Tensor, length: int, eos_id: int, rng: random.Random
) -> torch.Tensor:
    """One block of ``length`` tokens: a random span of ``stream``, EOS, then ``example``.

    Args:
        example: token ids, at most ``length - 1``.
        stream: the 1-D token stream of the training documents (longer than ``length``).
        length: block length.
        eos_id: the separator (ends the span as it ends every document).
        rng: picks the span.

    Returns:
        ``(length,)`` LongTensor whose last ``len(example)`` tokens are ``example``.
    """
    if len(example) > length - 1:
        raise ValueError(f"example of {len(example)} tokens does not fit a {length}-token block")
    fill = length - 1 - len(example)
    begin = rng.randrange(max(1, stream.numel() - fill))
    head = stream[begin : begin + fill]
    tail = torch.tensor([eos_id, *example], dtype=torch.long)
    return torch.cat([head, tail])


class RetrievalMixDataset(Dataset):
    """Packed blocks with a share replaced by retrieval blocks (for fine-tuning data).

    Whether block ``i`` is replaced, and by what, depends on ``(seed, i)`` only, and the
    synthetic block is made when it is read: every row and seed of a comparison reads the same
    data, and only the blocks a run consumes are generated.

    Args:
        base: the packed dataset (items ``{"input_ids", "labels"}`` of ``(seq_len,)``).
        tokenizer: its tokenizer.
        documents: texts the key-value examples take their code from.
        passkey_fraction: expected share of passkey blocks.
        kv_fraction: expected share of key-value blocks.
        seed: selects the blocks and draws their content.
    """

    def __init__(
        self,
        base,
        tokenizer,
        documents: Sequence[str],
        passkey_fraction: float,
        kv_fraction: float,
        seed: int = 0,
    ) -> None:
        self.base, self.tokenizer, self.documents = base, tokenizer, list(documents)
        self.passkey_fraction, self.kv_fraction, self.seed = passkey_fraction, kv_fraction, seed
        self.stream = base.input_ids.flatten()
        self.seq_len = base.input_ids.shape[1]

    def __len__(self) -> int:
        return len(self.base)

    def kind(self, i: int) -> str:
        """``"passkey"``, ``"kv"`` or ``"text"``: what block ``i`` holds."""
        u = random.Random(f"{self.seed}/{i}/kind").random()
        if u < self.passkey_fraction:
            return "passkey"
        if u < self.passkey_fraction + self.kv_fraction:
            return "kv"
        return "text"

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        kind = self.kind(i)
        if kind == "text":
            return self.base[i]
        rng = random.Random(f"{self.seed}/{i}/content")
        n = self.seq_len
        if kind == "passkey":
            example, _ = passkey_example(self.tokenizer, n - 1, rng)
        else:
            example, _ = kv_example(self.tokenizer, n - 1, rng, self.documents)
        ids = retrieval_block(example, self.stream, n, self.tokenizer.eos_token_id, rng)
        return {"input_ids": ids, "labels": ids.clone()}
