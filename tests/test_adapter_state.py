"""Adapter state in one place: routing per thread and per model, the model's own attributes."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from conftest import make_tiny_llama
from torch import nn
from torch.testing import assert_close

import loravariants as lv
from loravariants.adapters import LoRAConfig, MixLoRAConfig


class _Block(nn.Module):
    """``q_proj(x)`` between two waits: every thread's routing is set before any forward reads
    one, and read by all before any thread leaves its ``route_rows`` block."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.q_proj = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)  # not in forward; a module to mark trainable
        self.barrier: threading.Barrier | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.barrier is not None:
            self.barrier.wait()
        out = self.q_proj(x)
        if self.barrier is not None:
            self.barrier.wait()
        return out


def _model(seed: int, names: tuple[str, ...]) -> _Block:
    model = _Block(seed)
    for i, name in enumerate(names):
        torch.manual_seed(seed * 10 + i)
        lv.attach(model, LoRAConfig(r=2, init="random", target_modules=["q_proj"]), name=name)
    return model.eval()


def _expected(model: nn.Module, x: torch.Tensor, rows: dict[str, list[int]]) -> torch.Tensor:
    """Row by row, each through the one adapter it is routed to (or none), one at a time."""
    out = []
    owner = {i: n for n, idx in rows.items() for i in idx}
    for i in range(x.shape[0]):
        lv.set_active_adapters(model, [owner[i]] if i in owner else [])
        out.append(model(x[i : i + 1]))
    lv.set_active_adapters(model, None)
    return torch.cat(out)


def test_route_rows_is_per_thread_across_two_models():
    """Four threads, two models, each thread its own routing, all set at once: each forward
    sees its own thread's rows (a process-wide routing gives all of them the last one set)."""
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    one, two = _model(1, ("a", "b")), _model(2, ("c", "d"))
    jobs = [
        (one, {"a": [0, 1], "b": [2, 3]}),
        (one, {"b": [0], "a": [3]}),
        (two, {"c": [1, 2]}),
        (two, {"d": [0, 3], "c": [1]}),
    ]
    with torch.no_grad():
        expected = [_expected(m, x, rows) for m, rows in jobs]
        plain = one(x)
    barrier = threading.Barrier(len(jobs), timeout=30)
    one.barrier = two.barrier = barrier

    def run(job):
        model, rows = job
        with torch.no_grad(), lv.route_rows({n: torch.tensor(i) for n, i in rows.items()}):
            return model(x)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        got = list(pool.map(run, jobs))
    one.barrier = two.barrier = None
    for (_, rows), g, e in zip(jobs, got, expected, strict=True):
        assert_close(g, e, msg=f"routing {rows}")
    with torch.no_grad():  # nothing left routed on this thread after the threads' blocks
        assert_close(one(x), plain)


def test_route_rows_for_one_model_leaves_another_unrouted():
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    one, two = _model(3, ("a", "b")), _model(4, ("a", "b"))
    with torch.no_grad():
        plain_two = two(x)
        with lv.route_rows({"a": slice(0, 1)}, model=one):
            routed_one, still_two = one(x), two(x)
        with lv.route_rows({"a": slice(0, 1)}):  # no model: every model is routed
            routed_two = two(x)
    assert_close(routed_one, _expected(one, x, {"a": [0]}))
    assert_close(still_two, plain_two)
    assert_close(routed_two, _expected(two, x, {"a": [0]}))


def test_the_model_carries_one_attribute_of_ours():
    """Configs, marked modules and hook flags are one object of the model; reading a plain
    model adds nothing, and a copy has its own."""
    import copy

    model = _Block(5)
    before = set(model.__dict__)
    assert lv.adapter_names(model) == [] and lv.extra_trainable_modules(model) == []
    assert set(model.__dict__) == before  # reads change nothing
    lv.attach(model, LoRAConfig(r=2, target_modules=["q_proj"]), name="a")
    lv.mark_trainable(model, ["norm"])
    assert set(model.__dict__) - before == {"_loravariants_state"}
    state = model.__dict__["_loravariants_state"]
    assert list(state.configs) == ["a"] and state.extra_trainable == ["norm"]
    twin = copy.deepcopy(model)
    lv.detach(twin)
    assert lv.adapter_names(model) == ["a"] and lv.adapter_names(twin) == []


def test_a_transformers_model_with_mixlora_gains_the_state_and_save_pretrained_only():
    """MixLoRA's attention-mask hook is recorded in the same object; the one other entry is
    the instance's save_pretrained (which writes the adapters: docs/trainer.md)."""
    model = make_tiny_llama()
    before = set(model.__dict__)
    lv.attach(model, MixLoRAConfig(num_experts=2, top_k=1, r=2, target_modules=["q_proj"]))
    assert set(model.__dict__) - before == {"_loravariants_state", "save_pretrained"}
    assert model.__dict__["_loravariants_state"].model_hooks == {"mixlora.attention_mask"}
    lv.detach(model)
    assert "save_pretrained" not in model.__dict__


def _routing(model: nn.Module) -> list[tuple[int, list[int]]]:
    """Each MixLoRA layer's last forward: real tokens routed, tokens per expert."""
    out = []
    for layer in lv.adapter_layers(model).values():
        stats = layer.router_stats() if hasattr(layer, "router_stats") else None
        if stats is not None:
            out.append((stats["num_tokens"], stats["tokens_per_expert"].tolist()))
    return out


def test_mixlora_masks_are_per_thread():
    """Two MixLoRA models called at once from two threads, with different masks (4 and 5 real
    tokens): each model's routing counts its own call's real tokens (with one process-wide
    mask, the thread that set its mask first reads the other's)."""
    batches = [(torch.tensor([[1, 2, 3, 4, 5, 6]]), torch.tensor([[1, 1, 1, 1, 0, 0]]))]
    batches.append((torch.tensor([[7, 8, 9], [3, 2, 1]]), torch.tensor([[1, 1, 1], [0, 1, 1]])))
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = MixLoRAConfig(num_experts=2, top_k=1, r=2, target_modules=["q_proj"])
        models.append(lv.attach(make_tiny_llama(), config).eval())
    with torch.no_grad():
        expected = []
        for model, (ids, mask) in zip(models, batches, strict=True):
            model(ids, attention_mask=mask)
            expected.append((_routing(model), lv.aux_loss(model)))
    assert [r[0][0] for r, _ in expected] == [4, 5]
    barrier = threading.Barrier(2, timeout=30)

    def wait(*_) -> None:  # a pre-hook's return value would replace the layer's input
        barrier.wait()

    # every thread's mask is set (by the model's own hook) before any FFN reads one, and
    # every thread's first FFN has read it before any call ends (and puts its mask back)
    hooks = [m.model.layers[0].register_forward_pre_hook(wait) for m in models]
    hooks += [m.model.layers[0].mlp.register_forward_hook(wait) for m in models]

    def run(i):
        with torch.no_grad():
            models[i](batches[i][0], attention_mask=batches[i][1])
            return _routing(models[i]), lv.aux_loss(models[i])

    with ThreadPoolExecutor(max_workers=2) as pool:
        got = list(pool.map(run, [0, 1]))
    for h in hooks:
        h.remove()
    for (routing, loss), (want_routing, want_loss) in zip(got, expected, strict=True):
        assert routing == want_routing
        assert_close(loss, want_loss)
