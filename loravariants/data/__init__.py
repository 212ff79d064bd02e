"""Data: corpora, a byte-level BPE tokenizer, packing into blocks, SFT records, passkey prompts.

The two entry points the experiment code uses take a data config (any object with ``source``,
``text_field``, ``max_documents`` and ``validation_fraction``, e.g. ``config.DataConfig``):

- :func:`make_train_blocks`: the training documents packed into blocks of ``seq_len`` tokens;
- :func:`load_validation_tokens`: the held-out documents as one EOS-joined token stream.

See ``docs/data.md`` for the formats.
"""

from __future__ import annotations

import torch

from .corpus import (
    Corpus,
    Document,
    is_selection,
    is_validation,
    load_corpus,
    load_documents,
    split_documents,
    stdlib_dir,
)
from .packing import (
    IGNORE_INDEX,
    PackedDataset,
    check_seq_len,
    join_with_eos,
    pack_blocks,
    tokenize_documents,
)
from .passkey import passkey_prompt
from .sft import SFTCollator, SFTDataset, encode_sft, format_prompt, load_sft_records
from .tokenizer import train_tokenizer

#: bump when a change of the pipeline changes the tokens a config produces (cache keys use it)
DATA_PIPELINE_VERSION = 1

__all__ = [
    "DATA_PIPELINE_VERSION",
    "IGNORE_INDEX",
    "Corpus",
    "Document",
    "PackedDataset",
    "SFTCollator",
    "SFTDataset",
    "check_seq_len",
    "encode_sft",
    "format_prompt",
    "is_selection",
    "is_validation",
    "join_with_eos",
    "load_corpus",
    "load_documents",
    "load_sft_records",
    "load_validation_tokens",
    "make_train_blocks",
    "pack_blocks",
    "passkey_prompt",
    "split_documents",
    "stdlib_dir",
    "tokenize_documents",
    "train_tokenizer",
    "corpus_from_config",
]


def corpus_from_config(data_config, max_chars: int | None = None) -> Corpus:
    """The split corpus a data config names."""
    return load_corpus(
        data_config.source,
        text_field=getattr(data_config, "text_field", "text"),
        max_documents=getattr(data_config, "max_documents", None),
        validation_fraction=getattr(data_config, "validation_fraction", 0.05),
        max_chars=max_chars,
        selection_fraction=getattr(data_config, "selection_fraction", None) or 0.0,
    )


def make_train_blocks(
    data_config,
    tokenizer,
    seq_len: int,
    multiple_of: int = 1,
    remainder: str = "drop",
) -> PackedDataset:
    """The training documents, tokenised, joined with EOS and packed into blocks.

    Args:
        data_config: ``source``, ``text_field``, ``max_documents``, ``validation_fraction``.
        tokenizer: a transformers tokenizer with an EOS token.
        seq_len: block length in tokens, a multiple of ``multiple_of``.
        multiple_of: the S2-Attn group size (1: no constraint).
        remainder: ``"drop"`` (default) or ``"pad"`` the last partial block.

    Returns:
        A :class:`PackedDataset` of ``{"input_ids", "labels"}`` items of shape ``(seq_len,)``;
        with ``passkey_fraction`` / ``kv_fraction`` in the data config (default 0), a
        ``retrieval.RetrievalMixDataset`` over it with that share of retrieval blocks.
    """
    check_seq_len(seq_len, multiple_of)
    corpus = corpus_from_config(data_config)
    ids = tokenize_documents([d.text for d in corpus.train], tokenizer)
    stream = join_with_eos(ids, tokenizer.eos_token_id)
    blocks = PackedDataset.from_stream(
        stream, seq_len, multiple_of, remainder, tokenizer.pad_token_id
    )
    passkey = getattr(data_config, "passkey_fraction", 0.0)
    kv = getattr(data_config, "kv_fraction", 0.0)
    if passkey or kv:
        from .retrieval import RetrievalMixDataset

        return RetrievalMixDataset(blocks, tokenizer, [d.text for d in corpus.train], passkey, kv)
    return blocks


def load_validation_tokens(
    data_config, tokenizer, max_tokens: int | None = None, split: str = "validation"
) -> torch.Tensor:
    """The held-out documents as one 1-D ``LongTensor`` (each followed by EOS), truncated to
    ``max_tokens``. Documents are tokenised only until ``max_tokens`` is reached.

    ``split="selection"``: the learning-rate selection documents instead (``data_config.
    selection_fraction``), disjoint from the validation and the training documents.
    """
    if split not in ("validation", "selection"):
        raise ValueError(f"split must be 'validation' or 'selection', got {split!r}")
    corpus = corpus_from_config(data_config)
    docs = corpus.validation if split == "validation" else corpus.selection
    if not docs:
        raise ValueError("no selection documents: set data.selection_fraction (or lr_grid)")
    ids: list[list[int]] = []
    total = 0
    for doc in docs:
        if max_tokens is not None and total >= max_tokens:
            break
        ids += tokenize_documents([doc.text], tokenizer)
        total += len(ids[-1]) + 1
    stream = join_with_eos(ids, tokenizer.eos_token_id)
    return stream if max_tokens is None else stream[:max_tokens]
