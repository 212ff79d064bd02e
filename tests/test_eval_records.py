"""Issue 25's evaluation records: per-document NLL at every length (the same windows as the
perplexity), per-prompt passkey outcomes, and the selection split of the corpus."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_llama

from loravariants.config import DataConfig
from loravariants.data import is_selection, is_validation, load_corpus, load_validation_tokens
from loravariants.evaluate import (
    document_nll_at_lengths,
    passkey_accuracy,
    perplexity_at_lengths,
    truncated_lengths,
)


def test_document_nll_at_lengths_sums_to_the_perplexity():
    model = make_tiny_llama()
    tokens = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(0))
    docs = [50, 120, 7, 123]
    out = document_nll_at_lengths(model, tokens, docs, [16, 64], stride_ratio=0.5)
    ppl = perplexity_at_lengths(model, tokens, [16, 64], stride_ratio=0.5)
    for n in (16, 64):
        assert out[n].shape == (4, 2)
        assert math.isclose(math.exp(out[n][:, 0].sum() / out[n][:, 1].sum()), ppl[n], rel_tol=1e-9)
        assert out[n][:, 1].sum() == 299  # every token but the stream's first is scored
    # max_tokens cuts the stream, and the documents with it
    cut = document_nll_at_lengths(model, tokens, docs, [16], stride_ratio=0.5, max_tokens=100)
    assert cut[16].shape == (2, 2) and cut[16][:, 1].sum() == 99
    ref = perplexity_at_lengths(model, tokens, [16], stride_ratio=0.5, max_tokens=100)[16]
    assert math.isclose(math.exp(cut[16][:, 0].sum() / cut[16][:, 1].sum()), ref, rel_tol=1e-9)
    with pytest.warns(UserWarning, match="skipping context length 400"):
        assert set(document_nll_at_lengths(model, tokens, docs, [16, 400])) == {16}


def test_truncated_lengths():
    assert truncated_lengths([50, 120, 7], None) == [50, 120, 7]
    assert truncated_lengths([50, 120, 7], 100) == [50, 50]
    assert truncated_lengths([50, 120, 7], 170) == [50, 120]
    assert truncated_lengths([50, 120, 7], 500) == [50, 120, 7]


class _Tokenizer:
    """Enough of a tokenizer for passkey prompts: one token per character."""

    pad_token_id = eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(ord(c), 127) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids)


def test_passkey_outcomes_are_per_prompt_and_give_the_accuracy(monkeypatch):
    import loravariants.evaluate as ev

    # a fake answerer: prompt seed s is answered right iff s is even
    monkeypatch.setattr(ev, "passkey_prompt", lambda tok, length, seed: ([1, 2, 3], str(seed)))
    monkeypatch.setattr(
        ev, "_answer_passkey", lambda model, tok, ids, key, dev: (int(key) % 2 == 0, key)
    )
    result = passkey_accuracy(make_tiny_llama(), _Tokenizer(), [64], trials=5, seed=2)[64]
    assert result.hits == [1, 0, 1, 0, 1]  # seeds 2000..2004, in prompt order
    assert result.accuracy == pytest.approx(sum(result.hits) / 5)


def test_selection_split_is_disjoint_from_validation_and_training(tmp_path):
    for i in range(200):
        (tmp_path / f"d{i:03d}.txt").write_text(f"document {i}\n" * 3)
    plain = load_corpus(str(tmp_path), validation_fraction=0.1)
    corpus = load_corpus(str(tmp_path), validation_fraction=0.1, selection_fraction=0.1)
    ids = {
        side: {d.id for d in getattr(corpus, side)} for side in ("train", "validation", "selection")
    }
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["selection"]
    assert not ids["validation"] & ids["selection"]
    assert len(ids["train"]) + len(ids["validation"]) + len(ids["selection"]) == 200
    assert 5 <= len(ids["selection"]) <= 40  # about 10%
    # the validation (test) documents are the same with or without a selection split
    assert ids["validation"] == {d.id for d in plain.validation} and plain.selection == []
    assert ids["train"] | ids["selection"] == {d.id for d in plain.train}
    for doc_id in ids["selection"]:
        assert is_selection(doc_id, 0.1, 0.1) and not is_validation(doc_id, 0.1)


def test_selection_tokens_come_from_the_selection_documents(tmp_path):
    from loravariants.data import tokenize_documents, train_tokenizer

    for i in range(60):
        (tmp_path / f"d{i:03d}.txt").write_text(f"text number {i} " * 20)
    tok = train_tokenizer([f"text number {i} " * 20 for i in range(60)], 300)
    data = DataConfig(source=str(tmp_path), validation_fraction=0.1, selection_fraction=0.2)
    corpus = load_corpus(str(tmp_path), validation_fraction=0.1, selection_fraction=0.2)
    selection = load_validation_tokens(data, tok, split="selection")
    expected = tokenize_documents([corpus.selection[0].text], tok)[0]
    assert selection[: len(expected)].tolist() == expected
    validation = load_validation_tokens(data, tok)
    assert not torch.equal(selection[:20], validation[:20])
    with pytest.raises(ValueError, match="no selection documents"):
        load_validation_tokens(DataConfig(source=str(tmp_path)), tok, split="selection")
