"""Data pipeline: corpora and split, tokenizer, packing, SFT masking, passkey prompts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from loravariants.data import (
    IGNORE_INDEX,
    PackedDataset,
    SFTCollator,
    SFTDataset,
    check_seq_len,
    encode_sft,
    format_prompt,
    join_with_eos,
    load_corpus,
    load_documents,
    load_sft_records,
    load_validation_tokens,
    make_train_blocks,
    pack_blocks,
    passkey_prompt,
    split_documents,
    train_tokenizer,
)
from loravariants.data.passkey import FILLER

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Pack my box with five dozen liquor jugs! Sphinx of black quartz, judge my vow.",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    FILLER * 4,
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=400)


@pytest.fixture
def text_folder(tmp_path):
    for i, text in enumerate(TEXTS):
        sub = tmp_path / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:02d}.txt").write_text(text + f" Document {i}.")
    (tmp_path / ".hidden.txt").write_text("never read")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    return tmp_path


# --- corpus -------------------------------------------------------------------------------


def test_stdlib_split_deterministic_and_disjoint():
    a = load_corpus("stdlib", max_documents=120, validation_fraction=0.2)
    b = load_corpus("stdlib", max_documents=120, validation_fraction=0.2)
    assert [d.id for d in a.train] == [d.id for d in b.train]
    assert [d.id for d in a.validation] == [d.id for d in b.validation]
    train, val = {d.id for d in a.train}, {d.id for d in a.validation}
    assert train and val and not train & val
    assert len(train) + len(val) == 120
    assert all(i.startswith("stdlib/") and i.endswith(".py") for i in train | val)
    assert not any("/test/" in i or "site-packages" in i for i in train | val)
    # a document keeps its side whatever the cap: the split hashes the id only
    more = load_corpus("stdlib", max_documents=240, validation_fraction=0.2)
    assert val <= {d.id for d in more.validation}
    assert train <= {d.id for d in more.train}


def test_stdlib_sorted_and_capped_by_chars():
    docs = load_documents("stdlib", max_documents=30)
    ids = [d.id for d in docs]
    assert ids == sorted(ids, key=lambda s: s)  # sorted relative paths (posix)
    capped = load_documents("stdlib", max_chars=10_000)
    assert sum(len(d.text) for d in capped[:-1]) < 10_000 <= sum(len(d.text) for d in capped)


def test_local_folder_and_files(text_folder, tmp_path_factory):
    docs = load_documents(str(text_folder))
    assert len(docs) == len(TEXTS)  # hidden and non-text files skipped
    assert [d.id for d in docs] == sorted(d.id for d in docs)
    one = load_documents(str(text_folder / "a" / "doc01.txt"))
    assert len(one) == 1 and one[0].text.startswith("def add")

    root = tmp_path_factory.mktemp("jsonl")
    jsonl = root / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t, "n": i}) for i, t in enumerate(TEXTS)))
    docs = load_documents(str(jsonl), text_field="body", max_documents=3)
    assert [d.text for d in docs] == TEXTS[:3]
    with pytest.raises(ValueError, match="data.jsonl:1: no field 'text'"):
        load_documents(str(jsonl))
    as_json = root / "data.json"
    as_json.write_text(json.dumps([{"text": t} for t in TEXTS[:2]]))
    assert [d.text for d in load_documents(str(as_json))] == TEXTS[:2]


def test_local_jsonl_matches_datasets_json_loader(tmp_path):
    """Our JSONL reader agrees with ``datasets.load_dataset("json")`` (offline, local file)."""
    datasets = pytest.importorskip("datasets")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[:5]) + "\n")
    try:
        ds = datasets.load_dataset(
            "json", data_files=str(jsonl), split="train", cache_dir=str(tmp_path / "cache")
        )
    except Exception as e:  # pragma: no cover - depends on the datasets install
        pytest.skip(f"datasets cannot load local JSON offline here: {e}")
    assert list(ds["text"]) == [d.text for d in load_documents(str(jsonl))]


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_documents(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable files"):
        load_documents(str(tmp_path / "empty"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_documents(str(bad))
    with pytest.raises(ValueError, match="max_documents"):
        load_documents("stdlib", max_documents=0)
    with pytest.raises(ValueError, match="validation_fraction"):
        split_documents([], 1.5)


def test_tiny_corpus_has_both_sides(text_folder):
    corpus = load_corpus(str(text_folder), max_documents=2, validation_fraction=0.01)
    assert len(corpus.train) == 1 and len(corpus.validation) == 1


# --- tokenizer ----------------------------------------------------------------------------


def test_tokenizer_round_trip_and_save(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    assert len(tokenizer) == 400
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<s>",
        "</s>",
        "<pad>",
    )
    text = "def f(x):\n\treturn  x ** 2  # naïve ✓ 日本\n\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert plain == ids[1:] and tokenizer.decode(plain) == text
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert again.eos_token_id == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TEXTS, vocab_size=100)


# --- packing ------------------------------------------------------------------------------


def test_join_with_eos():
    stream = join_with_eos([[5, 6], [7], [], [8, 1]], eos_id=1)
    assert stream.tolist() == [5, 6, 1, 7, 1, 1, 8, 1]  # not doubled after an existing EOS


def test_pack_blocks_shapes_and_remainder():
    stream = torch.arange(10, 35)  # 25 tokens
    ids, labels = pack_blocks(stream, 8)
    assert ids.shape == (3, 8) and torch.equal(ids, labels)
    assert torch.equal(ids.flatten(), stream[:24])
    ids, labels = pack_blocks(stream, 8, remainder="pad", pad_id=0)
    assert ids.shape == (4, 8)
    assert ids[3].tolist() == [34] + [0] * 7
    assert labels[3].tolist() == [34] + [IGNORE_INDEX] * 7
    with pytest.raises(ValueError, match="pad_id"):
        pack_blocks(stream, 8, remainder="pad")
    with pytest.raises(ValueError, match="not one block"):
        pack_blocks(stream, 32)
    ds = PackedDataset.from_stream(stream, 8)
    assert len(ds) == 3 and ds.seq_len == 8 and set(ds[0]) == {"input_ids", "labels"}


def test_seq_len_multiple_check():
    check_seq_len(64, 16)
    with pytest.raises(ValueError, match="seq_len must be a multiple of 16.*got 60"):
        check_seq_len(60, 16)
    with pytest.raises(ValueError, match="seq_len must be a multiple of 16"):
        pack_blocks(torch.arange(200), 60, multiple_of=16)
    with pytest.raises(ValueError, match="multiple_of"):
        check_seq_len(64, 0)


def test_make_train_blocks_joins_documents_with_eos(text_folder, tokenizer):
    data = SimpleNamespace(
        source=str(text_folder), text_field="text", max_documents=None, validation_fraction=0.2
    )
    ds = make_train_blocks(data, tokenizer, 32, multiple_of=8)
    corpus = load_corpus(str(text_folder), validation_fraction=0.2)
    expected = []
    for doc in corpus.train:
        expected += tokenizer(doc.text)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ds) * 32
    assert len(ds) == len(expected) // 32
    assert ds.input_ids.flatten().tolist() == expected[:n]
    assert ds[0]["input_ids"].shape == (32,)
    assert (ds.input_ids == tokenizer.eos_token_id).sum() > 0
    val = load_validation_tokens(data, tokenizer, max_tokens=20)
    assert val.dim() == 1 and val.numel() == 20
    first = corpus.validation[0].text
    assert val.tolist() == (tokenizer(first)["input_ids"] + [tokenizer.eos_token_id])[:20]


# --- SFT ----------------------------------------------------------------------------------

RECORDS = [
    {"instruction": "Summarise the text.", "input": "A long story about a fox.", "output": "Fox."},
    {"instruction": "Say hello.", "output": "Hello there, friend!"},
]


def test_sft_masking_exact(tokenizer):
    item = encode_sft(RECORDS[0], tokenizer)
    prompt = tokenizer(format_prompt(RECORDS[0]))["input_ids"]
    answer = tokenizer("Fox.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert item["input_ids"].tolist() == prompt + answer
    assert item["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + answer
    assert "### Input:\nA long story" in format_prompt(RECORDS[0])
    assert "### Input" not in format_prompt(RECORDS[1])


def test_sft_collate_pads_to_multiple(tokenizer):
    ds = SFTDataset(RECORDS, tokenizer)
    batch = SFTCollator(tokenizer.pad_token_id, multiple_of=16)([ds[0], ds[1]])
    n = batch["input_ids"].shape[1]
    assert n % 16 == 0 and n >= max(len(ds[0]["input_ids"]), len(ds[1]["input_ids"]))
    assert n - 16 < max(len(ds[0]["input_ids"]), len(ds[1]["input_ids"]))
    for row, item in enumerate([ds[0], ds[1]]):
        k = len(item["input_ids"])
        assert batch["attention_mask"][row].tolist() == [1] * k + [0] * (n - k)
        assert batch["input_ids"][row, k:].eq(tokenizer.pad_token_id).all()
        # -100 exactly on the prompt and the padding
        prompt_len = len(tokenizer(format_prompt(RECORDS[row]))["input_ids"])
        ignored = batch["labels"][row].eq(IGNORE_INDEX)
        assert ignored.tolist() == [True] * prompt_len + [False] * (k - prompt_len) + [True] * (
            n - k
        )


def test_sft_files(tmp_path, tokenizer):
    (tmp_path / "d.json").write_text(json.dumps(RECORDS))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    assert load_sft_records(tmp_path / "d.json") == load_sft_records(tmp_path / "d.jsonl")
    assert (
        len(SFTDataset.from_file(tmp_path / "d.jsonl", tokenizer, max_length=10)[0]["input_ids"])
        == 10
    )
    (tmp_path / "bad.jsonl").write_text(json.dumps({"instruction": "x"}))
    with pytest.raises(ValueError, match="bad.jsonl:1.*'output'"):
        load_sft_records(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_sft_records(tmp_path / "missing.json")


# --- passkey ------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [250, 400, 1000])
def test_passkey_length_and_key(tokenizer, length):
    ids, key = passkey_prompt(tokenizer, length, seed=length)
    assert length - 12 <= len(ids) <= length
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in text
    assert text.endswith("What is the pass key? The pass key is")
    assert "The grass is green." in text and 1 <= int(key) <= 50000
    assert passkey_prompt(tokenizer, length, seed=length) == (ids, key)  # seeded


def test_passkey_depth_and_key_control(tokenizer):
    early, _ = passkey_prompt(tokenizer, 400, key=777, depth=0.0)
    late, _ = passkey_prompt(tokenizer, 400, key=777, depth=1.0)
    t_early = tokenizer.decode(early, skip_special_tokens=True)
    t_late = tokenizer.decode(late, skip_special_tokens=True)
    assert t_early.index("pass key is 777") < t_late.index("pass key is 777")
    assert t_late.index("pass key is 777") > len(t_late) // 2
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tokenizer, 400, depth=1.5)
    with pytest.raises(ValueError, match="length must be >="):
        passkey_prompt(tokenizer, 10)
