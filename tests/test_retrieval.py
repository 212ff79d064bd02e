"""The synthetic retrieval mix of the built-in base's pretraining (data/retrieval.py)."""

from __future__ import annotations

import random

import pytest
import torch

from loravariants.data import train_tokenizer
from loravariants.data.passkey import QUESTION
from loravariants.data.retrieval import (
    kv_example,
    kv_lookup_text,
    passkey_example,
    passkey_min_tokens,
    retrieval_block,
)

CODE = [
    "import os",
    "",
    "def read(path):",
    "    with open(path) as f:",
    "        return f.read()",
    "",
    "class Box:",
    "    def __init__(self, size):",
    "        self.size = size",
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["\n".join(CODE) * 20, "The grass is green. The pass key is 12345. " * 50]
    return train_tokenizer(texts, vocab_size=400)


def test_kv_lookup_text_spreads_assignments_and_asks_each_once():
    text = kv_lookup_text(CODE, random.Random(3), n_pairs=3)
    lines = text.split("\n")
    assigned = [line for line in lines if " = " in line and line.split(" = ")[1].isdigit()]
    asserts = [line for line in lines if line.startswith("assert ")]
    assert len(assigned) == 3 and len(asserts) == 3
    # the lookups are the last lines and ask exactly the assigned pairs
    assert lines[-3:] == asserts
    assert sorted(a.replace("assert ", "").replace(" == ", " = ") for a in asserts) == sorted(
        assigned
    )
    # the code is kept, in order, around the inserted lines
    assert [line for line in lines[:-3] if line not in assigned] == CODE
    # values are 1..50000 and names distinct
    names = [a.split(" = ")[0] for a in assigned]
    assert len(set(names)) == 3
    assert all(1 <= int(a.split(" = ")[1]) <= 50000 for a in assigned)


def test_kv_lookup_text_is_seeded():
    a = kv_lookup_text(CODE, random.Random(0), 2)
    assert a == kv_lookup_text(CODE, random.Random(0), 2)
    assert a != kv_lookup_text(CODE, random.Random(1), 2)


def test_passkey_example_ends_with_the_answer(tokenizer):
    for seed in range(5):
        ids, n_answer = passkey_example(tokenizer, 200, random.Random(seed))
        assert len(ids) <= 200
        assert ids[0] == tokenizer.bos_token_id
        text = tokenizer.decode(ids, skip_special_tokens=True)
        head, answer = text.rsplit(QUESTION, 1)
        key = answer.strip().rstrip(".")
        assert key.isdigit() and f"The pass key is {key}. Remember it." in head
        assert tokenizer.decode(ids[-n_answer:]) == f" {key}."
        # the prompt uses at least half the room (the length is drawn in [max/2, max])
        assert len(ids) >= 100 - 8


def test_passkey_example_too_short_is_a_clear_error(tokenizer):
    shortest = passkey_min_tokens(tokenizer)
    with pytest.raises(ValueError, match="passkey_fraction"):
        passkey_example(tokenizer, shortest - 1, random.Random(0))


def test_kv_example_fits_and_keeps_the_lookups(tokenizer):
    docs = ["\n".join(CODE * 30)]
    for seed in range(5):
        ids, n_answer = kv_example(tokenizer, 96, random.Random(seed), docs)
        assert len(ids) <= 96
        text = tokenizer.decode(ids, skip_special_tokens=True)
        last = text.split("\n")[-1]
        assert last.startswith("assert ")
        name, value = last[len("assert ") :].split(" == ")
        assert f"{name} = {value}" in text
        # the answer span is the lookup lines (give or take the newline before them)
        assert tokenizer.decode(ids[-n_answer:]).strip().startswith("assert ")
        assert "assert" not in tokenizer.decode(ids[: -n_answer - 1]).split("\n")[-1]
    with pytest.raises(ValueError, match="kv_fraction"):
        kv_example(tokenizer, 8, random.Random(0), docs)


def test_retrieval_block_puts_the_example_last():
    stream = torch.arange(100, 200)
    block = retrieval_block([7, 8, 9], stream, 16, eos_id=1, rng=random.Random(0))
    assert block.shape == (16,) and block.dtype == torch.long
    assert block[-4:].tolist() == [1, 7, 8, 9]
    head = block[:12]
    assert torch.equal(head, torch.arange(int(head[0]), int(head[0]) + 12))  # one span
    with pytest.raises(ValueError, match="does not fit"):
        retrieval_block(list(range(16)), stream, 16, 1, random.Random(0))


def test_mix_dataset_replaces_a_seeded_share(tokenizer):
    from loravariants.data import PackedDataset
    from loravariants.data.retrieval import RetrievalMixDataset

    text = "\n".join(CODE * 200)
    stream = torch.tensor(tokenizer(text)["input_ids"] * 4)
    base = PackedDataset.from_stream(stream, 256)
    mix = RetrievalMixDataset(base, tokenizer, [text], passkey_fraction=0.3, kv_fraction=0.2)
    assert len(mix) == len(base) and len(base) >= 40
    kinds = [mix.kind(i) for i in range(len(mix))]
    share = {k: kinds.count(k) / len(kinds) for k in ("passkey", "kv", "text")}
    assert 0.1 < share["passkey"] < 0.5 and 0.05 < share["kv"] < 0.4 and share["text"] > 0.3
    for i, kind in enumerate(kinds[:20]):
        item = mix[i]
        assert item["input_ids"].shape == (256,)
        assert torch.equal(item["labels"], item["input_ids"])
        decoded = tokenizer.decode(item["input_ids"])
        if kind == "text":
            assert torch.equal(item["input_ids"], base[i]["input_ids"])
        elif kind == "passkey":
            assert QUESTION in decoded
        else:
            assert decoded.split("\n")[-1].startswith("assert ")
    # the same (seed, index) gives the same block, in any reading order; another seed differs
    again = RetrievalMixDataset(base, tokenizer, [text], 0.3, 0.2)
    assert all(torch.equal(again[i]["input_ids"], mix[i]["input_ids"]) for i in (7, 3, 0))
    other = RetrievalMixDataset(base, tokenizer, [text], 0.3, 0.2, seed=1)
    assert [other.kind(i) for i in range(len(mix))] != kinds


def test_data_config_mix_fields():
    from loravariants.config import DataConfig

    assert DataConfig().passkey_fraction == 0 and DataConfig().kv_fraction == 0
    with pytest.raises(ValueError, match="data.passkey_fraction"):
        DataConfig(passkey_fraction=1.0)
    with pytest.raises(ValueError, match="below 1"):
        DataConfig(passkey_fraction=0.6, kv_fraction=0.5)


def test_make_train_blocks_applies_the_mix(tokenizer, tmp_path):
    from loravariants.config import DataConfig
    from loravariants.data import PackedDataset, make_train_blocks
    from loravariants.data.retrieval import RetrievalMixDataset

    for i in range(40):
        (tmp_path / f"m{i:02d}.py").write_text("\n".join(CODE * 8))
    plain = make_train_blocks(DataConfig(source=str(tmp_path)), tokenizer, 128)
    assert isinstance(plain, PackedDataset)
    mixed = make_train_blocks(
        DataConfig(source=str(tmp_path), passkey_fraction=0.5), tokenizer, 128
    )
    assert isinstance(mixed, RetrievalMixDataset) and len(mixed) == len(plain)
    assert any(mixed.kind(i) == "passkey" for i in range(len(mixed)))
