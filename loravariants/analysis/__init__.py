"""SVD analysis of low-rank updates: spectra, ranks, subspace similarity, W-relative metrics.

``analyze(source)`` reads a model with adapters, a saved adapter directory (ours or any peft
LoRA) or single updates, and returns an :class:`AnalysisReport`. The metric functions take any
update (layer, ``(B, A)`` pair, dense matrix) and compute its SVD exactly from the factors.
See ``docs/analysis.md``.
"""

from .report import AnalysisReport, LayerAnalysis, Update, analyze, collect_updates
from .svd import (
    IntruderResult,
    LowRankSVD,
    amplification_factor,
    components,
    effective_rank,
    energy,
    intruder_dimensions,
    normalized_spectrum,
    numerical_rank,
    random_subspace_similarity,
    similarity_matrix,
    spectrum,
    stable_rank,
    subspace_similarity,
    subspace_similarity_grid,
    svd,
    top_singular,
)

__all__ = [
    "AnalysisReport",
    "IntruderResult",
    "LayerAnalysis",
    "LowRankSVD",
    "Update",
    "amplification_factor",
    "analyze",
    "collect_updates",
    "components",
    "effective_rank",
    "energy",
    "intruder_dimensions",
    "normalized_spectrum",
    "numerical_rank",
    "random_subspace_similarity",
    "similarity_matrix",
    "spectrum",
    "stable_rank",
    "subspace_similarity",
    "subspace_similarity_grid",
    "svd",
    "top_singular",
]
