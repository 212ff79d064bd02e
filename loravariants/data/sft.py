"""Supervised fine-tuning data in the LongAlpaca / LongQA style.

A record is a JSON object ``{"instruction": str, "input": str (optional), "output": str}``,
read from a ``.json`` file (a list of records) or a ``.jsonl`` file (one per line). The prompt
is the Alpaca template (below); the model learns only the response::

    tokens: <s> [ prompt ....................... ] [ output ...... ] </s> <pad> <pad>
    labels: -100 -100 ........................ -100 [ output ...... ] </s> -100  -100

The collate function right-pads a batch to its longest sequence rounded up to ``multiple_of``
(the S2-Attn group size) and returns ``input_ids``, ``attention_mask`` and ``labels``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .packing import IGNORE_INDEX

__all__ = [
    "PROMPT_WITH_INPUT",
    "PROMPT_NO_INPUT",
    "format_prompt",
    "load_sft_records",
    "encode_sft",
    "SFTDataset",
    "SFTCollator",
]

#: Alpaca's template for records with a non-empty ``input``
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
#: Alpaca's template for records without ``input`` (LongAlpaca puts the document in the
#: instruction)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(record: dict) -> str:
    """The prompt text of a record (everything before the response)."""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def _check_record(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"{where}: field {key!r} must be a string (fields: {sorted(record)})")
    if not isinstance(record.get("input", ""), str):
        raise ValueError(f"{where}: field 'input' must be a string")
    return record


def load_sft_records(path: str | os.PathLike) -> list[dict]:
    """Records from a ``.json`` (list) or ``.jsonl`` file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: invalid JSON or a record without string ``instruction``/``output``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(_check_record(json.loads(line), f"{path}:{lineno}"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from e
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return [_check_record(r, f"{path}[{i}]") for i, r in enumerate(data)]


def encode_sft(record: dict, tokenizer, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Token ids and labels of one record.

    ``input_ids`` = prompt (with the tokenizer's leading special tokens, e.g. BOS) + output +
    EOS; ``labels`` are -100 over the prompt. Prompt and output are tokenised separately, so
    the boundary is exact. ``max_length`` truncates the end (the response first, then the prompt).

    Returns:
        ``{"input_ids": (n,), "labels": (n,)}``.
    """
    _check_record(record, "record")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id")
    # The prompt starts as the tokenizer starts any text (BOS for Llama-style tokenizers).
    prompt = list(tokenizer(format_prompt(record))["input_ids"])
    if prompt and prompt[-1] == tokenizer.eos_token_id:
        prompt.pop()
    answer = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    answer = answer + [tokenizer.eos_token_id]
    ids = prompt + answer
    labels = [IGNORE_INDEX] * len(prompt) + answer
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


class SFTDataset(Dataset):
    """Encoded records (tokenised once, up front); items as :func:`encode_sft`."""

    def __init__(self, records: Sequence[dict], tokenizer, max_length: int | None = None):
        self.items = [encode_sft(r, tokenizer, max_length) for r in records]

    @classmethod
    def from_file(cls, path, tokenizer, max_length: int | None = None) -> SFTDataset:
        return cls(load_sft_records(path), tokenizer, max_length)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


class SFTCollator:
    """Right-pad a batch to the longest item, rounded up to a multiple of ``multiple_of``.

    Returns ``input_ids``, ``attention_mask`` (1 real, 0 pad) and ``labels`` (-100 on padding),
    each ``(batch, n)`` with ``n % multiple_of == 0``.
    """

    def __init__(self, pad_token_id: int, multiple_of: int = 1):
        if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
            raise ValueError(f"multiple_of must be a positive integer, got {multiple_of!r}")
        if pad_token_id is None:
            raise ValueError("pad_token_id is required (the tokenizer has no pad token?)")
        self.pad_token_id = pad_token_id
        self.multiple_of = multiple_of

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(it["input_ids"]) for it in items)
        n = -(-longest // self.multiple_of) * self.multiple_of
        ids = torch.full((len(items), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for row, it in enumerate(items):
            k = len(it["input_ids"])
            ids[row, :k] = torch.as_tensor(it["input_ids"])
            labels[row, :k] = torch.as_tensor(it["labels"])
            mask[row, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
