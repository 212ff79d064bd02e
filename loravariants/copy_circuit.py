"""A copy circuit written by hand into a freshly initialised Llama: a previous-token head in
layer 0 and an induction head in layer 1 (Olsson et al., 2022, "In-context learning and
induction heads").

Why: passkey retrieval needs a model that copies from its context ("... The pass key is 4821
... The pass key is" -> "4821"), and in transformers that is an induction head. Within the
built-in base's budget (about 700 steps of 8 x 256 tokens on a 2-core CPU) none forms by
gradient descent, whatever the data (docs/data.md, "Why it could not retrieve"). With
``BaseModelConfig(copy_circuit=True)`` the base starts from one: two of its 16 heads are set as
below, and :func:`frozen_slices` keeps them fixed while the rest of the model pretrains around
them. It is off by default: linear position interpolation breaks the fixed previous-token
head, and even 600 fine-tuning steps do not repair it; YaRN, which leaves the fast RoPE pairs
alone, keeps it (docs/data.md). Everything else is the usual random initialisation, and the
result is a plain ``LlamaForCausalLM``.

Construction, for a model of hidden size ``d`` and head size ``d_h`` (RoPE pairs dimension
``i`` with ``i + d_h/2`` and turns pair ``i`` by ``theta_i`` per token). Draw an orthonormal
basis of the residual stream and take from it ``P`` (``d_h`` directions: the *token code*),
``G`` (``d_h`` directions: the *previous-token slot*) and ``u`` (one direction):

* embeddings: no component in ``G``; the component in ``P`` rescaled to norm ``code_norm``
  for every token (so no token's code outweighs another's); plus ``c * u`` in every row, a
  constant that the position-only head below reads as its query and key.
* layer 0, head 0 (previous token): query ``q`` and key ``k`` constant (read from ``u``), set
  in the fast RoPE pairs so that the score at offset ``D = m - n`` is
  ``sum_i a^2 cos(theta_i (D - 1))``, largest at ``D = 1``. Value: the token's code ``P h``;
  output: into ``G``. Each position then carries the code of the token before it.
* layer 1, head 0 (induction): query ``S P h_t`` (the current token's code), key
  ``S G^T h_s`` (the code of the token before ``s``), with ``S`` placing both in the slow
  RoPE pairs (turned by 0.25 to 1 radian over the native context, so within it the match
  barely depends on distance, and at 4x it breaks). The score is large where
  ``x_{s-1} = x_t``. Value: the code of the attended token ``P h_s``; output:
  ``delta * P^T``, back into the embedding subspace.
* ``lm_head`` starts as the embedding matrix, so that a code written into the stream raises
  the logit of its token.

The strengths below were picked among a few builds (docs/data.md, "The copy circuit"): a copy
that is too sharp at initialisation costs so much on the first occurrences of tokens that
training switches it off, and a circuit that trains like the other weights is gone within 60
steps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "COPY_CIRCUIT_VERSION",
    "CopyCircuitError",
    "check_shape",
    "circuit_planes",
    "frozen_slices",
    "install_copy_circuit",
    "rope_frequencies",
]

#: bumped whenever the construction changes: part of the base model's cache key
COPY_CIRCUIT_VERSION = 2
#: slow RoPE pairs: turned by at most this many radians over the native context (the match
#: barely depends on distance there) ...
_SLOW_TURN = 1.0
#: ... and by at least this many, so that at 4x the native context they turn by 1 radian or
#: more and the match breaks: past its native length the base should fail, as LongLoRA's
#: premise has it (pairs slower than this would keep retrieval working at any length)
_SLOW_MIN_TURN = 0.25
#: fast RoPE pairs used by the previous-token head: at least this many radians per token
_FAST_TURN = 0.1
#: most fast pairs used (more would only sharpen an offset that is already sharp)
_MAX_FAST = 8
#: score margin (logit units) of offset 1 over offsets 0 and 2 in the previous-token head
_PREV_MARGIN = 12.0


class CopyCircuitError(ValueError):
    """The model's shape cannot hold the circuit."""


def rope_frequencies(head_dim: int, rope_theta: float) -> torch.Tensor:
    """``(head_dim / 2,)`` float64: radians per token of each RoPE pair (Llama's default RoPE,
    ``theta ** (-2i / head_dim)``)."""
    return rope_theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def circuit_planes(
    head_dim: int, rope_theta: float, context_length: int
) -> tuple[list[int], list[int]]:
    """``(fast, slow)``: the RoPE pairs of the previous-token head (at least ``_FAST_TURN``
    radians a token, the first ``_MAX_FAST``) and of the induction head's match (at most
    ``_SLOW_TURN`` and at least ``_SLOW_MIN_TURN`` radians over ``context_length`` tokens)."""
    freqs = rope_frequencies(head_dim, rope_theta).tolist()
    fast = [i for i, f in enumerate(freqs) if f >= _FAST_TURN][:_MAX_FAST]
    slow = [i for i, f in enumerate(freqs) if _SLOW_MIN_TURN <= f * context_length <= _SLOW_TURN]
    return fast, slow


def check_shape(
    hidden_size: int, num_heads: int, num_layers: int, rope_theta: float, context_length: int
) -> tuple[list[int], list[int]]:
    """The circuit's ``(fast, slow)`` RoPE pairs (:func:`circuit_planes`) for this shape.

    Raises:
        CopyCircuitError: (one line, the reason) the shape cannot hold the circuit: fewer than
            2 layers, a hidden size below ``2 * head_dim + 1`` (the code, the previous-token
            slot and the common direction must be orthogonal), or no fast or no slow RoPE pair.
    """
    head_dim = hidden_size // num_heads
    if num_layers < 2:
        raise CopyCircuitError(f"the copy circuit needs at least 2 layers, got {num_layers}")
    if hidden_size < 2 * head_dim + 1:
        raise CopyCircuitError(
            f"the copy circuit needs hidden_size >= 2 * head_dim + 1 (at least 3 heads), got "
            f"hidden_size {hidden_size} with {num_heads} heads"
        )
    fast, slow = circuit_planes(head_dim, rope_theta, context_length)
    if not fast or not slow:
        raise CopyCircuitError(
            f"the copy circuit needs RoPE pairs that turn by >= {_FAST_TURN} rad a token and "
            f"pairs that turn by {_SLOW_MIN_TURN} to {_SLOW_TURN} rad over the context "
            f"({context_length} tokens); head size {head_dim} with rope_theta {rope_theta} "
            f"gives {len(fast)} and {len(slow)}"
        )
    return fast, slow


@torch.no_grad()
def install_copy_circuit(
    model: nn.Module,
    context_length: int,
    seed: int = 0,
    *,
    c: float = 0.5,
    code_norm: float = 1.0,
    embed_scale: float = 4.0,
    prev_scale: float = 3.0,
    induction_scale: float = 8.0,
    copy_scale: float = 6.0,
    lm_head_scale: float = 0.25,
) -> None:
    """Write the previous-token and induction heads into ``model`` (in place).

    Args:
        model: a freshly initialised ``LlamaForCausalLM`` (untied embeddings) with at least 2
            layers and a hidden size of at least ``2 * head_dim + 1``.
        context_length: the native context; decides which RoPE pairs count as slow.
        seed: draws the basis and the code's projection.
        c: weight of the common direction ``u`` in every embedding.
        code_norm: norm of every token's code (its embedding's component in ``P``).
        embed_scale: the embeddings, built as above, are multiplied by this (larger embeddings
            leave the token's own identity a larger share of the residual stream).
        prev_scale: strength of the previous-token head's output into ``G``.
        induction_scale: sharpness of the induction head's match.
        copy_scale: strength of the induction head's output ``delta``.
        lm_head_scale: ``lm_head`` starts as this times the embedding matrix.

    Raises:
        CopyCircuitError: fewer than 2 layers, tied embeddings, or a shape too small.
    """
    cfg = model.config
    d = cfg.hidden_size
    hd = d // cfg.num_attention_heads
    rope_theta = _rope_theta(cfg)
    fast, slow = check_shape(
        d, cfg.num_attention_heads, cfg.num_hidden_layers, rope_theta, context_length
    )
    if getattr(cfg, "tie_word_embeddings", False):
        raise CopyCircuitError("the copy circuit needs untied input and output embeddings")
    if getattr(cfg, "head_dim", hd) != hd:
        raise CopyCircuitError(f"head_dim must be hidden_size / num_heads ({hd})")
    inv_freq = rope_frequencies(hd, rope_theta)

    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    P = basis[:, :hd].T  # (hd, d): reads the token code
    G = basis[:, hd : 2 * hd]  # (d, hd): the previous-token slot
    u = basis[:, 2 * hd]  # (d,): the common direction

    E, u_in = _embeddings(model.model.embed_tokens.weight, P, G, u, c, code_norm, embed_scale)
    q0, k0 = _previous_token_query_key(inv_freq, fast, hd)
    S = _slow_projection(slow, hd, g)

    values = [  # in the order of _circuit_weights: layer 0 q, k, v, o, then layer 1
        torch.outer(q0, u) / u_in,
        torch.outer(k0, u) / u_in,
        P,
        prev_scale * G,
        induction_scale * S @ P,
        induction_scale * S @ G.T,
        P,
        copy_scale * P.T,
    ]
    for (weight, index), value in zip(_circuit_weights(model), values, strict=True):
        weight[index] = value.to(weight.dtype)
    model.model.embed_tokens.weight.copy_(E)
    model.lm_head.weight.copy_(lm_head_scale * E)


def _embeddings(
    weight: torch.Tensor,
    P: torch.Tensor,
    G: torch.Tensor,
    u: torch.Tensor,
    c: float,
    code_norm: float,
    embed_scale: float,
) -> tuple[torch.Tensor, float]:
    """The embeddings ``(vocab, d)`` rebuilt from ``weight``: nothing in ``G``, each token's
    code (its part in ``P``) of norm ``code_norm``, ``c * u`` in every row, all times
    ``embed_scale``; and ``u``'s coefficient after RMSNorm."""
    E = weight.double()
    E = E - torch.outer(E @ u, u) - (E @ G) @ G.T
    code = E @ P.T
    E = E + (code / code.norm(dim=1, keepdim=True).clamp_min(1e-12) * code_norm - code) @ P
    E = embed_scale * (E + c * u)
    # after RMSNorm (weight 1) a row x becomes x / rms(x): u's coefficient is then about this
    u_in = embed_scale * c / math.sqrt((E**2).mean().item())
    return E, u_in


def _previous_token_query_key(
    inv_freq: torch.Tensor, fast: list[int], hd: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0, head 0's query and key ``(hd,)`` on the fast RoPE pairs:
    ``q . R(D) k = sum_i a^2 cos(theta_i (D - 1))``, largest at offset ``D = 1``."""
    half = hd // 2
    gap = sum(1 - math.cos(inv_freq[i].item()) for i in fast)  # offset 1 vs offsets 0, 2
    a = math.sqrt(_PREV_MARGIN * math.sqrt(hd) / gap)
    q0 = torch.zeros(hd, dtype=torch.float64)
    k0 = torch.zeros(hd, dtype=torch.float64)
    for i in fast:
        k0[i] = a
        q0[i] = a * math.cos(inv_freq[i].item())
        q0[i + half] = -a * math.sin(inv_freq[i].item())
    return q0, k0


def _slow_projection(slow: list[int], hd: int, g: torch.Generator) -> torch.Tensor:
    """Layer 1, head 0's ``(hd, hd)`` projection of both sides' codes into the slow RoPE pairs
    (an orthonormal random map, drawn from ``g``): within the native context the match then
    barely depends on distance."""
    half = hd // 2
    slow_dims = slow + [i + half for i in slow]
    S = torch.zeros(hd, hd, dtype=torch.float64)
    S[slow_dims] = torch.linalg.qr(
        torch.randn(hd, len(slow_dims), generator=g, dtype=torch.float64)
    )[0].T
    return S


def _rope_theta(config) -> float:
    """The RoPE base of a transformers config (v5 keeps it in ``rope_parameters``)."""
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise CopyCircuitError(f"the copy circuit needs the default RoPE, got {params}")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _circuit_weights(model: nn.Module) -> list[tuple[nn.Parameter, tuple]]:
    """``[(weight, index)]`` of the circuit in layers 0 and 1: the query rows of head 0, the key
    and value rows of its key-value head, the output columns of head 0."""
    hd = model.config.hidden_size // model.config.num_attention_heads
    rows, columns = (slice(0, hd),), (slice(None), slice(0, hd))
    out = []
    for layer in model.model.layers[:2]:
        at = layer.self_attn
        out += [
            (at.q_proj.weight, rows),
            (at.k_proj.weight, rows),
            (at.v_proj.weight, rows),
            (at.o_proj.weight, columns),
        ]
    return out


def frozen_slices(model: nn.Module) -> list[tuple[nn.Parameter, tuple, torch.Tensor]]:
    """``[(parameter, index, value)]``: the circuit's weights as they are now; writing each
    ``value`` back after every optimizer step keeps the circuit fixed (weight decay included)."""
    return [(w, index, w.detach()[index].clone()) for w, index in _circuit_weights(model)]
