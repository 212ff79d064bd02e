"""Spectra, ranks and subspaces of low-rank updates, computed exactly from their factors.

A LoRA-style update ``dW = B @ A`` (``B``: ``(out, k)``, ``A``: ``(k, in)``, ``k`` small) has
at most ``k`` non-zero singular values, and they can be found without forming ``dW``::

    B   = Q_B R_B              (QR, Q_B: (out, k), R_B: (k, k))
    A^T = Q_A R_A              (QR, Q_A: (in, k),  R_A: (k, k))
    dW  = Q_B (R_B R_A^T) Q_A^T
    R_B R_A^T = U_c diag(s) V_c^T              (SVD of a k x k core)
    dW  = (Q_B U_c) diag(s) (Q_A V_c)^T        (an exact thin SVD of dW)

Cost ``O((out + in) k^2)`` instead of ``O(out · in · min(out, in))`` for a dense SVD. Everything
is computed in float64. COLA chains and MultiLoRA give their whole update as one concatenated
``(B, A)`` pair, so the same code covers them; MixLoRA experts are one pair each.

Every function here takes a *source*: an adapter layer (anything with ``factors()``), a
``(B, A)`` pair, a dense 2-D matrix, or a :class:`LowRankSVD` already computed. Metrics that only
need singular values also accept a 1-D tensor of them.
"""

# Over 500 lines on purpose: every spectral metric on one exact-SVD core, each a few lines,
# so that one file holds all the definitions the analysis docs refer to.

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

__all__ = [
    "LowRankSVD",
    "IntruderResult",
    "svd",
    "top_singular",
    "spectrum",
    "normalized_spectrum",
    "energy",
    "stable_rank",
    "effective_rank",
    "numerical_rank",
    "subspace_similarity",
    "SUBSPACE_OF",
    "random_subspace_similarity",
    "subspace_similarity_grid",
    "similarity_matrix",
    "components",
    "amplification_factor",
    "intruder_dimensions",
]

_DTYPE = torch.float64


class LowRankSVD(NamedTuple):
    """A thin SVD ``M = U diag(S) V^T``.

    Attributes:
        U: left singular vectors as columns, ``(out, k)``.
        S: singular values, descending, ``(k,)``.
        V: right singular vectors as columns, ``(in, k)``.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


class IntruderResult(NamedTuple):
    """What :func:`intruder_dimensions` found.

    Attributes:
        count: number of intruder dimensions among the top-k singular vectors of the tuned W.
        energy_share: ``sum_{intruders} s_i^2 / ||W_tuned||_F^2``.
        indices: positions (0-based, in the tuned W's spectrum) of the intruders.
        max_cosine: for each of the top-k tuned singular vectors, its largest ``|cos|`` with
            any base singular vector, ``(k,)``.
    """

    count: int
    energy_share: float
    indices: list[int]
    max_cosine: torch.Tensor


# ---------------------------------------------------------------------------------------------
# normalising inputs
# ---------------------------------------------------------------------------------------------


def _as_factors_or_dense(source: Any) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """``(B, A)`` (float64) for a layer or a pair; a float64 matrix for dense input."""
    if hasattr(source, "factors") and callable(source.factors):
        if getattr(source, "mergeable", True) is False:
            raise ValueError(
                f"{type(source).__name__} has no single low-rank update; analyse its "
                "components (components(layer) or expert_factors()) instead"
            )
        B, A = source.factors()
        return _check_pair(B, A)
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return _check_pair(*source)
    if isinstance(source, torch.Tensor):
        if source.dim() != 2:
            raise ValueError(f"expected a 2-D matrix, got shape {tuple(source.shape)}")
        return source.detach().to(_DTYPE)
    if hasattr(source, "__array__"):
        return _as_factors_or_dense(torch.as_tensor(source))
    raise TypeError(
        "expected an adapter layer, a (B, A) pair or a 2-D matrix, got " + type(source).__name__
    )


def _check_pair(B: Any, A: Any) -> tuple[torch.Tensor, torch.Tensor]:
    B = torch.as_tensor(B).detach().to(_DTYPE)
    A = torch.as_tensor(A).detach().to(B.device, _DTYPE)  # the analysis follows B's device
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"factors must be B (out, k) and A (k, in), got {tuple(B.shape)} and {tuple(A.shape)}"
        )
    return B, A


def svd(source: Any) -> LowRankSVD:
    """Exact thin SVD of an update.

    Factors (a layer or a ``(B, A)`` pair) go through the QR + small-core route of the module
    docstring; a dense matrix gets ``torch.linalg.svd``. A :class:`LowRankSVD` is returned as is.

    Args:
        source: layer, ``(B (out, k), A (k, in))``, dense ``(out, in)``, or a LowRankSVD.

    Returns:
        ``LowRankSVD(U (out, q), S (q,), V (in, q))`` in float64; for factors
        ``q = min(out, in, k)``, for dense input ``q = min(out, in)``.
    """
    if isinstance(source, LowRankSVD):
        return source
    x = _as_factors_or_dense(source)
    if isinstance(x, torch.Tensor):
        U, S, Vh = torch.linalg.svd(x, full_matrices=False)
        return LowRankSVD(U, S, Vh.mT)
    B, A = x
    Q_B, R_B = torch.linalg.qr(B)  # (out, q_b), (q_b, k)
    Q_A, R_A = torch.linalg.qr(A.mT)  # (in, q_a), (q_a, k)
    U_c, S, Vh_c = torch.linalg.svd(R_B @ R_A.mT, full_matrices=False)
    return LowRankSVD(Q_B @ U_c, S, Q_A @ Vh_c.mT)


def top_singular(
    W: torch.Tensor, k: int, *, randomized: bool | None = None, seed: int = 0
) -> LowRankSVD:
    """Top-``k`` singular triplets of a (large) dense matrix such as a base weight.

    Uses ``sklearn.utils.extmath.randomized_svd`` (Halko et al. 2011) when ``randomized`` is
    true, or by default when ``min(W.shape) >= 512`` and ``k <= min(W.shape) / 4``; otherwise a
    dense SVD truncated to ``k``.

    Args:
        W: ``(out, in)``.
        k: number of triplets, ``1 <= k <= min(out, in)``.
        randomized: force (True) or forbid (False) the randomized algorithm.
        seed: random state of the randomized algorithm.

    Returns:
        ``LowRankSVD(U (out, k), S (k,), V (in, k))``, float64.
    """
    W = torch.as_tensor(W).detach().to(_DTYPE)
    q = min(W.shape)
    if not 1 <= k <= q:
        raise ValueError(f"k must be in [1, {q}], got {k}")
    if randomized is None:
        randomized = q >= 512 and k <= q / 4
    if not randomized:
        U, S, V = svd(W)
        return LowRankSVD(U[:, :k], S[:k], V[:, :k])
    from sklearn.utils.extmath import randomized_svd

    U, S, Vh = randomized_svd(W.cpu().numpy(), n_components=k, n_iter=7, random_state=seed)
    U, S, V = (torch.from_numpy(x).to(W.device) for x in (U, S, Vh.T))
    return LowRankSVD(U, S, V)


# ---------------------------------------------------------------------------------------------
# spectra and ranks
# ---------------------------------------------------------------------------------------------


def spectrum(source: Any) -> torch.Tensor:
    """Singular values of the update, descending, float64.

    Args:
        source: layer, ``(B, A)`` pair, dense matrix, LowRankSVD, or a 1-D tensor of singular
            values (returned sorted).

    Returns:
        ``(q,)`` with ``q = min(out, in, k)`` for factors (trailing values may be ~0 when the
        factors are rank-deficient).
    """
    if isinstance(source, torch.Tensor) and source.dim() == 1:
        return source.detach().to(_DTYPE).abs().sort(descending=True).values
    if isinstance(source, LowRankSVD):
        return source.S
    x = _as_factors_or_dense(source)
    if isinstance(x, torch.Tensor):
        return torch.linalg.svdvals(x)
    B, A = x
    # singular values only: the core R_B R_A^T has the same ones as B A
    R_B = torch.linalg.qr(B, mode="r")[1]
    R_A = torch.linalg.qr(A.mT, mode="r")[1]
    return torch.linalg.svdvals(R_B @ R_A.mT)


def normalized_spectrum(source: Any) -> torch.Tensor:
    """``s_i / s_1``: the spectrum scaled so the largest value is 1 (all zeros stay zeros)."""
    s = spectrum(source)
    return s / s[0] if len(s) and s[0] > 0 else s


def energy(source: Any, k: int) -> float:
    """Share of the squared Frobenius norm in the top ``k`` directions.

    ``E_k = sum_{i<=k} s_i^2 / sum_i s_i^2`` — non-decreasing in ``k``, 1 at ``k >= rank``.

    Args:
        source: anything :func:`spectrum` takes.
        k: number of directions, >= 1.

    Returns:
        ``E_k`` in [0, 1]; ``nan`` for a zero update.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s2 = spectrum(source) ** 2
    total = float(s2.sum())
    return float(s2[:k].sum()) / total if total > 0 else math.nan


def stable_rank(source: Any) -> float:
    """``||dW||_F^2 / ||dW||_2^2 = sum_i s_i^2 / s_1^2``, in [1, rank]; ``nan`` for zero."""
    s = spectrum(source)
    return float((s**2).sum() / s[0] ** 2) if len(s) and s[0] > 0 else math.nan


def effective_rank(source: Any) -> float:
    """Effective rank (Roy & Vetterli 2007): the exponential of the spectral entropy.

    ``p_i = s_i / sum_j s_j``, ``erank = exp(-sum_i p_i ln p_i)`` (``0 ln 0 = 0``). Equals n for
    n equal non-zero singular values, 1 for rank one; invariant to scaling.

    Returns:
        ``erank`` in [1, rank]; ``nan`` for a zero update.
    """
    s = spectrum(source)
    total = float(s.sum())
    if total <= 0:
        return math.nan
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def numerical_rank(source: Any, rtol: float | None = None) -> int:
    """Number of singular values above ``rtol · s_1`` (default ``max(shape) · eps(float32)``,
    since adapter factors are stored in fp32 or lower)."""
    s = spectrum(source)
    if not len(s) or s[0] <= 0:
        return 0
    if rtol is None:
        shape = _shape(source)
        rtol = (max(shape) if shape else len(s)) * torch.finfo(torch.float32).eps
    return int((s > rtol * s[0]).sum())


def _shape(source: Any) -> tuple[int, int] | None:
    if isinstance(source, LowRankSVD):
        return (source.U.shape[0], source.V.shape[0])
    if isinstance(source, torch.Tensor) and source.dim() == 1:
        return None
    x = _as_factors_or_dense(source)
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    return (x[0].shape[0], x[1].shape[1])


# ---------------------------------------------------------------------------------------------
# subspaces
# ---------------------------------------------------------------------------------------------


#: what a subspace similarity reads singular vectors of: the update ``dW = B A`` (ours), or the
#: adapter's ``A`` matrix alone (the LoRA paper's definition, sec. 7.2).
SUBSPACE_OF = ("update", "A")


def _a_matrix(source: Any) -> torch.Tensor:
    """The ``A`` factor ``(k, in)`` of a layer or a ``(B, A)`` pair; a dense matrix is taken as
    ``A`` itself. Float64."""
    if isinstance(source, LowRankSVD):
        raise ValueError(
            "of='A' needs the adapter's A (a layer, a (B, A) pair or A itself), not an SVD of "
            "its update"
        )
    x = _as_factors_or_dense(source)
    return x if isinstance(x, torch.Tensor) else x[1]


def _svd_of(source: Any, of: str, side: str) -> LowRankSVD:
    """The SVD whose ``side`` singular vectors a similarity compares (see :data:`SUBSPACE_OF`)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if of == "update":
        return svd(source)
    if of != "A":
        raise ValueError(f"of must be one of {list(SUBSPACE_OF)}, got {of!r}")
    if side != "right":
        raise ValueError(
            "of='A' compares right-singular vectors of A (the paper's U_A, in the input space): "
            f"side must be 'right', got {side!r}"
        )
    return svd(_a_matrix(source))


def _basis(source: Any, n: int, side: str, of: str = "update") -> torch.Tensor:
    dec = _svd_of(source, of, side)
    vecs = dec.U if side == "left" else dec.V
    if not 1 <= n <= vecs.shape[1]:
        raise ValueError(
            f"asked for the top {n} singular vectors of an update with {vecs.shape[1]}"
        )
    return vecs[:, :n]


def subspace_similarity(
    a: Any, b: Any, i: int, j: int | None = None, side: str = "right", of: str = "update"
) -> float:
    """Normalised overlap of two top singular subspaces (LoRA paper, sec. 7.2).

    ``phi(a, b, i, j) = ||U_a[:, :i]^T U_b[:, :j]||_F^2 / min(i, j)``, with ``U`` the right
    (``side="right"``, the row space of ``A``) or left singular vectors of the update
    ``dW = B A`` (``of="update"``, the default), or the right-singular vectors of the adapters'
    ``A`` matrices alone (``of="A"``: the paper's exact definition, ``phi(A_1, A_2, i, j)``).
    The two agree for ``i`` and ``j`` at full rank (the top-r right-singular vectors of ``B A``
    span the row space of ``A`` when ``B`` has full column rank) and differ below it: the
    update's order of directions weighs in ``B``, the paper's only ``A``. ``phi`` is in [0, 1]:
    1 when the smaller subspace lies in the larger, 0 when they are orthogonal. The right
    subspace of ``B A`` is the row space of ``A``, so ``A -> M A`` (M invertible) leaves it
    unchanged when ``B`` is full rank. Random subspaces give ``max(i, j) / dim`` on average
    (:func:`random_subspace_similarity`).

    Args:
        a, b: sources (see :func:`svd`) of the same shape on ``side``.
        i: number of top singular vectors of ``a``.
        j: number of top singular vectors of ``b`` (default ``i``).
        side: ``"right"`` (input space, dim ``in``) or ``"left"`` (output space, dim ``out``).
        of: ``"update"`` (singular vectors of ``B A``) or ``"A"`` (right-singular vectors of
            ``A``; a dense matrix is then read as ``A`` itself, ``(k, in)``; ``side`` must be
            ``"right"``).

    Returns:
        ``phi`` as a float.
    """
    j = i if j is None else j
    Ua, Ub = _basis(a, i, side, of), _basis(b, j, side, of)
    Ub = Ub.to(Ua.device)  # computed where ``a`` lives (a CUDA model vs CPU-loaded factors)
    if Ua.shape[0] != Ub.shape[0]:
        raise ValueError(f"subspaces live in different spaces: dim {Ua.shape[0]} vs {Ub.shape[0]}")
    return float((Ua.mT @ Ub).pow(2).sum() / min(i, j))


def random_subspace_similarity(dim: int, i: int, j: int | None = None) -> float:
    """Expected ``phi`` of independent uniformly random ``i``- and ``j``-dim subspaces of R^dim.

    ``E ||U_i^T U_j||_F^2 = i j / dim`` (each of the ``i j`` squared cosines has mean ``1/dim``),
    so the baseline is ``i j / (dim · min(i, j)) = max(i, j) / dim``.
    """
    j = i if j is None else j
    if not (1 <= i <= dim and 1 <= j <= dim):
        raise ValueError(f"i and j must be in [1, {dim}], got {i} and {j}")
    return max(i, j) / dim


def subspace_similarity_grid(
    a: Any,
    b: Any,
    max_i: int | None = None,
    max_j: int | None = None,
    side: str = "right",
    of: str = "update",
) -> torch.Tensor:
    """``phi(a, b, i, j)`` for ``i = 1..max_i``, ``j = 1..max_j`` (the LoRA paper's Fig. 3,
    which uses ``of="A"``; see :func:`subspace_similarity` for ``side`` and ``of``).

    Returns:
        ``(max_i, max_j)`` float64, entry ``[i-1, j-1] = phi(a, b, i, j)``. Defaults: each
        source's full rank (factor width).
    """
    da, db = _svd_of(a, of, side), _svd_of(b, of, side)
    Va = da.V if side == "right" else da.U
    Vb = (db.V if side == "right" else db.U).to(Va.device)
    max_i = Va.shape[1] if max_i is None else max_i
    max_j = Vb.shape[1] if max_j is None else max_j
    _basis(da, max_i, side), _basis(db, max_j, side)  # range checks
    overlap = (Va[:, :max_i].mT @ Vb[:, :max_j]).pow(2)  # (max_i, max_j)
    cum = overlap.cumsum(0).cumsum(1)  # cum[i-1, j-1] = ||U_i^T U_j||_F^2
    steps = lambda n: torch.arange(1, n + 1, device=cum.device, dtype=_DTYPE)  # noqa: E731
    mins = torch.minimum(steps(max_i)[:, None], steps(max_j)[None, :])
    return cum / mins


def similarity_matrix(
    sources: Mapping[str, Any] | Sequence[Any],
    i: int,
    j: int | None = None,
    side: str = "right",
    of: str = "update",
) -> tuple[list[str], torch.Tensor]:
    """Pairwise ``phi`` between several updates: seeds, ranks, COLA links, MultiLoRA branches,
    MixLoRA experts (see :func:`components`).

    Args:
        sources: ``{label: source}`` or a sequence (labelled ``"0", "1", ...``).
        i, j, side, of: as in :func:`subspace_similarity`; entry ``[p, q]`` uses the top ``i``
            of source p and top ``j`` of source q (symmetric when ``i == j``).

    Returns:
        ``(labels, M)`` with ``M`` of shape ``(n, n)``.
    """
    if not isinstance(sources, Mapping):
        sources = {str(n): s for n, s in enumerate(sources)}
    labels = list(sources)
    decs = [_svd_of(sources[name], of, side) for name in labels]
    n = len(decs)
    M = torch.empty(n, n, dtype=_DTYPE)
    for p in range(n):
        for q in range(n):
            M[p, q] = subspace_similarity(decs[p], decs[q], i, j, side)
    return labels, M


def components(layer: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The parts of one adapter layer, each as a ``(B, A)`` pair with its scaling folded in:
    the layer's own :meth:`~loravariants.adapters.base.AdapterLayer.components`.

    * MultiLoRA: ``"branch0", "branch1", ...`` — ``(alpha/r) s_i ⊙ B_i`` and ``A_i``.
    * COLA: ``"link0", ...`` for the folded links, then the current link (skipped while its
      ``B`` is still zero, right after a restart).
    * MixLoRA: ``"<proj>.expert<e>"`` for every expert of every FFN projection.
    * anything else with ``factors()``: ``{"update": factors()}``.
    """
    if hasattr(layer, "components"):
        return layer.components()
    return {"update": layer.factors()}


# ---------------------------------------------------------------------------------------------
# relative to the base weight
# ---------------------------------------------------------------------------------------------


def amplification_factor(dW: Any, W: torch.Tensor, r: int | None = None) -> float:
    """How much ``dW`` amplifies directions that ``W`` barely uses (LoRA paper, sec. 7.3).

    With ``U (out, r)`` and ``V (in, r)`` the top-``r`` left and right singular vectors of
    ``dW`` (``r`` = its numerical rank by default)::

        amplification = ||dW||_F / ||U^T W V||_F

    ``U^T W V`` (``r x r``) is ``W`` projected onto ``dW``'s subspaces (the paper writes
    ``U^T W V^T`` with V as rows). A large value means ``dW`` points where ``W`` is small (the
    paper: ~21.5 for r=4, ~2 for r=64 on GPT-3's W_q).

    Args:
        dW: the update (any source, see :func:`svd`), ``(out, in)``.
        W: the base weight, ``(out, in)``.
        r: number of singular directions of ``dW`` (default: its numerical rank).

    Returns:
        The ratio; ``nan`` when ``dW`` is zero, ``inf`` when ``W`` vanishes on its subspace.
    """
    dec = svd(dW)
    W = torch.as_tensor(W).detach().to(dec.U.device, _DTYPE)
    if (dec.U.shape[0], dec.V.shape[0]) != tuple(W.shape):
        raise ValueError(
            f"dW is {dec.U.shape[0]}x{dec.V.shape[0]} but W is {W.shape[0]}x{W.shape[1]}"
        )
    r = numerical_rank(dec) if r is None else r
    if r == 0:
        return math.nan
    num = float(dec.S.pow(2).sum().sqrt())
    den = float(torch.linalg.matrix_norm(dec.U[:, :r].mT @ W @ dec.V[:, :r]))
    return num / den if den > 0 else math.inf


def intruder_dimensions(
    W_tuned: torch.Tensor,
    W_base: torch.Tensor | LowRankSVD,
    k: int = 10,
    eps: float = 0.5,
    side: str = "left",
    base_k: int | None = None,
) -> IntruderResult:
    """Intruder dimensions (Shuttleworth et al. 2024, arXiv 2410.21228).

    A top-``k`` singular vector ``u_i`` of the tuned weight is an *intruder* when it resembles
    none of the base weight's singular vectors: ``max_j |<u_i, u_j^base>| < eps``. Fine-tuning
    that only rotates existing directions slightly finds none; LoRA often adds new high-energy
    directions.

    Args:
        W_tuned: ``W0 + dW``, ``(out, in)``.
        W_base: ``W0`` (or its precomputed :class:`LowRankSVD`), ``(out, in)``.
        k: number of top tuned singular vectors examined (paper: 10).
        eps: cosine threshold (paper: 0.5).
        side: compare left (``"left"``, the paper's choice) or right singular vectors.
        base_k: compare against the top ``base_k`` base vectors only (randomized SVD; for
            large W); default all of them (dense SVD).

    Returns:
        :class:`IntruderResult` with the count, the energy share
        ``sum_{intruders} s_i^2 / ||W_tuned||_F^2``, their indices and the max cosines.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    W_tuned = torch.as_tensor(W_tuned).detach().to(_DTYPE)
    k = min(k, min(W_tuned.shape))
    tuned = top_singular(W_tuned, k)
    if isinstance(W_base, LowRankSVD):
        base = W_base
    elif base_k is None:
        base = svd(torch.as_tensor(W_base))
    else:
        base = top_singular(W_base, base_k)
    t_vecs = tuned.U if side == "left" else tuned.V
    b_vecs = (base.U if side == "left" else base.V).to(t_vecs.device)
    if t_vecs.shape[0] != b_vecs.shape[0]:
        raise ValueError("W_tuned and W_base have different shapes")
    max_cos = (t_vecs.mT @ b_vecs).abs().amax(dim=1)  # (k,)
    indices = [int(i) for i in torch.nonzero(max_cos < eps).flatten()]
    total = float(W_tuned.pow(2).sum())
    share = float(tuned.S[indices].pow(2).sum()) / total if total > 0 else math.nan
    return IntruderResult(len(indices), share, indices, max_cos)
