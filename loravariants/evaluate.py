"""Evaluation: perplexity at several context lengths, passkey retrieval, and an induction probe.

Always full attention: the model is put in ``eval()`` mode, where the ``"s2_attn"`` backend
falls back to full causal attention (S2-Attn is a training-time approximation only).

Perplexity uses the standard strided sliding window: windows of ``context_length`` tokens start
every ``stride`` tokens; in each window only the tokens not scored by an earlier window count,
so every token (but the first) is scored exactly once. In the first window token ``t`` has the
``t`` tokens before it as context (``1 .. context_length - 1``); in every later window a scored
token has between ``context_length - stride`` and ``context_length - 1`` tokens of context::

    tokens   : t0 t1 t2 t3 t4 t5 t6 t7 t8 t9
    window 1 : [t0 t1 t2 t3]            scores t1..t3   (1..3 tokens of context)
    window 2 :       [t2 t3 t4 t5]      scores t4..t5   (stride 2: 2..3 tokens of context)
    window 3 :             [t4 t5 t6 t7]  scores t6..t7  ...

The stream must hold at least ``context_length`` tokens: a shorter one would be scored with
shorter windows and reported under a length it was never evaluated at.

:func:`document_nll` scores the stream with the same windows and credits each scored token's
NLL to its document: the per-document sums the seeds x documents bootstrap
(``loravariants.stats``) resamples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data.passkey import passkey_prompt
from .validation import check_range

__all__ = [
    "windows",
    "perplexity",
    "perplexity_at_lengths",
    "document_nll",
    "document_nll_at_lengths",
    "split_at_eos",
    "truncated_lengths",
    "passkey_accuracy",
    "passkey_trials",
    "PasskeyResult",
    "PasskeyTrial",
    "induction_score",
    "InductionResult",
]


def windows(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_scored)`` for each window over ``n_tokens`` tokens.

    The last ``n_scored`` tokens of ``tokens[begin:end]`` are scored in that window. A stride
    below the window length makes consecutive windows overlap, so every scored token has at
    least one token of context and none is skipped.
    """
    check_range("context_length", context_length, low=2, integer=True)
    check_range("stride", stride, low=1, high=context_length - 1, integer=True)
    out = []
    prev_end = 1  # token 0 has no context and is never scored
    for begin in range(0, n_tokens, stride):
        end = min(begin + context_length, n_tokens)
        if end > prev_end:
            out.append((begin, end, end - prev_end))
            prev_end = end
        if end == n_tokens:
            break
    return out


def _checked_stream(
    model: nn.Module, tokens: torch.Tensor, context_length: int, stride: int | None
) -> tuple[torch.Tensor, int]:
    """The checks :func:`perplexity` and :func:`document_nll` share: the window fits the
    stream, the stride is in range (``None``: half the window) and every id is in the
    model's vocabulary. Returns the flattened ``(N,)`` tokens and the stride."""
    check_range("context_length", context_length, low=2, integer=True)
    if stride is None:
        stride = max(1, context_length // 2)
    check_range("stride", stride, low=1, high=context_length - 1, integer=True)
    tokens = torch.as_tensor(tokens).flatten()
    if tokens.numel() < context_length:
        raise ValueError(
            f"context_length {context_length} exceeds the {tokens.numel()} tokens to score"
        )
    _check_token_ids(model, tokens)
    return tokens, stride


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    context_length: int,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> float:
    """Perplexity of a token stream under the strided sliding window.

    Args:
        model: a causal LM returning ``.logits`` of shape ``(b, n, vocab)``.
        tokens: 1-D token ids ``(N,)`` (documents joined with EOS), with
            ``N >= context_length``.
        context_length: window length, at least 2.
        stride: distance between window starts, in ``[1, context_length - 1]``; ``None``
            (the default) means ``context_length // 2``.
        batch_size: windows per forward (full-length windows only).
        progress: show a tqdm bar.

    Returns:
        ``exp(mean NLL)`` over the ``N - 1`` scored tokens.

    Raises:
        ValueError: ``context_length`` or ``stride`` out of range, or fewer than
            ``context_length`` tokens.
    """
    tokens, stride = _checked_stream(model, tokens, context_length, stride)
    was_training = model.training
    model.eval()
    nll_sum, count = 0.0, 0
    for _, logp in _scored_windows(model, tokens, context_length, stride, batch_size, progress):
        nll_sum -= logp.double().sum().item()
        count += logp.numel()
    model.train(was_training)
    return math.exp(nll_sum / count)


def _scored_windows(
    model: nn.Module,
    tokens: torch.Tensor,
    context_length: int,
    stride: int,
    batch_size: int,
    progress: bool,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(end, logp)`` for each window of :func:`windows`, in order: ``logp`` ``(n_scored,)``
    holds ``log p(tokens[t] | window context)`` for ``t`` in ``[end - n_scored, end)``."""
    device = next(model.parameters()).device
    spans = windows(tokens.numel(), context_length, stride)
    bar = tqdm(total=len(spans), desc=f"ppl@{context_length}", disable=not progress, leave=False)
    i = 0
    while i < len(spans):
        # batch consecutive windows of equal length
        length = spans[i][1] - spans[i][0]
        group = [spans[i]]
        while (
            len(group) < batch_size
            and i + len(group) < len(spans)
            and spans[i + len(group)][1] - spans[i + len(group)][0] == length
        ):
            group.append(spans[i + len(group)])
        ids = torch.stack([tokens[b:e] for b, e, _ in group]).to(device)
        target_logp = _next_token_logp(model, ids)  # (g, length - 1)
        for row, (_, end, scored) in enumerate(group):
            yield end, target_logp[row, -scored:]
        i += len(group)
        bar.update(len(group))
    bar.close()


def split_at_eos(tokens: torch.Tensor, eos_id: int) -> list[int]:
    """Document lengths of a stream joined with EOS (``data.join_with_eos``): each document
    ends with its EOS; tokens after the last EOS (a stream cut at ``max_tokens``) are one more
    document.

    Args:
        tokens: 1-D token ids ``(N,)``.
        eos_id: the separator.

    Returns:
        Lengths summing to ``N``, each at least 1.
    """
    tokens = torch.as_tensor(tokens).flatten()
    ends = (torch.nonzero(tokens == eos_id).flatten() + 1).tolist()
    if not ends or ends[-1] != tokens.numel():
        ends.append(tokens.numel())
    return [e - b for b, e in zip([0, *ends[:-1]], ends, strict=True) if e > b]


@torch.no_grad()
def document_nll(
    model: nn.Module,
    tokens: torch.Tensor,
    document_lengths: Sequence[int],
    context_length: int,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> torch.Tensor:
    """Per-document summed NLL and tokens scored, under exactly :func:`perplexity`'s windows.

    The stream is scored once with the strided sliding window over the *joined* stream (a
    token's context may reach into the previous document, as in :func:`perplexity`); each
    scored token's NLL is credited to the document that holds it. Hence::

        exp(out[:, 0].sum() / out[:, 1].sum()) == perplexity(model, tokens, context_length, stride)

    (up to float summation order), and the rows are the per-document sums that
    :func:`loravariants.stats.hierarchical_bootstrap` resamples. The stream's first token is
    never scored, so the first document counts one token fewer than its length.

    Args:
        model: a causal LM returning ``.logits`` of shape ``(b, n, vocab)``.
        tokens: 1-D token ids ``(N,)``, with ``N >= context_length``.
        document_lengths: ``(D,)`` lengths in stream order, each at least 1, summing to ``N``
            (:func:`split_at_eos` gives them for an EOS-joined stream).
        context_length, stride, batch_size, progress: as in :func:`perplexity`.

    Returns:
        ``(D, 2)`` float64: ``[:, 0]`` summed NLL in nats, ``[:, 1]`` tokens scored.

    Raises:
        ValueError: as :func:`perplexity`, or lengths that are not positive or do not sum
            to ``N``.
    """
    lengths = [int(n) for n in document_lengths]
    n_tokens = torch.as_tensor(tokens).numel()
    if not lengths or min(lengths) < 1 or sum(lengths) != n_tokens:
        raise ValueError(
            f"document_lengths must be positive and sum to the {n_tokens} tokens, got "
            f"{len(lengths)} lengths summing to {sum(lengths)}"
        )
    tokens, stride = _checked_stream(model, tokens, context_length, stride)
    was_training = model.training
    model.eval()
    # doc_of[t]: the document holding token t
    doc_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    out = torch.zeros(len(lengths), 2, dtype=torch.float64)
    for end, logp in _scored_windows(model, tokens, context_length, stride, batch_size, progress):
        docs = doc_of[end - logp.numel() : end]
        out[:, 0].index_add_(0, docs, -logp.double().cpu())
        out[:, 1].index_add_(0, docs, torch.ones(docs.numel(), dtype=torch.float64))
    model.train(was_training)
    return out


def _next_token_logp(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``log p(ids[:, t + 1] | ids[:, : t + 1])`` for every ``t``: ``(b, n)`` ids give
    ``(b, n - 1)`` log-probabilities (computed in float32 whatever the model's dtype)."""
    logits = model(input_ids=ids).logits.float()
    return F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def _check_token_ids(model: nn.Module, tokens: torch.Tensor) -> None:
    """Token ids must index the model's embedding (else a raw IndexError deep in the model)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embed, "num_embeddings", None)
    if vocab is None or tokens.numel() == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(
            f"token id {bad} is out of range for the model's vocabulary of {vocab} "
            f"(ids 0..{vocab - 1}); was the text tokenised with another tokenizer?"
        )


def perplexity_at_lengths(
    model: nn.Module,
    tokens: torch.Tensor,
    lengths: Sequence[int],
    stride_ratio: float = 0.5,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> dict[int, float]:
    """:func:`perplexity` at each context length (stride = ``stride_ratio * length``).

    A length longer than the token stream cannot be evaluated at: it is left out of the
    result with a ``UserWarning`` (so a comparison over several lengths still reports the
    ones that fit, and the missing one shows as absent rather than as a wrong number).

    Args:
        model: a causal LM returning ``.logits``.
        tokens: 1-D token ids ``(N,)``.
        lengths: context lengths to evaluate, each at least 2.
        stride_ratio: stride as a share of the length, in ``(0, 1)``.
        max_tokens: truncate the stream to this many tokens first, so that every length is
            scored on the same tokens (``None``: all of them).
        batch_size: windows per forward.
        progress: show a tqdm bar per length.

    Returns:
        ``{length: perplexity}`` for every length that fits in the (truncated) stream.

    Raises:
        ValueError: ``stride_ratio``, ``max_tokens`` or a length out of range, or no length
            fits in the stream.
    """
    tokens, plan = _windows_at_lengths(tokens, lengths, stride_ratio, max_tokens, "perplexity")
    return {n: perplexity(model, tokens, n, stride, batch_size, progress) for n, stride in plan}


def _windows_at_lengths(
    tokens: torch.Tensor,
    lengths: Sequence[int],
    stride_ratio: float,
    max_tokens: int | None,
    what: str,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The checked, truncated stream ``(N',)`` and ``(length, stride)`` for every length that
    fits in it: the one rule :func:`perplexity_at_lengths` and :func:`document_nll_at_lengths`
    share, so the two always score the same windows. A length that does not fit is skipped
    with a ``UserWarning`` naming ``what``; none fitting is a ``ValueError``."""
    check_range("stride_ratio", stride_ratio, low=0, high=1, low_open=True, high_open=True)
    if max_tokens is not None:
        check_range("max_tokens", max_tokens, low=2, integer=True)
    tokens = torch.as_tensor(tokens).flatten()
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    n_tokens = tokens.numel()
    plan = []
    for n in lengths:
        n = int(n)
        check_range("context_length", n, low=2, integer=True)
        if n > n_tokens:
            warnings.warn(
                f"{what}: skipping context length {n}, longer than the {n_tokens} tokens "
                "to score (raise max_tokens or provide more validation tokens)",
                stacklevel=3,  # the caller of the public function
            )
            continue
        plan.append((n, max(1, int(n * stride_ratio))))
    if lengths and not plan:
        raise ValueError(
            f"every context length in lengths={list(lengths)} exceeds the {n_tokens} tokens "
            f"to score"
        )
    return tokens, plan


def truncated_lengths(document_lengths: Sequence[int], max_tokens: int | None) -> list[int]:
    """The document lengths of a stream cut to its first ``max_tokens`` tokens (the last
    document kept may be cut short; the ones after it are dropped)."""
    out, total = [], 0
    for n in document_lengths:
        if max_tokens is not None and total >= max_tokens:
            break
        n = int(n) if max_tokens is None else min(int(n), max_tokens - total)
        out.append(n)
        total += n
    return out


def document_nll_at_lengths(
    model: nn.Module,
    tokens: torch.Tensor,
    document_lengths: Sequence[int],
    lengths: Sequence[int],
    stride_ratio: float = 0.5,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> dict[int, torch.Tensor]:
    """:func:`document_nll` at each context length, with :func:`perplexity_at_lengths`'s
    windows, truncation and skipping: ``exp(out[n][:, 0].sum() / out[n][:, 1].sum())`` is
    ``perplexity_at_lengths(...)[n]`` (up to float summation order).

    Args:
        model: a causal LM returning ``.logits``.
        tokens: 1-D token ids ``(N,)``.
        document_lengths: ``(D,)`` lengths of the documents of ``tokens``, summing to ``N``.
        lengths, stride_ratio, max_tokens, batch_size, progress: as in
            :func:`perplexity_at_lengths` (``max_tokens`` also cuts the documents).

    Returns:
        ``{length: (D', 2) float64}`` (``D'``: the documents left after ``max_tokens``): per
        document the summed NLL in nats and the tokens scored.

    Raises:
        ValueError: as :func:`perplexity_at_lengths` and :func:`document_nll`.
    """
    tokens, plan = _windows_at_lengths(tokens, lengths, stride_ratio, max_tokens, "document_nll")
    docs = truncated_lengths(document_lengths, max_tokens)
    return {
        n: document_nll(model, tokens, docs, n, stride, batch_size, progress) for n, stride in plan
    }


@dataclass
class PasskeyResult:
    """Passkey retrieval at one prompt length.

    Attributes:
        hits: 1 (the key) or 0 per prompt, in prompt order (prompt ``i`` has seed
            ``seed * 1000 + i``, the same for every model: outcomes pair for exact McNemar).
    """

    length: int
    accuracy: float
    trials: int
    answers: list[str]
    hits: list[int] = field(default_factory=list)


@torch.no_grad()
def passkey_accuracy(
    model: nn.Module,
    tokenizer,
    lengths: Sequence[int],
    trials: int = 10,
    seed: int = 0,
) -> dict[int, PasskeyResult]:
    """LongLoRA's passkey test: greedy decoding, exact match of the key, ``trials`` per length.

    Args:
        model: a causal LM with ``generate``.
        tokenizer: its tokenizer.
        lengths: prompt lengths in tokens.
        trials: prompts per length (the key and its depth vary with the seed).
        seed: base seed for keys and positions.
    """
    check_range("trials", trials, low=1, integer=True)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results = {}
    for length in lengths:
        answers, hits = [], []
        for trial in range(trials):
            prompt_ids, key = passkey_prompt(tokenizer, int(length), seed=seed * 1000 + trial)
            hit, text = _answer_passkey(model, tokenizer, prompt_ids, key, device)
            answers.append(text)
            hits.append(int(hit))
        results[int(length)] = PasskeyResult(int(length), sum(hits) / trials, trials, answers, hits)
    model.train(was_training)
    return results


def _answer_passkey(model, tokenizer, prompt_ids, key: str, device) -> tuple[bool, str]:
    """Greedy answer to one passkey prompt: ``(exact match of the key, decoded answer)``."""
    ids = torch.as_tensor(prompt_ids, device=device)[None]
    n_new = len(tokenizer(" " + key, add_special_tokens=False)["input_ids"]) + 2
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n_new,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    digits = "".join(ch for ch in text.strip().split(" ")[0] if ch.isdigit())
    return digits == key, text


@dataclass
class PasskeyTrial:
    """One passkey prompt and its outcome (for paired per-prompt statistics).

    Attributes:
        seed: the prompt's seed (draws its key).
        length: prompt tokens.
        depth: share of the filler before the key.
        key_distance: tokens from the key line to the prompt's end (about
            ``(1 - depth) * length``; the key is "beyond" a native context longer than this).
        hit: the greedy answer is the key.
        answer: the decoded answer.
    """

    seed: int
    length: int
    depth: float
    key_distance: int
    hit: bool
    answer: str


@torch.no_grad()
def passkey_trials(
    model: nn.Module,
    tokenizer,
    length: int,
    trials: int,
    seed: int = 0,
    depth_range: tuple[float, float] = (0.0, 1.0),
) -> list[PasskeyTrial]:
    """Passkey prompts of ``length`` tokens with depths evenly spread over ``depth_range``.

    Trial ``i`` has depth ``low + (high - low) * (i + 0.5) / trials`` and seed
    ``seed * 1000 + i`` (the key), so the same call on two models scores the same prompts: the
    outcomes pair prompt by prompt (exact McNemar). Depth 1 puts the key next to the question.

    Args:
        model: a causal LM with ``generate``.
        tokenizer: its tokenizer.
        length: prompt length in tokens.
        trials: prompts, at least 1.
        seed: base seed of the keys.
        depth_range: ``(low, high)`` within [0, 1], ``low <= high``.

    Returns:
        One :class:`PasskeyTrial` per prompt, in order.
    """
    check_range("trials", trials, low=1, integer=True)
    low, high = depth_range
    if not 0 <= low <= high <= 1:
        raise ValueError(f"depth_range must satisfy 0 <= low <= high <= 1, got {depth_range!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(trials):
        depth = low + (high - low) * (i + 0.5) / trials
        prompt_seed = seed * 1000 + i
        prompt_ids, key = passkey_prompt(tokenizer, int(length), seed=prompt_seed, depth=depth)
        hit, text = _answer_passkey(model, tokenizer, prompt_ids, key, device)
        distance = round((1 - depth) * len(prompt_ids))
        out.append(PasskeyTrial(prompt_seed, len(prompt_ids), depth, distance, hit, text))
    model.train(was_training)
    return out


@dataclass
class InductionResult:
    """Mean NLL (nats per token) on the two copies of repeated random token sequences."""

    first_nll: float
    second_nll: float
    span: int
    sequences: int

    @property
    def ratio(self) -> float:
        """``second_nll / first_nll``: about 1 without induction heads, near 0 with them."""
        return self.second_nll / self.first_nll


@torch.no_grad()
def induction_score(
    model: nn.Module,
    vocab_size: int | None = None,
    span: int = 50,
    sequences: int = 16,
    low: int = 3,
    seed: int = 0,
) -> InductionResult:
    """Does the model copy from its context? The repeated-random-tokens probe of induction
    heads (Olsson et al., 2022, "In-context learning and induction heads").

    Each sequence is ``span`` random token ids followed by the same ``span`` ids again. The
    first copy is unpredictable (its NLL is about ``ln(vocab)`` or worse); the second is
    predictable only by finding the current token earlier in the context and copying what
    followed it, which is what passkey retrieval needs too. The first token of each copy is
    not scored (nothing predicts it)::

        x_0 x_1 ... x_{s-1} | x_0 x_1 ... x_{s-1}
            [ first copy  ]       [ second copy ]

    Args:
        model: a causal LM returning ``.logits`` of shape ``(b, n, vocab)``.
        vocab_size: ids are drawn from ``[low, vocab_size)``; default: the model's input
            embedding size.
        span: tokens per copy, at least 2 (``2 * span`` must fit the model's context).
        sequences: random sequences, one forward for all.
        low: the smallest id drawn (the built-in tokenizer's special tokens are 0-2).
        seed: draws the ids (independent of the global RNG).

    Returns:
        An :class:`InductionResult`.
    """
    check_range("span", span, low=2, integer=True)
    check_range("sequences", sequences, low=1, integer=True)
    if vocab_size is None:
        vocab_size = model.get_input_embeddings().num_embeddings
    if not 0 <= low < vocab_size - 1:
        raise ValueError(f"low must be in [0, vocab_size - 1), got {low} with {vocab_size}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    half = torch.randint(low, vocab_size, (sequences, span), generator=gen)
    ids = torch.cat([half, half], dim=1).to(device)
    nll = -_next_token_logp(model, ids)
    # nll[:, t] scores token t + 1: the first copy's tokens 1..span-1, the second's likewise
    first, second = nll[:, : span - 1], nll[:, span:]
    model.train(was_training)
    return InductionResult(float(first.mean()), float(second.mean()), span, sequences)
