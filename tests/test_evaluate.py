"""Sliding-window perplexity: every token scored once, with the documented context."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama

from loravariants.evaluate import (
    document_nll,
    perplexity,
    perplexity_at_lengths,
    split_at_eos,
    windows,
)


@pytest.mark.parametrize("n, length, stride", [(10, 4, 2), (33, 8, 7), (33, 8, 3), (5, 8, 4)])
def test_windows_score_every_token_once(n, length, stride):
    scored = []
    for begin, end, k in windows(n, length, stride):
        assert end - begin <= length and 1 <= k <= end - begin - (begin == 0)
        scored.extend(range(end - k, end))
    assert scored == list(range(1, n))


def _brute_force_nll(model, tokens, length, stride):
    """Score token t with exactly the context its window gives it, one forward per token."""
    total = 0.0
    for begin, end, k in windows(tokens.numel(), length, stride):
        for t in range(end - k, end):
            logits = model(input_ids=tokens[None, begin:t]).logits[0, -1]  # predicts token t
            total -= F.log_softmax(logits.double(), -1)[tokens[t]].item()
    return total / (tokens.numel() - 1)


@pytest.mark.parametrize("stride, batch", [(3, 1), (5, 2), (2, 4)])
def test_perplexity_equals_brute_force(stride, batch):
    model = make_tiny_llama()
    tokens = torch.randint(0, 128, (29,), generator=torch.Generator().manual_seed(0))
    expected = math.exp(_brute_force_nll(model, tokens, 6, stride))
    assert perplexity(model, tokens, 6, stride, batch_size=batch) == pytest.approx(
        expected, rel=1e-5
    )


def test_single_window_equals_model_loss():
    model = make_tiny_llama()
    tokens = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=tokens[None], labels=tokens[None]).loss.item()
    assert perplexity(model, tokens, 16) == pytest.approx(math.exp(loss), rel=1e-5)


def test_lengths_and_errors():
    model = make_tiny_llama()
    tokens = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(0))
    out = perplexity_at_lengths(model, tokens, [8, 16], max_tokens=32)
    assert set(out) == {8, 16} and all(v > 1 for v in out.values())
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tokens, 8, stride=8)
    with pytest.raises(ValueError, match="context_length"):
        perplexity(model, tokens, 1)


def test_stride_ratio_of_one_is_named():
    model = make_tiny_llama()
    tokens = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="stride_ratio"):
        perplexity_at_lengths(model, tokens, [8], stride_ratio=1.0)


def test_stride_zero_is_rejected_not_defaulted():
    model = make_tiny_llama()
    tokens = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tokens, 8, stride=0)


def test_context_longer_than_the_tokens():
    model = make_tiny_llama()
    tokens = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="context_length"):
        perplexity(model, tokens, 64)
    assert perplexity(model, tokens, 40) > 1  # exactly one full window is fine
    # several lengths (the comparison's path): too-long lengths are left out, with a warning
    with pytest.warns(UserWarning) as caught:
        out = perplexity_at_lengths(model, tokens, [8, 64, 128])
    assert set(out) == {8}
    assert ["length 64," in str(w.message) for w in caught] == [True, False]
    assert "length 128," in str(caught[1].message)
    with pytest.warns(UserWarning, match="max_tokens"):
        assert set(perplexity_at_lengths(model, tokens, [8, 16, 32], max_tokens=20)) == {8, 16}
    with pytest.raises(ValueError, match="lengths"), pytest.warns(UserWarning, match="skipping"):
        perplexity_at_lengths(model, tokens, [64])


class _Copier(torch.nn.Module):
    """A perfect induction head as a model: at position t, predict the token that followed
    the latest earlier occurrence of token t (uniform when there is none)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 1)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids):
        b, n = input_ids.shape
        logits = torch.zeros(b, n, self.embed.num_embeddings)
        for i in range(b):
            last: dict[int, int] = {}
            for t in range(n):
                tok = int(input_ids[i, t])
                if tok in last and last[tok] + 1 < n:
                    logits[i, t, int(input_ids[i, last[tok] + 1])] = 30.0
                last[tok] = t
        return type("Out", (), {"logits": logits})()


def test_induction_score_tells_a_copier_from_a_model_that_ignores_context():
    from loravariants.evaluate import induction_score

    copier = induction_score(_Copier(5000), span=20, sequences=4)
    # the first copy has no repeats (almost surely, 20 of ~5000 ids): uniform, ln(5000)
    assert copier.first_nll == pytest.approx(math.log(5000), rel=0.02)
    assert copier.second_nll < 1e-6 and copier.ratio < 1e-6

    blind = make_tiny_llama(vocab_size=300).train()  # random weights: no induction
    result = induction_score(blind, span=16, sequences=4)
    assert result.ratio == pytest.approx(1.0, abs=0.05)
    assert blind.training  # the mode is restored


def test_induction_score_is_seeded_and_checks_its_arguments():
    from loravariants.evaluate import induction_score

    model = make_tiny_llama(vocab_size=300)
    a, b = induction_score(model, span=8, seed=3), induction_score(model, span=8, seed=3)
    assert a == b
    with pytest.raises(ValueError, match="span"):
        induction_score(model, span=1)
    with pytest.raises(ValueError, match="low"):
        induction_score(model, low=299)


def _brute_force_document_nll(model, tokens, lengths, length, stride):
    """Per-document NLL sums, scoring token t with exactly its window's context."""
    doc_of = [d for d, n in enumerate(lengths) for _ in range(n)]
    out = [[0.0, 0] for _ in lengths]
    for begin, end, k in windows(tokens.numel(), length, stride):
        for t in range(end - k, end):
            logits = model(input_ids=tokens[None, begin:t]).logits[0, -1]
            out[doc_of[t]][0] -= F.log_softmax(logits.double(), -1)[tokens[t]].item()
            out[doc_of[t]][1] += 1
    return out


@pytest.mark.parametrize("stride, batch", [(4, 1), (3, 3)])
def test_document_nll_sums_to_the_corpus_perplexity(stride, batch):
    model = make_tiny_llama()
    tokens = torch.randint(0, 128, (41,), generator=torch.Generator().manual_seed(0))
    lengths = [9, 14, 1, 17]
    out = document_nll(model, tokens, lengths, 8, stride, batch_size=batch)
    assert out.shape == (4, 2) and out.dtype == torch.float64
    # every token but the stream's first is scored once, credited to its own document
    assert out[:, 1].tolist() == [8, 14, 1, 17]
    pooled = math.exp(out[:, 0].sum().item() / out[:, 1].sum().item())
    assert pooled == pytest.approx(perplexity(model, tokens, 8, stride), rel=1e-12)
    expected = _brute_force_document_nll(model, tokens, lengths, 8, stride)
    assert out[:, 0].tolist() == pytest.approx([nll for nll, _ in expected], rel=1e-5)


def test_split_at_eos_and_bad_lengths():
    tokens = torch.tensor([5, 6, 2, 7, 2, 2, 8, 9])
    assert split_at_eos(tokens, 2) == [3, 2, 1, 2]  # the cut tail is a document
    assert split_at_eos(tokens[:5], 2) == [3, 2]
    model = make_tiny_llama()
    stream = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="sum to the 20 tokens"):
        document_nll(model, stream, [10, 9], 8)
    with pytest.raises(ValueError, match="positive"):
        document_nll(model, stream, [20, 0], 8)
    with pytest.raises(ValueError, match="context_length"):
        document_nll(model, stream, [20], 32)
