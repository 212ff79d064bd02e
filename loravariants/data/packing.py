"""Tokenise documents, join them with EOS and pack the stream into fixed-length blocks.

::

    <s> doc A | EOS | <s> doc B .............. | EOS | <s> doc C | EOS
    [------------- block 0 -------------][------------- block 1 -------------][ rest ]

Blocks are cut from the one joined stream, so a document may span two blocks (as in LongLoRA's
RedPajama packing); attention is not reset at EOS. The rest shorter than ``seq_len`` is dropped
by default (``remainder="drop"``) or padded with ``pad_id`` and masked from the loss
(``remainder="pad"``, labels -100). Each item is ``{"input_ids": (seq_len,), "labels":
(seq_len,)}``; the model shifts labels itself. No attention mask is needed: padding only ever
sits at the end of the last block, where causal attention keeps it out of every real token's
view, and its labels are -100.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

__all__ = [
    "IGNORE_INDEX",
    "check_seq_len",
    "tokenize_documents",
    "join_with_eos",
    "pack_blocks",
    "PackedDataset",
]

#: label value ignored by the loss (PyTorch / transformers convention)
IGNORE_INDEX = -100


def check_seq_len(seq_len: int, multiple_of: int = 1) -> None:
    """Raise ``ValueError`` unless ``seq_len`` is a positive multiple of ``multiple_of``
    (the S2-Attn group size: groups must tile the sequence)."""
    for name, v in (("seq_len", seq_len), ("multiple_of", multiple_of)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if seq_len % multiple_of:
        raise ValueError(
            f"seq_len must be a multiple of {multiple_of} (the attention group size), "
            f"got {seq_len}; nearest: {max(multiple_of, seq_len // multiple_of * multiple_of)}"
        )


def tokenize_documents(
    texts: Sequence[str], tokenizer, add_special_tokens: bool = True, batch_size: int = 64
) -> list[list[int]]:
    """Token ids of each text, batched for the fast tokenizers.

    With ``add_special_tokens`` (default) each document starts the way the tokenizer starts any
    text (``<s>`` for Llama-style tokenizers and ours, nothing for GPT-2's), so the model sees
    at every document start what it will see at the start of a prompt.
    """
    out: list[list[int]] = []
    for i in range(0, len(texts), batch_size):
        batch = list(texts[i : i + batch_size])
        out += tokenizer(batch, add_special_tokens=add_special_tokens)["input_ids"]
    return out


def join_with_eos(token_lists: Sequence[Sequence[int]], eos_id: int) -> torch.Tensor:
    """One 1-D ``LongTensor``: each document followed by ``eos_id`` (not doubled when the
    tokenizer already ended it with EOS)."""
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token_id; documents cannot be joined")
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        if not ids or ids[-1] != eos_id:
            flat.append(eos_id)
    return torch.tensor(flat, dtype=torch.long)


def pack_blocks(
    stream: torch.Tensor,
    seq_len: int,
    multiple_of: int = 1,
    remainder: str = "drop",
    pad_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a 1-D token stream into blocks.

    Args:
        stream: ``(N,)`` token ids.
        seq_len: block length, a multiple of ``multiple_of``.
        multiple_of: the attention group size (S2-Attn), 1 for none.
        remainder: ``"drop"`` the last partial block, or ``"pad"`` it with ``pad_id``.
        pad_id: padding token id (required for ``"pad"``).

    Returns:
        ``(input_ids, labels)``, both ``(n_blocks, seq_len)``; labels equal input_ids except
        -100 on padding.

    Raises:
        ValueError: a bad ``seq_len``/``remainder``, or no complete block with ``"drop"``.
    """
    check_seq_len(seq_len, multiple_of)
    if remainder not in ("drop", "pad"):
        raise ValueError(f"remainder must be 'drop' or 'pad', got {remainder!r}")
    stream = torch.as_tensor(stream, dtype=torch.long).flatten()
    n_full, rest = divmod(stream.numel(), seq_len)
    ids = stream[: n_full * seq_len].view(n_full, seq_len)
    labels = ids.clone()
    if remainder == "pad" and rest:
        if pad_id is None:
            raise ValueError("remainder='pad' needs pad_id")
        last = torch.full((1, seq_len), pad_id, dtype=torch.long)
        last[0, :rest] = stream[n_full * seq_len :]
        last_labels = torch.full((1, seq_len), IGNORE_INDEX, dtype=torch.long)
        last_labels[0, :rest] = stream[n_full * seq_len :]
        ids, labels = torch.cat([ids, last]), torch.cat([labels, last_labels])
    if ids.shape[0] == 0:
        raise ValueError(
            f"only {stream.numel()} tokens: not one block of seq_len={seq_len}; "
            "use more documents, a shorter seq_len, or remainder='pad'"
        )
    return ids, labels


class PackedDataset(Dataset):
    """Fixed-length blocks; item ``i`` is ``{"input_ids": (seq_len,), "labels": (seq_len,)}``."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (n_blocks, seq_len), got {tuple(input_ids.shape)}")
        self.input_ids = input_ids
        self.labels = input_ids.clone() if labels is None else labels
        if self.labels.shape != input_ids.shape:
            raise ValueError("labels and input_ids must have the same shape")

    @classmethod
    def from_stream(
        cls,
        stream: torch.Tensor,
        seq_len: int,
        multiple_of: int = 1,
        remainder: str = "drop",
        pad_id: int | None = None,
    ) -> PackedDataset:
        """Blocks of a 1-D token stream (see :func:`pack_blocks`)."""
        return cls(*pack_blocks(stream, seq_len, multiple_of, remainder, pad_id))

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}
