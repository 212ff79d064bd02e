"""Device discipline on a CPU-only machine, and runs that outlive a failed metric.

On a GPU, compare's similarity step once met CPU-loaded reference factors with CUDA factors
(``mat2 is on cpu, different from other tensors on cuda:0``) and threw the finished runs away.
CI has no GPU, so :class:`Elsewhere` stands in for "a tensor on another device": it is a CPU
tensor that refuses to meet an ordinary tensor in any op, exactly as a CPU tensor refuses to
meet a CUDA one, until it is moved with ``.to(device)``.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama
from torch.utils._pytree import tree_leaves

import loravariants as lv
import loravariants.io
from loravariants.adapters import LoRAConfig
from loravariants.analysis import subspace_similarity
from loravariants.analysis.svd import amplification_factor, subspace_similarity_grid
from loravariants.compare import compare
from loravariants.compare import measure as compare_measure

#: what :class:`Elsewhere` tensors report as their device
OTHER = torch.device("meta")


def _target(func, args, kwargs) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and dtype a ``.to`` / ``.cpu`` / ``.cuda`` call asks for (None: unchanged)."""
    if func is torch.Tensor.cpu:
        return torch.device("cpu"), None
    if func is torch.Tensor.cuda:
        return torch.device("cuda"), None
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            device = a
        elif isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, torch.Tensor):
            device, dtype = a.device, a.dtype
    return (torch.device(device) if device is not None else None), dtype


class Elsewhere(torch.Tensor):
    """A CPU tensor that behaves as if it lived on another device (it reports ``meta``).

    It refuses to meet an ordinary tensor in any op, as a CPU tensor refuses a CUDA one, until
    it is moved with ``.to(device)`` (then it is an ordinary tensor).
    """

    @property
    def device(self) -> torch.device:
        return OTHER

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda):
            device, dtype = _target(func, args, kwargs)
            with torch._C.DisableTorchFunctionSubclass():
                value = args[0].to(dtype) if dtype is not None else args[0]
            stays = device is None or device == OTHER
            return value.as_subclass(Elsewhere if stays else torch.Tensor)
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        here = [t for t in leaves if not isinstance(t, Elsewhere)]
        # like torch, a 0-dim CPU tensor may meet a tensor on any device; nothing else may
        if any(t.dim() > 0 for t in here) and len(here) < len(leaves):
            raise RuntimeError(
                f"Expected all tensors to be on the same device ({func.__name__}: "
                "a tensor from elsewhere met one on the model's device)"
            )
        return super().__torch_function__(func, types, args, kwargs)


def elsewhere(t: torch.Tensor) -> Elsewhere:
    return t.detach().clone().as_subclass(Elsewhere)


def test_the_stand_in_device_really_refuses_mixed_ops():
    a, b = torch.randn(3, 3), elsewhere(torch.randn(3, 3))
    with pytest.raises(RuntimeError, match="same device"):
        a @ b
    assert b.device == OTHER
    assert type(b.to(a.device) @ a) is torch.Tensor
    assert isinstance(b.to(torch.float64) @ b.double(), Elsewhere)  # a dtype change stays there


def _pair(seed, out=12, inp=10, r=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g)


def test_analysis_follows_the_first_operands_device():
    (B1, A1), (B2, A2) = _pair(0), _pair(1)
    want = subspace_similarity((B1, A1), (B2, A2), 3)
    assert subspace_similarity((B1, A1), (elsewhere(B2), elsewhere(A2)), 3) == pytest.approx(want)
    grid = subspace_similarity_grid((B1, A1), (elsewhere(B2), elsewhere(A2)))
    assert float(grid[-1, -1]) == pytest.approx(want)
    W = torch.randn(12, 10)
    assert amplification_factor((B1, A1), elsewhere(W)) == pytest.approx(
        amplification_factor((B1, A1), W)
    )


def test_similarity_to_lora_moves_the_loaded_reference_to_the_models_device(tmp_path, monkeypatch):
    def adapted(seed):
        torch.manual_seed(seed)
        model = lv.attach(make_tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p)
        return model

    reference, model = adapted(0), adapted(1)
    lv.save_adapter(reference, tmp_path / "ref")
    want = compare_measure._similarity_to(model, tmp_path / "ref", "default")
    assert all(0 < want[k] <= 1 + 1e-9 for k in ("similarity_to_lora", "similarity_to_lora_right"))

    real = loravariants.io.read_factors
    monkeypatch.setattr(
        compare_measure,
        "read_factors",
        lambda path: {k: tuple(elsewhere(t) for t in v) for k, v in real(path).items()},
    )
    got = compare_measure._similarity_to(model, tmp_path / "ref", "default")
    assert got == pytest.approx(want)


def test_a_failed_metric_keeps_the_run_and_a_rerun_computes_it(tmp_path, monkeypatch, capsys):
    from test_compare import _experiment, _tiny_env

    from loravariants.cli import _print_summary

    config = _experiment(
        tmp_path, [{"name": "lora", "adapter": "lora", "overrides": {"r": 2}}], seeds=[0]
    )
    real = compare_measure._svd_summary

    def broken(*args, **kwargs):
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setattr(compare_measure, "_svd_summary", broken)
    logs: list[str] = []
    out = compare(config, progress=False, log=logs.append, env=_tiny_env())
    (record,) = json.loads((out / "results.json").read_text())["runs"]
    assert record["status"] == "ok"
    assert record["final_loss"] > 0 and set(record["ppl"]) == {"32", "64"}
    assert "svd" not in record
    assert "same device" in record["metric_errors"]["svd"]
    assert (out / "runs" / "lora" / "seed0" / "adapter").is_dir()
    assert any("metric svd failed (run kept)" in line for line in logs)
    assert "svd" in (out / "report.md").read_text()
    assert _print_summary(out) == 1  # a failed metric is not a silent success
    assert "metric(s) failed" in capsys.readouterr().out

    # the rerun keeps the training and computes only the failed metric again
    monkeypatch.setattr(compare_measure, "_svd_summary", real)
    logs.clear()
    compare(config, progress=False, log=logs.append, env=_tiny_env())
    (again,) = json.loads((out / "results.json").read_text())["runs"]
    assert "metric_errors" not in again
    assert again["final_loss"] == record["final_loss"] and again["ppl"] == record["ppl"]
    assert again["svd"]["effective_rank"] > 0
    assert any("computing its failed metrics again" in line for line in logs)
    assert not any("running" in line for line in logs)
    assert _print_summary(out) == 0
