"""One battery over every registered variant (the four built-in ones and the toy fifth one of
tests/toy_variant.py): identity at init, merge/unmerge, every save format it declares, the
spec-YAML round trip, bad config values named, ``factors()`` = ``delta_weight()``.

Then the toy variant end to end (attach, train, compare with match_params, save/load,
analyze): the variant contract is all a new variant needs; no package file names it.
"""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from _train_script import random_blocks
from conftest import make_tiny_llama
from test_compare import _experiment, _tiny_env
from torch.testing import assert_close
from toy_variant import SPEC_DIR, GatedLoRAConfig

import loravariants as lv
from loravariants.adapters import VARIANTS, AdapterConfig, register_variant
from loravariants.adapters.base import variant_class
from loravariants.analysis import analyze
from loravariants.compare import compare
from loravariants.config import load_adapter_spec
from loravariants.train import TrainConfig, train

NAMES = sorted(VARIANTS)  # the toy one included: importing toy_variant registered it
FORMAT_CASES = [(v, fmt) for v in NAMES for fmt in VARIANTS[v].formats]


def _spec(variant: str, **overrides) -> AdapterConfig:
    """The variant's spec file (adapters/<v>.yaml, or tests/specs/toy.yaml), small sizes."""
    sizes = {"num_experts": 3} if variant == "mixlora" else {}
    return load_adapter_spec(f"{variant}.yaml", {**sizes, **overrides}, str(SPEC_DIR))


def _perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """A non-zero update everywhere (every variant starts at, or near, the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, layer in lv.iter_adapters(model):
            for p in layer.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _attached(variant: str, perturb: bool = True):
    model = lv.attach(make_tiny_llama(), _spec(variant)).eval()
    if perturb:
        _perturb(model)
    return model


def test_the_toy_variant_is_registered_and_names_fail_loudly():
    assert VARIANTS["toy"] is GatedLoRAConfig and {"lora", "cola", "multilora", "mixlora"} <= set(
        NAMES
    )
    with pytest.raises(ValueError, match=r"variant must be one of \[.*'toy'.*\], got 'dora'"):
        variant_class("dora")

    class Nameless(AdapterConfig):
        pass

    with pytest.raises(TypeError, match="must set the class attribute `variant`"):
        register_variant(Nameless)

    class Impostor(AdapterConfig):
        variant = "lora"

    with pytest.raises(TypeError, match="'lora' is already registered by .*lora.LoRAConfig"):
        register_variant(Impostor)
    assert VARIANTS["lora"].__name__ == "LoRAConfig"

    # the toy's class name from another module (a snippet, a copy): refused too
    namesake = type("GatedLoRAConfig", (AdapterConfig,), {"variant": "toy"})
    with pytest.raises(TypeError, match="'toy' is already registered by toy_variant"):
        register_variant(namesake)
    assert VARIANTS["toy"].__module__ == "toy_variant"


@pytest.mark.parametrize("variant", NAMES)
def test_identity_at_init(variant, tokens):
    want = make_tiny_llama().eval()(tokens).logits
    got = _attached(variant, perturb=False)(tokens).logits
    assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", NAMES)
def test_merge_unmerge_round_trip(variant, tokens):
    model = _attached(variant)
    want = model(tokens).logits
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    assert any(layer.mergeable for layer in lv.adapter_layers(model).values())
    lv.merge(model, skip_unmergeable=True)  # MixLoRA: its attention LoRA only
    assert_close(model(tokens).logits, want, atol=1e-5, rtol=1e-5)
    lv.merge(model, skip_unmergeable=True)  # idempotent
    lv.unmerge(model)
    for key, value in frozen.items():
        assert_close(model.state_dict()[key], value, atol=1e-6, rtol=0)
    # unmerge subtracts dW again (as peft does), so W is back only to rounding; logits sum over
    # the hidden size, and on some CPUs' kernels that rounding reaches 1.7e-6: the same 1e-5 as
    # the merged check above
    assert_close(model(tokens).logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant, fmt", FORMAT_CASES)
def test_every_declared_format_round_trips(variant, fmt, tokens, tmp_path):
    model = _attached(variant)
    want = model(tokens).logits
    lv.save_adapter(model, tmp_path / fmt, format=fmt)
    fresh = lv.load_adapter(make_tiny_llama(), tmp_path / fmt).eval()
    assert_close(fresh(tokens).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", NAMES)
def test_undeclared_formats_are_refused(variant, tmp_path):
    model = _attached(variant, perturb=False)
    for fmt in sorted({"native", "peft", "mixlora"} - set(VARIANTS[variant].formats)):
        with pytest.raises(ValueError, match=f"format '{fmt}' cannot hold a {variant} adapter"):
            lv.save_adapter(model, tmp_path / fmt, format=fmt)
        assert not (tmp_path / fmt).exists()


@pytest.mark.parametrize("variant", NAMES)
def test_spec_yaml_round_trip(variant, tmp_path):
    config = _spec(variant)
    assert AdapterConfig.from_dict(config.to_dict()) == config
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(config.to_dict()))
    assert load_adapter_spec(str(tmp_path / "again.yaml")) == config
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank_typo'\]"):
        AdapterConfig.from_dict({**config.to_dict(), "rank_typo": 3})


# what each variant must refuse, and the field its message names (besides the generic cases)
BAD_VALUES = {
    "lora": [
        ({"r": 2.5}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"init": "xavier"}, "init"),
        ({"target_modules": "("}, "target_modules"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ],
    "cola": [
        ({"knots": [3, 2]}, "knots"),
        ({"knots": [0]}, "knots[0]"),
        ({"chain_length": 0, "total_steps": 5}, "chain_length"),
        ({"chain_length": 2}, "total_steps"),
        ({"chain_length": 3, "total_steps": 2}, "total_steps"),
        ({"knots": [2], "chain_length": 2, "total_steps": 4}, "chain_length"),
        ({"knots": [5], "total_steps": 5}, "knots"),
        ({"link_ranks": [4, 2]}, "link_ranks[0]"),
        ({"r": 8, "link_ranks": [8, 0]}, "link_ranks[1]"),
        ({"r": 8, "link_ranks": [8, 4, 2], "knots": [3]}, "link_ranks"),
        ({"reset_optimizer": "yes"}, "reset_optimizer"),
        ({"restart_lr_schedule": 1}, "restart_lr_schedule"),
    ],
    "multilora": [
        ({"num_branches": 0}, "num_branches"),
        ({"num_branches": 2.5}, "num_branches"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"scale_shape": "row"}, "scale_shape"),
        ({"init": "zeros"}, "init"),
    ],
    "mixlora": [
        ({"num_experts": 0}, "num_experts"),
        ({"top_k": 3, "num_experts": 2}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"alpha": -1.0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"expert_alpha": 0.0}, "expert_alpha"),
        ({"expert_dropout": -0.1}, "expert_dropout"),
        ({"router_aux_loss_coef": -0.01}, "router_aux_loss_coef"),
        ({"router_init_range": 0.0}, "router_init_range"),
        ({"jitter_noise": 1.0}, "jitter_noise"),
        ({"ffn_projections": ["fc1"]}, "ffn_projections"),
        ({"ffn_projections": []}, "ffn_projections"),
        ({"target_modules": ["q_proj", "down_proj"], "ffn_projections": ["up_proj"]}, "target"),
        ({"target_modules": ["q_proj", "gate_up_proj"]}, "target_modules"),
        ({"balance_loss_aggregation": "mean"}, "balance_loss_aggregation"),
    ],
    "toy": [({"alpha": 0}, "alpha"), ({"gate_init": -1.0}, "gate_init")],
}


def _generic_bad_values(variant: str) -> list[tuple[dict, str]]:
    """Every variant: each rank field at 0, and target_modules that is no list or regex."""
    cls = VARIANTS[variant]
    cases = [({field: 0}, field) for field in cls.rank_fields]
    cases.append(({"target_modules": 5}, "target_modules"))
    if not cls.empty_targets_ok:
        cases.append(({"target_modules": []}, "target_modules"))
    return cases


BAD_CASES = [
    (variant, fields, named)
    for variant in NAMES
    for fields, named in _generic_bad_values(variant) + BAD_VALUES[variant]
]


def test_every_registered_variant_has_bad_value_cases():
    assert sorted(BAD_VALUES) == NAMES


@pytest.mark.parametrize("variant, fields, named", BAD_CASES)
def test_bad_config_values_name_the_field(variant, fields, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        VARIANTS[variant](**fields)


@pytest.mark.parametrize("variant", NAMES)
def test_a_bad_spec_value_names_the_file_and_the_field(variant):
    fields, named = _generic_bad_values(variant)[0]
    with pytest.raises(ValueError, match=rf"{variant}\.yaml: .*{re.escape(named)}"):
        _spec(variant, **fields)


@pytest.mark.parametrize("variant", NAMES)
def test_factors_agree_with_delta_weight(variant):
    model = _attached(variant)
    for path, layer in lv.adapter_layers(model).items():
        named = layer.named_factors()
        assert named, path
        if layer.mergeable:
            B, A = layer.factors()
            assert B.shape == (layer.base.out_features, A.shape[0])
            assert A.shape[1] == layer.base.in_features
            assert_close(B @ A, layer.delta_weight(), atol=1e-6, rtol=1e-5)
            assert_close(named[""][0] @ named[""][1], layer.delta_weight())
        else:
            with pytest.raises(ValueError):
                layer.delta_weight()
            assert all(suffix and B.shape[1] == A.shape[0] for suffix, (B, A) in named.items())


# ---------------------------------------------------------------------------------------------
# the toy variant end to end
# ---------------------------------------------------------------------------------------------


def test_toy_variant_attach_train_save_load_analyze(tmp_path, tokens):
    model = lv.attach(make_tiny_llama(), _spec("toy"))
    gates = [layer.gate.item() for layer in lv.adapter_layers(model).values()]
    result = train(
        model,
        random_blocks(n=8, length=16),
        TrainConfig(max_steps=3, batch_size=2, lr=0.05, warmup_steps=0),
        progress=False,
    )
    assert len(result.losses) == 3 and all(map(torch.isfinite, torch.tensor(result.losses)))
    trained = [layer.gate.item() for layer in lv.adapter_layers(model).values()]
    assert trained != gates  # the gate trains with the rest
    model.eval()
    want = model(tokens).logits
    for fmt in ("native", "peft"):
        lv.save_adapter(model, tmp_path / fmt, format=fmt)
        assert_close(lv.load_adapter(make_tiny_llama(), tmp_path / fmt)(tokens).logits, want)
    from_model, from_dir = analyze(model).rows(), analyze(tmp_path / "native").rows()
    assert [r["variant"] for r in from_model] == ["toy"] * 4
    assert [r["variant"] for r in from_dir] == ["toy"] * 4
    for a, b in zip(from_model, from_dir, strict=True):
        assert a["module"] == b["module"]
        assert a["effective_rank"] == pytest.approx(b["effective_rank"], rel=1e-6)


def test_toy_variant_in_a_parameter_matched_comparison(tmp_path):
    config = _experiment(
        tmp_path,
        [
            {"name": "lora", "adapter": "lora", "overrides": {"r": 2}},
            {"name": "toy", "adapter": "toy.yaml"},
        ],
        seeds=[0],
        spec_dir=str(SPEC_DIR),
        match_params=896,  # LoRA at r=2 exactly
    )
    logs = []
    out = compare(config, progress=False, log=logs.append, env=_tiny_env())
    import json

    data = json.loads((out / "results.json").read_text())
    toy = next(r for r in data["runs"] if r["row"] == "toy")
    assert toy["status"] == "ok" and toy["variant"] == "toy"
    assert abs(toy["match_params"]["deviation"]) <= 0.10
    assert toy["adapter_config"]["r"] == 4  # 900 parameters: +0.4% from 896
    assert set(toy["toy_gate"]) == {p for p in toy["svd"]["effective_rank_by_layer"]}
    assert any(line.startswith("match_params: toy -> ") for line in logs)
    summary = {r["row"]: r for r in data["summary"]}
    assert summary["toy"]["rank"] == f"r={toy['adapter_config']['r']}"
    assert "| toy |" in (out / "report.md").read_text()
