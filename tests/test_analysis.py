"""SVD analysis: exact low-rank SVD against dense float64 SVD, metric properties, sources."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama

import loravariants as lv
from loravariants.adapters.lora import LoRAConfig
from loravariants.analysis import (
    AnalysisReport,
    amplification_factor,
    analyze,
    components,
    effective_rank,
    energy,
    intruder_dimensions,
    normalized_spectrum,
    random_subspace_similarity,
    similarity_matrix,
    spectrum,
    stable_rank,
    subspace_similarity,
    subspace_similarity_grid,
    svd,
    top_singular,
)
from loravariants.cli import analyze_main

D64 = torch.float64


def _pair(out: int, inp: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, k, generator=g, dtype=D64), torch.randn(k, inp, generator=g, dtype=D64)


def _projector(vecs: torch.Tensor) -> torch.Tensor:
    return vecs @ vecs.mT


# ---------------------------------------------------------------------------------------------
# exact SVD from factors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 40, 6), (30, 70, 8), (64, 64, 1)])
def test_factor_svd_matches_dense(shape):
    out, inp, k = shape
    B, A = _pair(out, inp, k)
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    dec = svd((B, A))
    torch.testing.assert_close(dec.S, S[:k], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(spectrum((B, A)), S[:k], atol=1e-6, rtol=1e-6)
    # subspaces, not signs: compare projectors onto the top-k singular vectors
    torch.testing.assert_close(_projector(dec.U), _projector(U[:, :k]), atol=1e-6, rtol=0)
    torch.testing.assert_close(_projector(dec.V), _projector(Vh[:k].mT), atol=1e-6, rtol=0)
    torch.testing.assert_close(dec.U @ torch.diag(dec.S) @ dec.V.mT, B @ A, atol=1e-9, rtol=0)


def test_rank_deficient_factors_give_zero_tail():
    B, A = _pair(20, 30, 5)
    B[:, 4] = B[:, 0]  # rank 4
    s = spectrum((B, A))
    torch.testing.assert_close(s[:4], torch.linalg.svdvals(B @ A)[:4], atol=1e-8, rtol=1e-8)
    assert float(s[4]) < 1e-10


def test_dense_input_and_layer_input_agree():
    torch.manual_seed(0)
    layer = lv.adapters.lora.LoRALinear(torch.nn.Linear(24, 16), LoRAConfig(r=3, init="random"))
    dense = layer.delta_weight().to(D64)
    torch.testing.assert_close(spectrum(layer), spectrum(dense)[:3], atol=1e-6, rtol=1e-6)
    B, A = layer.factors()
    assert spectrum((B, A)).dtype == D64


def test_top_singular_randomized_matches_dense():
    g = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(600, 600, generator=g, dtype=D64))[0]
    V = torch.linalg.qr(torch.randn(520, 520, generator=g, dtype=D64))[0]
    s = torch.cat(
        [torch.tensor([50.0, 40, 30, 20, 10], dtype=D64), torch.rand(515, generator=g, dtype=D64)]
    )
    W = U[:, :520] @ torch.diag(s) @ V.mT
    dec = top_singular(W, 5, randomized=True)
    torch.testing.assert_close(dec.S, s[:5], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_projector(dec.U), _projector(U[:, :5]), atol=1e-6, rtol=0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="factors must be"):
        spectrum((torch.ones(3, 2), torch.ones(3, 4)))
    with pytest.raises(TypeError):
        spectrum("not a matrix")
    with pytest.raises(ValueError):
        energy(torch.ones(3), 0)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def test_effective_rank_properties():
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0, abs=1e-12)
    assert effective_rank(torch.tensor([3.0, 0, 0, 0])) == pytest.approx(1.0, abs=1e-12)
    B, A = _pair(20, 25, 1)
    assert effective_rank((B, A)) == pytest.approx(1.0, abs=1e-9)
    s = torch.tensor([5.0, 2.0, 1.0, 0.5])
    assert effective_rank(s) == pytest.approx(effective_rank(123.0 * s), abs=1e-12)
    assert 1.0 < effective_rank(s) < 4.0
    assert math.isnan(effective_rank(torch.zeros(3)))


def test_energy_monotone_and_one_at_rank():
    B, A = _pair(30, 40, 6, seed=1)
    values = [energy((B, A), k) for k in range(1, 9)]
    assert all(a <= b + 1e-15 for a, b in zip(values, values[1:], strict=False))
    assert values[5] == pytest.approx(1.0, abs=1e-12)
    assert values[7] == pytest.approx(1.0, abs=1e-12)
    s = spectrum((B, A))
    assert values[0] == pytest.approx(float(s[0] ** 2 / (s**2).sum()))


def test_stable_rank_and_normalized_spectrum():
    B, A = _pair(30, 40, 6, seed=2)
    dense = B @ A
    expected = float(torch.linalg.matrix_norm(dense) ** 2 / torch.linalg.matrix_norm(dense, 2) ** 2)
    assert stable_rank((B, A)) == pytest.approx(expected, rel=1e-9)
    assert stable_rank(torch.ones(5)) == pytest.approx(5.0)
    ns = normalized_spectrum((B, A))
    assert float(ns[0]) == 1.0 and bool((ns[1:] <= 1).all())


# ---------------------------------------------------------------------------------------------
# subspace similarity
# ---------------------------------------------------------------------------------------------


def test_subspace_similarity_self_symmetric_bounded():
    a, b = _pair(32, 50, 8, seed=4), _pair(32, 50, 8, seed=5)
    for i in (1, 4, 8):
        assert subspace_similarity(a, a, i) == pytest.approx(1.0, abs=1e-12)
        for j in (2, 8):
            ab, ba = subspace_similarity(a, b, i, j), subspace_similarity(b, a, j, i)
            assert ab == pytest.approx(ba, abs=1e-12)
            assert 0.0 <= ab <= 1.0
    # nested subspaces: the smaller lies in the larger
    assert subspace_similarity(a, a, 2, 8) == pytest.approx(1.0, abs=1e-12)
    assert subspace_similarity(a, b, 3, 5, side="left") <= 1.0


def test_subspace_similarity_invariant_to_row_mixing():
    B, A = _pair(32, 50, 6, seed=6)
    M = torch.randn(6, 6, generator=torch.Generator().manual_seed(7), dtype=D64) + 3 * torch.eye(
        6, dtype=D64
    )
    # right subspace of B A is the row space of A: unchanged by A -> M A (any B of full rank)
    other = (torch.randn(32, 6, generator=torch.Generator().manual_seed(8), dtype=D64), M @ A)
    assert subspace_similarity((B, A), other, 6) == pytest.approx(1.0, abs=1e-10)
    # and the top-6 of a rank-6 update is the whole row space
    assert subspace_similarity((B, A), (B, M @ A), 6, 6) == pytest.approx(1.0, abs=1e-10)


# Oracle: the LoRA paper's definition (Hu et al. 2021, arXiv 2106.09685, sec. 7.2, eq. 4),
# transcribed: "we perform singular value decomposition on A_{r=8} and A_{r=64} and obtain the
# right-singular unitary matrices U_{A_{r=8}} and U_{A_{r=64}} ...
# phi(A_{r=8}, A_{r=64}, i, j) = ||U_{A_{r=8}}^{i T} U_{A_{r=64}}^j||_F^2 / min(i, j)",
# U^i: the columns of U for the top-i singular vectors.
def _paper_phi(A1, A2, i, j):
    _, _, V1h = np.linalg.svd(A1)
    _, _, V2h = np.linalg.svd(A2)
    U1, U2 = V1h.T, V2h.T  # right-singular vectors as columns
    return np.linalg.norm(U1[:, :i].T @ U2[:, :j], ord="fro") ** 2 / min(i, j)


def test_of_A_is_the_lora_papers_phi():
    (B8, A8), (B64, A64) = _pair(80, 96, 8, seed=21), _pair(80, 96, 64, seed=22)
    A64 = A64.clone()
    A64[:8] += 3 * A8  # a shared direction set, as between ranks 8 and 64 in the paper
    grid = subspace_similarity_grid((B8, A8), (B64, A64), of="A")
    assert grid.shape == (8, 64)
    worst = 0.0
    for i in range(1, 9):
        for j in (1, 2, 4, 8, 16, 33, 64):
            expected = _paper_phi(A8.numpy(), A64.numpy(), i, j)
            ours = subspace_similarity((B8, A8), (B64, A64), i, j, of="A")
            assert ours == pytest.approx(expected, abs=1e-10)
            assert float(grid[i - 1, j - 1]) == pytest.approx(expected, abs=1e-10)
            assert subspace_similarity(A8, A64, i, j, of="A") == pytest.approx(expected, abs=1e-10)
            worst = max(worst, abs(subspace_similarity((B8, A8), (B64, A64), i, j) - expected))
    assert worst > 0.05  # the update's definition is another quantity below full rank
    labels, M = similarity_matrix({"r8": (B8, A8), "A8": A8}, 3, of="A")
    torch.testing.assert_close(M, torch.ones(2, 2, dtype=D64))


def test_of_update_and_of_A_agree_at_full_rank_only():
    """Same A, different B: the paper's phi is 1 at every i; the update's only at i = r."""
    B1, A = _pair(48, 64, 6, seed=23)
    B2 = torch.randn(48, 6, generator=torch.Generator().manual_seed(24), dtype=D64)
    for i in range(1, 7):
        assert subspace_similarity((B1, A), (B2, A), i, of="A") == pytest.approx(1.0, abs=1e-10)
    assert subspace_similarity((B1, A), (B2, A), 6) == pytest.approx(1.0, abs=1e-10)
    assert subspace_similarity((B1, A), (B2, A), 1) < 0.9
    with pytest.raises(ValueError, match="side must be 'right'"):
        subspace_similarity((B1, A), (B2, A), 2, side="left", of="A")
    with pytest.raises(ValueError, match="of must be one of"):
        subspace_similarity((B1, A), (B2, A), 2, of="B")
    with pytest.raises(ValueError, match="not an SVD"):
        subspace_similarity(svd((B1, A)), (B2, A), 2, of="A")


def test_random_subspace_similarity_near_baseline():
    dim, i, j = 256, 8, 16
    expected = random_subspace_similarity(dim, i, j)
    assert expected == pytest.approx(16 / 256)
    values = [
        subspace_similarity(_pair(20, dim, i, seed=100 + t), _pair(20, dim, j, seed=200 + t), i, j)
        for t in range(40)
    ]
    mean = sum(values) / len(values)
    # E[phi] = max(i, j)/dim; the std of the mean is about 0.004 here
    assert abs(mean - expected) < 0.02


def test_similarity_grid_and_matrix():
    a, b = _pair(32, 50, 6, seed=9), _pair(32, 50, 4, seed=10)
    grid = subspace_similarity_grid(a, b)
    assert grid.shape == (6, 4)
    for i in (1, 3, 6):
        for j in (1, 4):
            assert float(grid[i - 1, j - 1]) == pytest.approx(
                subspace_similarity(a, b, i, j), abs=1e-12
            )
    labels, M = similarity_matrix({"a": a, "b": b, "a2": a}, 4)
    assert labels == ["a", "b", "a2"]
    torch.testing.assert_close(M, M.mT)
    assert float(M[0, 2]) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(torch.diagonal(M), torch.ones(3, dtype=D64))


# ---------------------------------------------------------------------------------------------
# relative to the base weight
# ---------------------------------------------------------------------------------------------


def test_amplification_factor_definition():
    g = torch.Generator().manual_seed(11)
    W = torch.randn(40, 30, generator=g, dtype=D64)
    B, A = _pair(40, 30, 3, seed=12)
    dense = B @ A
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    expected = float(
        torch.linalg.matrix_norm(dense) / torch.linalg.matrix_norm(U[:, :3].mT @ W @ Vh[:3].mT)
    )
    assert amplification_factor((B, A), W) == pytest.approx(expected, rel=1e-8)
    assert amplification_factor(dense, W) == pytest.approx(expected, rel=1e-6)
    # dW pointing along W's top direction is not amplified: ratio s_dW / s_W < 1 here
    Uw, Sw, Vhw = torch.linalg.svd(W)
    along = 0.1 * Sw[0] * torch.outer(Uw[:, 0], Vhw[0])
    assert amplification_factor(along, W) == pytest.approx(0.1, rel=1e-8)


def test_intruder_dimensions_none_for_unchanged_weight():
    W = torch.randn(64, 48, generator=torch.Generator().manual_seed(13), dtype=D64)
    found = intruder_dimensions(W, W, k=10, eps=0.5)
    assert found.count == 0 and found.energy_share == 0.0
    assert bool((found.max_cosine > 0.999).all())


def test_intruder_dimensions_find_planted_spike():
    g = torch.Generator().manual_seed(14)
    W = torch.randn(64, 64, generator=g, dtype=D64) / 8  # spectral norm about 2
    U, _, Vh = torch.linalg.svd(W)
    # a direction orthogonal to W's top-16 left and right singular vectors, with a big value
    u = torch.randn(64, generator=g, dtype=D64)
    u -= U[:, :16] @ (U[:, :16].mT @ u)
    v = torch.randn(64, generator=g, dtype=D64)
    v -= Vh[:16].mT @ (Vh[:16] @ v)
    u, v = u / u.norm(), v / v.norm()
    tuned = W + 10.0 * torch.outer(u, v)
    found = intruder_dimensions(tuned, W, k=10, eps=0.5)
    assert found.count >= 1 and 0 in found.indices
    top = torch.linalg.svdvals(tuned)[0]
    assert found.energy_share >= float(top**2 / tuned.pow(2).sum()) - 1e-12
    # small rotations of existing directions are not intruders
    small = W + 1e-3 * torch.randn(64, 64, generator=g, dtype=D64)
    assert intruder_dimensions(small, W, k=5).count == 0


# ---------------------------------------------------------------------------------------------
# analyze(): models, layers, saved directories
# ---------------------------------------------------------------------------------------------


def _lora_model(r: int = 4, seed: int = 0):
    model = make_tiny_llama()
    torch.manual_seed(seed)
    return lv.attach(model, LoRAConfig(r=r, init="random", target_modules=["q_proj", "v_proj"]))


def test_analyze_model_matches_dense_svd(tmp_path):
    model = _lora_model()
    report = analyze(model, energy_k=(1, 2, 4))
    layers = lv.adapter_layers(model)
    assert len(report) == len(layers) == 4
    for row, (name, layer) in zip(report.rows(), layers.items(), strict=True):
        assert row["module"] == name and row["variant"] == "lora" and row["rank"] == 4
        s = torch.linalg.svdvals(layer.delta_weight().to(D64))[:4]
        torch.testing.assert_close(
            torch.tensor(row["singular_values"], dtype=D64), s, atol=1e-6, rtol=1e-6
        )
        assert row["effective_rank"] == pytest.approx(effective_rank(s), abs=1e-6)
        assert row["stable_rank"] == pytest.approx(stable_rank(s), abs=1e-6)
        assert row["energy_top2"] == pytest.approx(energy(s, 2), abs=1e-6)
        assert row["layer_type"] == name.rsplit(".", 1)[-1]
    by_type = {r["layer_type"]: r for r in report.by_type()}
    assert set(by_type) == {"q_proj", "v_proj"} and by_type["q_proj"]["count"] == 2

    csv_path = report.to_csv(tmp_path / "a.csv")
    assert csv_path.read_text().splitlines()[0].startswith("module,layer_type")
    data = json.loads(report.to_json(tmp_path / "a.json").read_text())
    assert len(data["layers"]) == 4 and len(data["by_type"]) == 2


def test_analyze_with_base_model():
    model = _lora_model()
    report = analyze(model, base=model)
    name, layer = next(iter(lv.adapter_layers(model).items()))
    row = report.rows()[0]
    expected = amplification_factor(layer, layer.base.weight)
    assert row["amplification"] == pytest.approx(expected, rel=1e-9)
    assert 0 <= row["intruders"] <= 10 and 0.0 <= row["intruder_energy"] <= 1.0
    limited = analyze(model, base=model, intruder_base_k=8).rows()[0]
    assert limited["intruders"] >= row["intruders"]  # fewer base vectors: fewer matches
    # the same through a dict of weights
    weights = {name: layer.base.weight.detach().clone()}
    single = analyze({name: layer}, base=weights)
    assert single.rows()[0]["amplification"] == pytest.approx(expected, rel=1e-9)


def test_analyze_other_variants_and_components():
    from loravariants.adapters.mixlora import MixLoRAConfig
    from loravariants.adapters.multilora import MultiLoRAConfig

    model = make_tiny_llama()
    lv.attach(model, MixLoRAConfig(num_experts=3, r=2, target_modules=["q_proj"]))
    report = analyze(model)
    experts = [r for r in report.rows() if r["expert"] is not None]
    assert len(experts) == 2 * 3 * 3  # layers x projections x experts
    assert {r["variant"] for r in report.rows()} == {"mixlora"}
    assert {r["layer_type"] for r in experts} == {"gate_proj", "up_proj", "down_proj"}
    ffn = next(
        layer for layer in lv.adapter_layers(model).values() if hasattr(layer, "expert_factors")
    )
    assert len(components(ffn)) == 9

    torch.manual_seed(0)
    multi = lv.attach(
        make_tiny_llama(), MultiLoRAConfig(num_branches=3, r=2, target_modules=["q_proj"])
    )
    layer = next(iter(lv.adapter_layers(multi).values()))
    with torch.no_grad():
        layer.scales.fill_(0.5)
    parts = components(layer)
    assert list(parts) == ["branch0", "branch1", "branch2"]
    total = sum(B @ A for B, A in parts.values())
    torch.testing.assert_close(total, layer.delta_weight(), atol=1e-6, rtol=1e-6)
    labels, M = similarity_matrix(parts, 2)
    assert M.shape == (3, 3)


def test_analyze_cola_chain_links():
    from loravariants.adapters.cola import COLAConfig

    torch.manual_seed(0)
    model = lv.attach(make_tiny_llama(), COLAConfig(r=2, init="random", target_modules=["q_proj"]))
    layer = next(iter(lv.adapter_layers(model).values()))
    layer.restart()
    with torch.no_grad():
        layer.lora_B.normal_()
    parts = components(layer)
    assert list(parts) == ["link0", "link1"]
    total = sum(B @ A for B, A in parts.values())
    torch.testing.assert_close(total, layer.delta_weight(), atol=1e-6, rtol=1e-6)
    row = analyze({"q": layer}).rows()[0]
    assert row["rank"] == 4 and row["variant"] == "cola"


def test_analyze_peft_directory_without_our_classes(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(
        make_tiny_llama(),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    model.save_pretrained(tmp_path)
    report = analyze(tmp_path)
    assert len(report) == 4
    for row in report.rows():
        mod = model.base_model.model.get_submodule(row["module"])
        dense = (mod.lora_B["default"].weight @ mod.lora_A["default"].weight).to(D64) * (8 / 4)
        s = torch.linalg.svdvals(dense)[:4]
        torch.testing.assert_close(
            torch.tensor(row["singular_values"], dtype=D64), s, atol=1e-6, rtol=1e-6
        )
        assert row["variant"] == "lora"


def test_analyze_native_directory(tmp_path):
    model = _lora_model(r=3)
    lv.save_adapter(model, tmp_path / "native")
    from_dir = analyze(tmp_path / "native").rows()
    from_model = analyze(model).rows()
    assert [r["module"] for r in from_dir] == [r["module"] for r in from_model]
    for a, b in zip(from_dir, from_model, strict=True):
        assert a["singular_values"] == pytest.approx(b["singular_values"], abs=1e-6)


def test_analyze_dense_and_pair_sources():
    B, A = _pair(20, 30, 3)
    rows = analyze({"pair": (B, A), "dense": B @ A}).rows()
    assert rows[0]["rank"] == 3 and rows[1]["rank"] == 3
    assert rows[0]["effective_rank"] == pytest.approx(rows[1]["effective_rank"], abs=1e-9)
    assert isinstance(analyze((B, A)), AnalysisReport)


def test_analyze_main_cli(tmp_path, capsys):
    model = _lora_model()
    lv.save_adapter(model, tmp_path / "adapter", format="peft")
    status = analyze_main([str(tmp_path / "adapter"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert status == 0 and "q_proj" in out and "effective_rank" in out
    for name in ("analysis.csv", "analysis.json", "spectra.png", "effective_rank.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0

    assert analyze_main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    assert analyze_main([str(bad)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (bad / "adapter_model.safetensors").write_bytes(b"garbage")
    assert analyze_main([str(bad)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_analyze_main_with_base_path(tmp_path, capsys):
    base = make_tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = _lora_model()
    lv.save_adapter(model, tmp_path / "adapter", format="peft")
    assert analyze_main([str(tmp_path / "adapter"), "--base", str(tmp_path / "base")]) == 0
    assert "amplification" in capsys.readouterr().out
    assert analyze_main([str(tmp_path / "adapter"), "--base", str(tmp_path / "nobase")]) == 2


def test_analyze_mixlora_experts_with_base():
    from loravariants.adapters.mixlora import MixLoRAConfig

    model = lv.attach(
        make_tiny_llama(), MixLoRAConfig(num_experts=2, r=2, target_modules=["q_proj"])
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in lv.adapter_layers(model).values():
            for p in layer.parameters():
                p.normal_()
    rows = analyze(model, base=model).rows()
    experts = [r for r in rows if r["expert"] is not None]
    assert experts and all(math.isfinite(r["amplification"]) for r in experts)
    ffn = lv.adapter_layers(model)["model.layers.0.mlp"]
    B, A = ffn.expert_factors()["up_proj"][1]
    row = next(r for r in rows if r["module"] == "model.layers.0.mlp.up_proj.experts.1")
    W = ffn.base.up_proj.weight
    assert row["amplification"] == pytest.approx(amplification_factor((B, A), W), rel=1e-9)


def test_cli_dispatches_analyze(tmp_path, capsys):
    from loravariants.cli import main

    assert main(["analyze", str(tmp_path / "nope")]) == 2


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------


def test_plots_write_png_and_svg(tmp_path):
    from loravariants.adapters.mixlora import MixLoRAConfig
    from loravariants.analysis.plots import (
        plot_effective_rank,
        plot_expert_similarity,
        plot_similarity_heatmap,
        plot_spectra,
        plot_subspace_similarity,
    )

    r4, r8 = analyze(_lora_model(4)), analyze(_lora_model(8, seed=1))
    assert plot_spectra({"r=4": r4, "r=8": r8}, tmp_path / "s.png").stat().st_size > 0
    assert plot_spectra({"r=4": r4}, tmp_path / "s.svg").read_text().lstrip().startswith("<?xml")
    assert plot_effective_rank({"r=4": r4, "r=8": r8}, tmp_path / "e.png").stat().st_size > 0
    a, b = _pair(32, 40, 4, seed=1), _pair(32, 40, 8, seed=2)
    assert plot_subspace_similarity(a, b, tmp_path / "phi.png").stat().st_size > 0
    assert plot_similarity_heatmap(torch.eye(3), tmp_path / "h.png", ["a", "b", "c"]).is_file()
    mix = lv.attach(make_tiny_llama(), MixLoRAConfig(num_experts=4, target_modules=["q_proj"]))
    ffn = next(
        layer for layer in lv.adapter_layers(mix).values() if hasattr(layer, "expert_factors")
    )
    for ex in ffn.experts:
        for p in ex.lora_B.values():
            torch.nn.init.normal_(p)
    assert plot_expert_similarity(ffn, tmp_path / "x.png").stat().st_size > 0
    with pytest.raises(ValueError, match="must end in"):
        plot_spectra(r4, tmp_path / "s.txt")


def test_top_level_import_names():
    import loravariants.analysis as an

    for name in ("spectrum", "effective_rank", "subspace_similarity", "analyze"):
        assert callable(getattr(an, name))
    assert Path(an.__file__).parent.name == "analysis"
