"""MixLoRA: top-k routed LoRA experts on a shared frozen FFN, on a tiny Llama."""

from __future__ import annotations

import json
import math
import pickle
import warnings
from unittest.mock import ANY

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn
from torch.testing import assert_close

import loravariants as lv
from loravariants.adapters.lora import LoRALinear
from loravariants.adapters.mixlora import MixLoRAConfig, MixLoRAFFN, token_mask
from loravariants.io.mixlora import load_mixlora, read_mixlora_factors, save_mixlora

ALL_PROJ = ["gate_proj", "up_proj", "down_proj"]

# tiny models are built from configs: they have no name for the file (tested where it matters)
pytestmark = pytest.mark.filterwarnings("ignore:writing base_model_name_or_path null")


def _randomise(module: nn.Module, seed: int = 3) -> None:
    """Non-zero expert B's and a livelier router, so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad and ("lora_B" in name or "router" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _layer(seed: int = 0, **fields) -> tuple[MixLoRAFFN, nn.Module]:
    mlp = make_tiny_llama(seed).model.layers[0].mlp
    torch.manual_seed(seed + 1)
    layer = MixLoRAFFN(mlp, MixLoRAConfig(target_modules=["q_proj"], **fields))
    _randomise(layer, seed + 2)
    return layer, mlp


def _dense_reference(layer: MixLoRAFFN, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, then masked by the routing: the slow, obvious MixLoRA."""
    xt = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(xt.float() @ layer.router.T, dim=-1)
    top_w, top_i = probs.topk(layer.top_k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    out = torch.zeros_like(xt)
    s = layer.scaling
    for e, expert in enumerate(layer.experts):

        def lora(proj, h, expert=expert):
            if proj not in layer.projections:
                return 0
            return s * h @ expert.lora_A[proj].T @ expert.lora_B[proj].T

        g = mlp.gate_proj(xt) + lora("gate_proj", xt)
        u = mlp.up_proj(xt) + lora("up_proj", xt)
        a = mlp.act_fn(g) * u
        y = mlp.down_proj(a) + lora("down_proj", a)
        w = (top_w * (top_i == e)).sum(-1, keepdim=True)  # 0 where e was not chosen
        out = out + w * y
    return out.reshape(x.shape)


@pytest.mark.parametrize(
    "projections", [ALL_PROJ, ["down_proj"], ["gate_proj", "up_proj"], ["up_proj"]]
)
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_equals_dense_reference_forward_and_grads(projections, top_k):
    layer, mlp = _layer(num_experts=4, top_k=top_k, ffn_projections=projections, dropout=0.0)
    layer.train()
    x = torch.randn(2, 9, 32, requires_grad=True)
    fast = layer(x)
    slow = _dense_reference(layer, mlp, x)
    assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    params = [x] + [p for p in layer.parameters()]
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * g).sum(), params, allow_unused=True)
    grads_slow = torch.autograd.grad((slow * g).sum(), params, allow_unused=True)
    for p, a, b in zip(params, grads_fast, grads_slow, strict=True):
        # an expert no token was routed to gets no gradient (None) from the sparse path
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_model_logits_match_reference_and_zero_init(tokens):
    model = make_tiny_llama()
    ref = model(tokens).logits
    lv.attach(model, MixLoRAConfig(num_experts=4, top_k=2))
    assert_close(model(tokens).logits, ref, atol=1e-6, rtol=0)  # every B starts at zero
    layers = lv.adapter_layers(model)
    kinds = {p.rsplit(".", 1)[-1]: type(layer) for p, layer in layers.items()}
    assert kinds["mlp"] is MixLoRAFFN and kinds["q_proj"] is LoRALinear
    assert sum(isinstance(v, MixLoRAFFN) for v in layers.values()) == 2
    assert len(layers) == 2 * 5  # q, k, v, o and the FFN per decoder layer


def test_eval_is_deterministic_with_dropout_and_jitter():
    layer, _ = _layer(num_experts=4, top_k=2, dropout=0.3, jitter_noise=0.2)
    x = torch.randn(2, 9, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_top_k_all_with_uniform_router_is_mean_of_experts():
    layer, mlp = _layer(num_experts=4, top_k=4, dropout=0.0)
    with torch.no_grad():
        layer.router.zero_()
    x = torch.randn(5, 32)
    per_expert = []
    for e in range(4):
        single, _ = _layer(num_experts=1, top_k=1, dropout=0.0)
        single.experts[0].load_state_dict(layer.experts[e].state_dict())
        single._base_ref[0] = mlp
        per_expert.append(single(x))
    assert_close(layer(x), torch.stack(per_expert).mean(0), atol=1e-6, rtol=1e-6)
    stats = layer.router_stats()
    assert stats["tokens_per_expert"].tolist() == [5, 5, 5, 5] and stats["num_tokens"] == 5


def _two_expert_layer(coef: float) -> MixLoRAFFN:
    """E=2, k=1 on a hidden-2 FFN; router rows (2, 0) and (0, 1)."""
    ffn = nn.Module()
    ffn.gate_proj, ffn.up_proj = nn.Linear(2, 4, bias=False), nn.Linear(2, 4, bias=False)
    ffn.down_proj, ffn.act_fn = nn.Linear(4, 2, bias=False), nn.SiLU()
    layer = MixLoRAFFN(
        ffn,
        MixLoRAConfig(num_experts=2, top_k=1, router_aux_loss_coef=coef, target_modules=["q"]),
    )
    with torch.no_grad():
        layer.router.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    return layer


def test_balance_loss_hand_computed():
    """E=2, k=1, hidden 2: tokens [1,0], [1,0], [0,1] go to experts 0, 0, 1."""
    coef = 0.01
    layer = _two_expert_layer(coef)
    assert layer.aux_loss() is None and layer.router_stats() is None
    layer(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    p_a = math.exp(2) / (math.exp(2) + 1)  # token [1,0]: logits (2, 0)
    p_b = math.exp(1) / (math.exp(1) + 1)  # token [0,1]: logits (0, 1)
    P = [(2 * p_a + (1 - p_b)) / 3, (2 * (1 - p_a) + p_b) / 3]
    f = [2 / 3, 1 / 3]
    expected = coef * 2 * (f[0] * P[0] + f[1] * P[1])
    assert layer.aux_loss().item() == pytest.approx(expected, rel=1e-6)
    assert layer.router_stats()["tokens_per_expert"].tolist() == [2, 1]


def test_balance_loss_hand_computed_without_padding():
    """The same three tokens plus a padded fourth: the mask takes it out of f, P and the stats."""
    coef = 0.01
    layer = _two_expert_layer(coef)
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 5.0]]])  # (1, 4, 2)
    with token_mask(torch.tensor([[1, 1, 1, 0]])):
        out_masked = layer(x)
    p_a = math.exp(2) / (math.exp(2) + 1)
    p_b = math.exp(1) / (math.exp(1) + 1)
    P = [(2 * p_a + (1 - p_b)) / 3, (2 * (1 - p_a) + p_b) / 3]
    expected = coef * 2 * (2 / 3 * P[0] + 1 / 3 * P[1])
    assert layer.aux_loss().item() == pytest.approx(expected, rel=1e-6)
    assert layer.router_stats() == {"tokens_per_expert": ANY, "num_tokens": 3}
    assert layer.router_stats()["tokens_per_expert"].tolist() == [2, 1]
    unmasked = layer(x)  # outside the block: every token counts again
    assert layer.router_stats()["tokens_per_expert"].tolist() == [2, 2]
    assert layer.aux_loss().item() != pytest.approx(expected, rel=1e-3)
    assert torch.equal(out_masked, unmasked)  # the mask never changes the output
    with token_mask(torch.tensor([[0, 0, 0, 0]])):  # no real token: 0, not nan
        layer(x)
    assert layer.aux_loss().item() == 0.0
    with token_mask(torch.ones(2, 4)), pytest.raises(ValueError, match="attention mask"):
        layer(x)


def test_balance_loss_per_layer_option_is_averaged_over_layers(tokens):
    model = make_tiny_llama()
    lv.attach(
        model,
        MixLoRAConfig(
            num_experts=4, top_k=2, router_aux_loss_coef=0.1, balance_loss_aggregation="per_layer"
        ),
    )
    _randomise(model)
    model(tokens)
    moe = [lay for lay in lv.adapter_layers(model).values() if isinstance(lay, MixLoRAFFN)]
    assert all(lay.aux_loss_weight == 0.5 for lay in moe)
    per_layer = []
    for lay in moe:
        counts = lay.router_stats()["tokens_per_expert"].float()
        assert counts.sum() == tokens.numel() * 2
        per_layer.append(lay.aux_loss() / lay.aux_loss_weight)
    total = lv.aux_loss(model)
    assert_close(total, torch.stack(per_layer).mean())
    assert total.requires_grad  # it trains the router
    total.backward()
    assert all(torch.count_nonzero(lay.router.grad) > 0 for lay in moe)


def test_callers_tensor_unchanged():
    layer, _ = _layer(num_experts=4, top_k=2, dropout=0.3, jitter_noise=0.3)
    layer.train()
    x = torch.randn(3, 7, 32)
    keep, version = x.clone(), x._version
    layer(x).sum().backward()
    assert torch.equal(x, keep) and x._version == version


def test_merge_refused_and_expert_factors(tokens):
    model = make_tiny_llama()
    lv.attach(model, MixLoRAConfig(num_experts=3, top_k=2))
    with pytest.raises(ValueError, match="depends on the input"):
        lv.merge(model)
    layer = next(v for v in lv.adapter_layers(model).values() if isinstance(v, MixLoRAFFN))
    with pytest.raises(ValueError, match="depends on the input"):
        layer.merge()
    with pytest.raises(ValueError, match="expert_factors"):
        layer.delta_weight()
    with pytest.raises(ValueError, match="expert_factors"):
        layer.factors()
    _randomise(model)
    with torch.no_grad():  # experts at zero: a rounding-level routing flip cannot matter
        for ex in layer.experts:
            for B in ex.lora_B.values():
                B.zero_()
    expected = model(tokens).logits
    lv.merge(model, skip_unmergeable=True)  # attention LoRA only
    assert_close(model(tokens).logits, expected, atol=1e-5, rtol=1e-5)
    lv.unmerge(model)
    _randomise(model)
    ef = layer.expert_factors()
    assert set(ef) == set(ALL_PROJ) and len(ef["up_proj"]) == 3
    B, A = ef["down_proj"][1]
    assert B.shape == (32, 8) and A.shape == (8, 64)
    assert_close(B, layer.experts[1].lora_B["down_proj"].detach() * layer.scaling)


def test_mixlora_format_round_trip(tokens, tmp_path):
    model = make_tiny_llama()
    config = MixLoRAConfig(num_experts=4, top_k=2, expert_r=4, expert_alpha=8.0)
    lv.attach(model, config)
    _randomise(model)
    expected = model(tokens).logits
    out = lv.save_adapter(model, tmp_path / "mix", format="mixlora")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.bin"]
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["peft_type"] == "MIXLORA" and meta["routing_strategy"] == "mixlora"
    assert meta["act_fn"] == "silu" and meta["num_experts"] == 4 and meta["top_k"] == 2
    assert meta["expert_lora"] == {"r": 4, "lora_alpha": 8.0, "lora_dropout": 0.05}
    assert set(meta["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", *ALL_PROJ}
    assert meta["router_aux_loss_coef"] == 0.01 and meta["router_init_range"] == 0.02
    tensors = torch.load(out / "adapter_model.bin", weights_only=True)
    assert tensors["mixlora.layers.1.mlp.moe_gate.weight"].shape == (4, 32)
    assert tensors["mixlora.layers.0.mlp.down_proj.experts.3.lora_B.weight"].shape == (32, 4)
    assert tensors["mixlora.layers.0.self_attn.v_proj.lora_A.weight"].shape == (8, 32)
    assert len(tensors) == 2 * (1 + 4 * 3 * 2 + 4 * 2)

    fresh = make_tiny_llama()
    lv.load_adapter(fresh, out)
    assert_close(fresh(tokens).logits, expected, atol=1e-6, rtol=1e-6)
    loaded = lv.adapter_config(fresh)
    for key in (
        "num_experts",
        "top_k",
        "r",
        "alpha",
        "dropout",
        "expert_rank",
        "expert_lora_alpha",
        "expert_lora_dropout",
        "router_aux_loss_coef",
        "router_init_range",
        "jitter_noise",
        "target_modules",
        "ffn_projections",
    ):
        assert getattr(loaded, key) == getattr(config, key), key

    factors = read_mixlora_factors(out)
    layer = lv.adapter_layers(model)["model.layers.0.mlp"]
    B, A = factors["model.layers.0.mlp.gate_proj.experts.3"]
    assert_close(B @ A, torch.matmul(*layer.expert_factors()["gate_proj"][3]))
    att = lv.adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    B, A = factors["model.layers.0.self_attn.q_proj"]
    assert_close(B @ A, att.delta_weight())
    assert len(factors) == 2 * (4 + 4 * 3)


def test_native_round_trip(tokens, tmp_path):
    model = make_tiny_llama()
    lv.attach(model, MixLoRAConfig(num_experts=3, top_k=2))
    _randomise(model)
    expected = model(tokens).logits
    lv.save_adapter(model, tmp_path / "nat", format="native")
    fresh = make_tiny_llama()
    lv.load_adapter(fresh, tmp_path / "nat")
    assert_close(fresh(tokens).logits, expected, atol=1e-6, rtol=1e-6)
    from loravariants.io import read_factors

    factors = read_factors(tmp_path / "nat")
    layer = lv.adapter_layers(model)["model.layers.1.mlp"]
    assert_close(
        torch.matmul(*factors["model.layers.1.mlp.up_proj.experts.2"]),
        torch.matmul(*layer.expert_factors()["up_proj"][2]),
    )


def test_zero_dropout_warns_and_loader_dropout_is_explicit(tmp_path):
    model = make_tiny_llama()
    lv.attach(model, MixLoRAConfig(num_experts=2, top_k=1, dropout=0.0))
    with pytest.warns(UserWarning, match="lora_dropout"):
        save_mixlora(model, tmp_path / "a")
    assert json.loads((tmp_path / "a/adapter_config.json").read_text())["lora_dropout"] == 0.0
    save_mixlora(model, tmp_path / "b", loader_dropout=0.05)
    meta = json.loads((tmp_path / "b/adapter_config.json").read_text())
    assert meta["lora_dropout"] == 0.05 and meta["expert_lora"]["lora_dropout"] == 0.05


def test_corrupt_or_mismatched_files_name_the_file(tmp_path):
    model = make_tiny_llama()
    lv.attach(model, MixLoRAConfig(num_experts=2, top_k=1))
    out = save_mixlora(model, tmp_path / "mix")
    (out / "adapter_model.bin").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="adapter_model.bin"):
        load_mixlora(make_tiny_llama(), out)
    # a pickle holding more than tensors is refused, not executed
    torch.save({"x": torch.zeros(1), "y": {1, 2}}, out / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin"):
        load_mixlora(make_tiny_llama(), out)
    # weights from a model with other shapes
    other = make_tiny_llama(hidden_size=48)
    lv.attach(other, MixLoRAConfig(num_experts=2, top_k=1))
    save_mixlora(other, tmp_path / "other")
    with pytest.raises(ValueError, match="adapter_model.bin"):
        load_mixlora(make_tiny_llama(), tmp_path / "other")
    meta = json.loads((tmp_path / "other/adapter_config.json").read_text())
    meta["routing_strategy"] = "mixlora-switch"
    (tmp_path / "other/adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_mixlora(make_tiny_llama(), tmp_path / "other")


class _GPT2StyleMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc, self.c_proj, self.act = nn.Linear(8, 16), nn.Linear(16, 8), nn.GELU()


class _Phi3StyleMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = nn.Linear(8, 32), nn.Linear(16, 8)
        self.activation_fn = nn.SiLU()


class _NoActMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(8, 16), nn.Linear(8, 16)
        self.down_proj = nn.Linear(16, 8)


class _Block(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.q_proj, self.mlp = nn.Linear(8, 8), mlp


@pytest.mark.parametrize(
    "mlp, message",
    [
        (_GPT2StyleMLP(), "no feed-forward block"),
        (_Phi3StyleMLP(), "gate_up_proj"),
        (_NoActMLP(), "act_fn"),
    ],
)
def test_unknown_ffn_raises(mlp, message):
    with pytest.raises(ValueError, match=message):
        lv.attach(_Block(mlp), MixLoRAConfig(target_modules=["q_proj"]))


def test_ffn_projection_wrapped_by_other_adapter_raises():
    from loravariants.adapters.lora import LoRAConfig

    model = make_tiny_llama()
    lv.attach(model, LoRAConfig(target_modules=["gate_proj"]), name="lora")
    with pytest.raises(ValueError, match="already wrapped"):
        lv.attach(model, MixLoRAConfig(), name="mix")


def test_defaults_follow_expert_settings():
    config = MixLoRAConfig(r=4, alpha=8.0, dropout=0.1)
    assert (config.expert_rank, config.expert_lora_alpha, config.expert_lora_dropout) == (
        4,
        8.0,
        0.1,
    )
    assert MixLoRAConfig.from_dict(config.to_dict()) == config


def test_route_rows_with_another_adapter(tokens):
    """MixLoRA on rows 0, a MultiLoRA adapter on row 1: each row equals its adapter alone."""
    from loravariants.adapters.multilora import MultiLoRAConfig

    model = make_tiny_llama()
    lv.attach(model, MixLoRAConfig(num_experts=4, top_k=2), name="mix")
    lv.attach(model, MultiLoRAConfig(num_branches=2, r=2, target_modules=["q_proj"]), name="multi")
    _randomise(model)
    with torch.no_grad():
        for layer in lv.adapter_layers(model, "multi").values():
            layer.scales.normal_()
    with lv.route_rows({"mix": slice(0, 1), "multi": slice(1, 2)}):
        fused = model(tokens).logits
    lv.set_active_adapters(model, ["mix"])
    assert_close(fused[:1], model(tokens[:1]).logits, atol=1e-5, rtol=1e-5)
    lv.set_active_adapters(model, ["multi"])
    assert_close(fused[1:], model(tokens[1:]).logits, atol=1e-5, rtol=1e-5)


def test_lora_inside_a_mixlora_ffn_is_refused():
    """The FFN's projections are inside MixLoRA's host: in either attach order, a clear error."""
    from loravariants.adapters.lora import LoRAConfig

    model = make_tiny_llama()
    lv.attach(model, MixLoRAConfig(num_experts=2, top_k=1), name="mix")
    with pytest.raises(ValueError, match="inside a module another adapter already wraps"):
        lv.attach(model, LoRAConfig(target_modules=["q_proj", "down_proj"]), name="lora")
    assert lv.adapter_names(model) == ["mix"]
    lv.attach(model, LoRAConfig(target_modules=["q_proj"]), name="lora")  # attention is fine


def test_no_stale_balance_loss_when_mixlora_did_not_run(tokens):
    from loravariants.adapters.lora import LoRAConfig

    model = make_tiny_llama().train()
    lv.attach(model, MixLoRAConfig(num_experts=4, top_k=2), name="mix")
    lv.attach(model, LoRAConfig(target_modules=["q_proj"]), name="lora")
    model(tokens)
    assert lv.aux_loss(model).grad_fn is not None
    lv.set_active_adapters(model, ["lora"])
    loss = model(tokens, labels=tokens).loss + lv.aux_loss(model)
    assert float(lv.aux_loss(model)) == 0.0
    loss.backward()  # no "backward through the graph a second time"
    lv.set_active_adapters(model, None)
    with lv.route_rows({"lora": slice(0, 2)}):
        model(tokens)
    assert float(lv.aux_loss(model)) == 0.0


def test_ffn_only_mixlora_without_attention_lora(tokens, tmp_path):
    model = make_tiny_llama()
    lv.attach(model, MixLoRAConfig(num_experts=2, top_k=1, target_modules=[]))
    assert all(isinstance(layer, MixLoRAFFN) for layer in lv.adapter_layers(model).values())
    _randomise(model)
    ref = model(tokens).logits
    save_mixlora(model, tmp_path / "m")
    fresh = load_mixlora(make_tiny_llama(), tmp_path / "m")
    assert lv.adapter_config(fresh).target_modules == []
    assert_close(fresh(tokens).logits, ref, rtol=0, atol=0)
    meta = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert meta["loravariants_version"] == lv.__version__


def test_mixlora_load_into_merged_adapter_and_failed_load(tokens, tmp_path):
    model = make_tiny_llama()
    lv.attach(model, MixLoRAConfig(num_experts=2, top_k=1))
    _randomise(model)
    ref = model(tokens).logits
    save_mixlora(model, tmp_path / "m")
    target = make_tiny_llama()
    lv.attach(target, MixLoRAConfig(num_experts=2, top_k=1))
    _randomise(target, seed=5)
    lv.merge(target, skip_unmergeable=True)  # the attention LoRA is merged
    load_mixlora(target, tmp_path / "m")
    assert_close(target(tokens).logits, ref, rtol=1e-5, atol=1e-5)
    lv.unmerge(target)
    assert_close(target(tokens).logits, ref, rtol=1e-5, atol=1e-5)
    # a 3-layer model: layer 2 has no tensors in the file; nothing may stay changed
    deeper = make_tiny_llama(num_hidden_layers=3)
    before = {k: v.clone() for k, v in deeper.state_dict().items()}
    with pytest.raises(ValueError, match="missing tensor"):
        load_mixlora(deeper, tmp_path / "m")
    assert lv.adapter_names(deeper) == []
    assert all(torch.equal(deeper.state_dict()[k], v) for k, v in before.items())


def _router_inputs(model):
    """Each MixLoRA host's input of the next forwards, by module path."""
    seen: dict[str, list[torch.Tensor]] = {}
    for path, layer in lv.adapter_layers(model).items():
        if isinstance(layer, MixLoRAFFN):
            seen[path] = []
            model.get_submodule(path).register_forward_hook(
                lambda m, a, o, path=path: seen[path].append(a[0].detach())
            )
    return seen


def test_the_models_attention_mask_reaches_the_layers(tokens):
    """attach installs a hook: keyword or positional attention_mask, restored after the call."""
    model = make_tiny_llama()
    lv.attach(model, MixLoRAConfig(num_experts=4, top_k=2))
    _randomise(model)
    moe = [lay for lay in lv.adapter_layers(model).values() if isinstance(lay, MixLoRAFFN)]
    mask = torch.ones_like(tokens)
    mask[1, 10:] = 0
    model(tokens, attention_mask=mask)
    assert [lay.router_stats()["num_tokens"] for lay in moe] == [26, 26]
    keyword = lv.aux_loss(model)
    model(tokens, mask)  # positional, as LlamaForCausalLM.forward(input_ids, attention_mask)
    assert_close(lv.aux_loss(model), keyword, rtol=0, atol=0)
    model(tokens)  # no mask: nothing left over from the previous call
    assert [lay.router_stats()["num_tokens"] for lay in moe] == [32, 32]
    assert lv.aux_loss(model).item() != pytest.approx(keyword.item(), rel=1e-4)
    model(tokens, attention_mask=torch.ones_like(tokens))
    assert_close(lv.aux_loss(model), lv.aux_loss(model))
    with token_mask(mask):  # by hand, for a call without attention_mask
        model(inputs_embeds=model.get_input_embeddings()(tokens))
    assert_close(lv.aux_loss(model), keyword, rtol=1e-6, atol=0)
    # an error inside the forward still restores the previous mask
    with pytest.raises(Exception):  # noqa: B017 (whatever the model raises)
        model(tokens, attention_mask=mask, position_ids="not a tensor")
    model(tokens)
    assert moe[0].router_stats()["num_tokens"] == 32
    # the hooks are picklable (a model with MixLoRA can still be torch.save'd whole), and a copy
    # records its own masks
    copy = pickle.loads(pickle.dumps(model))
    copy(tokens, attention_mask=mask)
    assert_close(lv.aux_loss(copy), keyword, rtol=1e-6, atol=0)


def test_padding_mask_with_kv_cache_generation_and_checkpointing(tokens):
    model = make_tiny_llama()
    lv.attach(model, MixLoRAConfig(num_experts=4, top_k=2, dropout=0.0))
    _randomise(model)
    mask = torch.ones_like(tokens)
    mask[0, :5] = 0  # left padding, as for generation
    out = model.generate(
        tokens, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0
    )
    assert out.shape == (2, 19)  # the last step saw a (2, 18) mask and one new token per row
    layer = next(x for x in lv.adapter_layers(model).values() if isinstance(x, MixLoRAFFN))
    assert layer.router_stats()["num_tokens"] == 2
    # gradient checkpointing recomputes the FFNs outside the model's forward (no mask then):
    # the same graph must come out, and the loss is the masked one
    model.train()
    expected = model(tokens, attention_mask=mask, labels=tokens)
    aux = lv.aux_loss(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = model(tokens, attention_mask=mask, labels=tokens)
    assert_close(lv.aux_loss(model), aux, rtol=1e-6, atol=0)
    (got.loss + lv.aux_loss(model)).backward()
    assert_close(got.logits, expected.logits)


@pytest.mark.parametrize(
    "targets, explicit",
    [
        (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ALL_PROJ),
        (["q_proj", "v_proj", "down_proj", "gate_proj"], ["gate_proj", "down_proj"]),
        (["up_proj"], ["up_proj"]),
    ],
)
def test_target_modules_with_ffn_names_are_the_expert_projections(tokens, targets, explicit):
    """MixLoRA / MoE-PEFT style target_modules builds the same model as ffn_projections."""
    attention = [t for t in targets if t not in ALL_PROJ]
    config = MixLoRAConfig(num_experts=3, top_k=2, target_modules=targets)
    same = MixLoRAConfig(num_experts=3, top_k=2, target_modules=attention, ffn_projections=explicit)
    assert config == same
    assert config.target_modules == attention and config.ffn_projections == explicit
    models = []
    for c in (config, same):
        model = make_tiny_llama()
        torch.manual_seed(11)
        lv.attach(model, c)
        _randomise(model)
        models.append(model)
    a, b = (m.state_dict() for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_close(models[0](tokens).logits, models[1](tokens).logits, rtol=0, atol=0)
    layer = lv.adapter_layers(models[0])["model.layers.0.mlp"]
    assert set(layer.projections) == set(explicit)
    kinds = {p.rsplit(".", 1)[-1] for p in lv.adapter_layers(models[0])}
    assert kinds == {*attention, "mlp"}  # no LoRALinear on an FFN projection
    assert MixLoRAConfig.from_dict(config.to_dict()) == config
    # without FFN names the experts cover all three projections, as before
    assert MixLoRAConfig(target_modules=["q_proj"]).ffn_projections == ALL_PROJ


def test_export_types_and_base_model_name(tmp_path):
    model = make_tiny_llama()
    lv.attach(model, MixLoRAConfig(num_experts=2, top_k=1, router_aux_loss_coef=0))
    with pytest.warns(UserWarning, match="base_model_name_or_path"):
        out = lv.save_adapter(model, tmp_path / "a", format="mixlora")
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] is None
    assert type(meta["lora_alpha"]) is int and meta["lora_alpha"] == 16
    assert type(meta["expert_lora"]["lora_alpha"]) is int and type(meta["r"]) is int
    for key in ("lora_dropout", "router_aux_loss_coef", "router_init_range", "jitter_noise"):
        assert type(meta[key]) is float, key
    assert meta["balance_loss_aggregation"] == "global"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lv.save_adapter(model, tmp_path / "b", format="mixlora", base_model_name_or_path="org/m")
        assert (
            json.loads((tmp_path / "b/adapter_config.json").read_text())["base_model_name_or_path"]
            == "org/m"
        )
        model.config._name_or_path = "local/llama-dir"  # what from_pretrained sets
        lv.save_adapter(model, tmp_path / "c", format="mixlora")
        assert (
            json.loads((tmp_path / "c/adapter_config.json").read_text())["base_model_name_or_path"]
            == "local/llama-dir"
        )
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        save_mixlora(model, tmp_path / "d", base_model_name_or_path="")
    # a non-integral alpha is written as is, with a warning: the reference loaders refuse it
    other = make_tiny_llama()
    lv.attach(other, MixLoRAConfig(num_experts=2, top_k=1, alpha=12.5))
    with pytest.warns(UserWarning, match="int lora_alpha"):
        save_mixlora(other, tmp_path / "e", base_model_name_or_path="org/m")
    assert json.loads((tmp_path / "e/adapter_config.json").read_text())["lora_alpha"] == 12.5
    # per_layer round-trips through the file (our own key)
    third = make_tiny_llama()
    lv.attach(third, MixLoRAConfig(num_experts=2, top_k=1, balance_loss_aggregation="per_layer"))
    save_mixlora(third, tmp_path / "f", base_model_name_or_path="org/m")
    loaded = load_mixlora(make_tiny_llama(), tmp_path / "f")
    assert lv.adapter_config(loaded).balance_loss_aggregation == "per_layer"


def _per_expert_reference(layer: MixLoRAFFN, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The straightforward sparse MixLoRA: a Python loop over the experts, each on the tokens
    routed to it, full expert outputs ``W_down a_e + s B A a_e`` weighted and summed."""
    xt = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(xt.float() @ layer.router.float().T, dim=-1)
    top_w, top_i = probs.topk(layer.top_k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    out = torch.zeros(xt.shape, dtype=torch.float32)
    for e, expert in enumerate(layer.experts):
        tok, slot = torch.where(top_i == e)
        if tok.numel() == 0:
            continue
        h = xt[tok]

        def lora(proj, h, expert=expert):
            if proj not in layer.projections:
                return 0
            A, B = expert.lora_A[proj], expert.lora_B[proj]
            return (layer.scaling * h.float() @ A.float().T @ B.float().T).to(h.dtype)

        a = mlp.act_fn(mlp.gate_proj(h) + lora("gate_proj", h))
        a = a * (mlp.up_proj(h) + lora("up_proj", h))
        y = mlp.down_proj(a) + lora("down_proj", a)
        out.index_add_(0, tok, top_w[tok, slot, None] * y.float())
    return out.to(x.dtype).reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("projections", [ALL_PROJ, ["down_proj"], ["up_proj", "down_proj"]])
def test_dispatch_equals_per_expert_loop(monkeypatch, dtype, top_k, projections):
    """The stacked dispatch (masked matmuls, in blocks, recomputed in the backward)
    against a per-expert loop: forward and every gradient, with two experts that get no token
    and blocks smaller than the batch."""
    import loravariants.adapters.mixlora as mixlora

    monkeypatch.setitem(mixlora._BLOCK_ELEMENTS, "cpu", 7 * top_k * 64)  # blocks of 7 tokens
    layer, mlp = _layer(
        num_experts=6, top_k=top_k, ffn_projections=projections, dropout=0.0, seed=4
    )
    with torch.no_grad():  # positive inputs: experts 0-3 score > 0, experts 4, 5 < 0, never chosen
        layer.router[:4].abs_()
        layer.router[4:] = -layer.router[4:].abs() - 0.1
    layer.to(dtype).train()
    mlp.to(dtype)
    x = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(5)).abs().to(dtype)
    x.requires_grad_()
    fast, slow = layer(x), _per_expert_reference(layer, mlp, x) + 0 * x
    assert layer.router_stats()["tokens_per_expert"][4:].tolist() == [0, 0]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert_close(fast, slow, **tol)
    params = [x] + list(layer.parameters())
    g = torch.randn(fast.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    grads_fast = torch.autograd.grad((fast.float() * g.float()).sum(), params, allow_unused=True)
    grads_slow = torch.autograd.grad((slow.float() * g.float()).sum(), params, allow_unused=True)
    pairs = [
        (torch.zeros_like(p) if a is None else a, torch.zeros_like(p) if b is None else b)
        for p, a, b in zip(params, grads_fast, grads_slow, strict=True)
    ]  # an unrouted expert: zero (or no) gradient
    largest = max(float(b.abs().max()) for _, b in pairs)
    for a, b in pairs:  # sums in another order: relative to the largest gradient entry
        if dtype == torch.float32:
            assert_close(a, b, atol=1e-5 * largest, rtol=1e-4)
        else:
            assert_close(a.float(), b.float(), atol=3e-2 * largest, rtol=3e-2)
    # the unrouted experts got no signal at all
    for e in (4, 5):
        for proj in layer.projections:
            grad = layer.experts[e].lora_B[proj].grad
            assert grad is None or not grad.any()


def test_dispatch_dropout_masks_are_recomputed_in_the_backward():
    """With expert dropout, the backward recomputes each block with the forward's masks: the
    gradients equal those of a double-precision finite difference of the same masked function
    (router at zero: a constant routing, since the router runs in float32)."""
    import loravariants.adapters.mixlora as mixlora

    layer, mlp = _layer(num_experts=4, top_k=2, dropout=0.3)
    layer.double().train()
    mlp.double()
    with torch.no_grad():
        layer.router.zero_()
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(9)
    a = layer(x)
    torch.manual_seed(9)
    b = layer(x)
    assert torch.equal(a, b)  # one seed, the same masks
    torch.manual_seed(10)
    assert not torch.equal(a, layer(x))  # another seed, other masks
    old = mixlora._BLOCK_ELEMENTS.get("cpu")
    try:
        mixlora._BLOCK_ELEMENTS["cpu"] = 3 * 2 * 64  # several blocks, each with its own masks

        def f(x):
            torch.manual_seed(9)
            return layer(x)

        assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, fast_mode=True)
    finally:
        mixlora._BLOCK_ELEMENTS["cpu"] = old


@pytest.mark.parametrize("act", [nn.SiLU(), nn.ReLU(), nn.GELU(approximate="tanh")])
def test_no_grad_forward_equals_per_expert_loop(monkeypatch, act):
    """The no-grad forward works in place (the frozen ``a0``, the activation, the kept scratch
    buffers reused by every block and every call, whatever their size and dtype): its output
    is the per-expert loop's, and the frozen projections it read are left as they were."""
    import loravariants.adapters.mixlora as mixlora

    monkeypatch.setitem(mixlora._BLOCK_ELEMENTS, "cpu", 5 * 2 * 64)  # blocks of 5 tokens
    layer, mlp = _layer(num_experts=4, top_k=2, dropout=0.0, seed=7)
    mlp.act_fn = act
    layer.eval()
    g = torch.Generator().manual_seed(8)
    for dtype, tokens in ((torch.float32, 23), (torch.bfloat16, 11), (torch.float32, 4)):
        layer.to(dtype), mlp.to(dtype)
        x = torch.randn(tokens, 32, generator=g).to(dtype)
        with torch.no_grad():
            out, ctx = MixLoRAFFN.base_forward(mlp, x)
            kept = [t.clone() for t in ctx]
            fast = out + layer.update(x, ctx)
            slow = _per_expert_reference(layer, mlp, x)
            assert_close(ctx[2], act(ctx[0]) * ctx[1], atol=0, rtol=0)  # a0 = act(G) * U
        for before, after in zip(kept, ctx, strict=True):
            assert torch.equal(before, after)  # G, U, a0, mask untouched by the update
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        assert_close(fast, slow, atol=tol, rtol=tol)
        assert (fast - out).abs().max() > 10 * tol  # the experts changed the output
