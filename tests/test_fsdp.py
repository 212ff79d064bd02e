"""Issues 17 and 29: every variant under FSDP2 (``accelerate launch --config_file
configs/accelerate/fsdp.yaml``, gloo on CPU) equals one process at the same global batch:
losses, balance losses, router statistics, every model tensor (the sharded frozen base
gathered: COLA folds its links into it) and the adapter ``save_adapter`` writes on each
process. The frozen base's resident bytes per process halve from one process to two.

One launch trains every variant in turn (tests/_fsdp_script.py): an interpreter start-up and a
process group cost more than the tiny runs themselves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _train_script import DDP_VARIANTS
from conftest import make_tiny_llama, tiny_llama_config
from safetensors.torch import load_file
from test_distributed import ROOT, launch
from torch.testing import assert_close

import loravariants as lv
from loravariants.distributed import check_supported, memory_plan, supported_strategies

FSDP_CONFIG = str(ROOT / "configs" / "accelerate" / "fsdp.yaml")
SCRIPT = str(Path(__file__).parent / "_fsdp_script.py")

#: COLA knots at 2 and 4 (two links folded into the sharded base), its rank step-down (the
#: link resized in place), MultiLoRA's per-channel branch scales, MixLoRA with 8 experts so
#: that an expert gets tokens on one process only (checked below)
FAST = ["lora", "cola", "cola-step-down", "multilora-channel", "mixlora-sparse"]
SLOW = ["multilora", "mixlora", "mixlora-per-layer"]


def _check_fsdp_equals_one_process(variants: list[str], tmp_path: Path, steps: int = 5) -> None:
    import _fsdp_script

    # one process at batch 4, in this process (no second interpreter start-up) ...
    _fsdp_script.variants_main([str(tmp_path / "one"), "4", str(steps), *variants])
    # ... and two FSDP2 processes at batch 2 each: the same global batch, the same rows
    args = ["variants", str(tmp_path / "two"), "2", str(steps), *variants]
    proc = launch(FSDP_CONFIG, args, script=SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for variant in variants:
        _check_variant(tmp_path / "one" / variant, tmp_path / "two" / variant, variant)
    # the gradient average itself: a gradient on both processes, on rank 0 only, on rank 1
    # only (zero elsewhere: the mean is half of it), on neither (stays None)
    for rank in (0, 1):
        grads = json.loads((tmp_path / "two" / f"average-rank{rank}.json").read_text())
        assert grads == [[1.5] * 3, [2.0] * 3, [2.0] * 3, None]


def _check_variant(one: Path, two: Path, variant: str) -> None:
    a = json.loads((one / "result.json").read_text())
    b = json.loads((two / "result.json").read_text())
    # sharded for real: the frozen decoder-layer weights were DTensors, the adapters whole
    assert a["sharded"] == []
    assert any(".layers.0.self_attn.q_proj.base_layer" in n for n in b["sharded"]), variant
    assert not set(b["sharded"]) & set(b["trainable"])
    assert b["trainable"] == a["trainable"] != []
    assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), atol=1e-5, rtol=1e-5)
    assert_close(torch.tensor(b["aux"]), torch.tensor(a["aux"]), atol=1e-5, rtol=1e-5)
    assert b["router"] == a["router"], variant  # the global batch's routing
    ref = load_file(one / "state-rank0.safetensors")
    for rank in (0, 1):
        state = load_file(two / f"state-rank{rank}.safetensors")
        assert state.keys() == ref.keys()
        for key in ref:  # every tensor, the frozen (folded) weights included
            assert_close(state[key], ref[key], atol=1e-5, rtol=1e-4, msg=f"{variant} {key}")
        saved = load_file(two / f"adapter-rank{rank}" / "adapter_model.safetensors")
        want = load_file(one / "adapter-rank0" / "adapter_model.safetensors")
        assert saved.keys() == want.keys() and saved
        for key in want:
            assert_close(saved[key], want[key], atol=1e-5, rtol=1e-4, msg=f"{variant} {key}")
    # the frozen base per process: half of one process's bytes (every unit is sharded)
    full = json.loads((one / "rank0.json").read_text())["frozen_bytes"]
    plan = memory_plan(tiny_llama_config(), DDP_VARIANTS[variant](), 16, world=2, weight_bytes=4)
    for rank in (0, 1):
        measured = json.loads((two / f"rank{rank}.json").read_text())["frozen_bytes"]
        assert measured == full // 2 == plan.base_shard, (variant, measured, full)
    fresh = make_tiny_llama().state_dict()
    q = "model.layers.0.self_attn.q_proj.base_layer.weight"
    if variant.startswith("cola"):
        # the links were folded into the (sharded) base: it moved, the same way in both runs
        assert not torch.equal(ref[q], fresh["model.layers.0.self_attn.q_proj.weight"])
        index = next(k for k in ref if k.endswith("q_proj.adapters.default.link_index"))
        assert int(ref[index]) == (1 if variant == "cola-step-down" else 2)
    if variant == "cola-step-down":  # the link after the knot has rank 1
        a_key = next(k for k in ref if k.endswith("q_proj.adapters.default.lora_A"))
        assert ref[a_key].shape[0] == 1
    if variant == "mixlora-sparse":
        # some step had an expert that one process's tokens reached and the other's did not
        # (its gradient there is the dispatch's zero): the run still equals one process
        m0 = json.loads((two / "rank0.json").read_text())["unreached_experts"]
        m1 = json.loads((two / "rank1.json").read_text())["unreached_experts"]
        assert m0 and len(m0) == len(m1)
        assert any(set(x) != set(y) for x, y in zip(m0, m1, strict=True))
    if variant.startswith("multilora"):  # the branch scales trained (they start at 0)
        scales = [k for k in ref if k.endswith(".scales")]
        assert scales and all(ref[k].abs().sum() > 0 for k in scales)


def test_every_variant_under_fsdp_equals_one_process(tmp_path):
    _check_fsdp_equals_one_process(FAST, tmp_path)


@pytest.mark.slow
def test_more_variant_configs_under_fsdp_equal_one_process(tmp_path):
    _check_fsdp_equals_one_process(SLOW, tmp_path)


def test_every_builtin_variant_supports_fsdp_and_cola_step_down_not_ddp():
    for variant in ("lora", "cola", "multilora", "mixlora", "cola-step-down"):
        model = lv.attach(make_tiny_llama(), DDP_VARIANTS[variant]())
        check_supported(model, "fsdp")
        want = ["single", "fsdp"] if variant == "cola-step-down" else ["single", "ddp", "fsdp"]
        assert supported_strategies(lv.adapter_config(model)) == want


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_to_the_same_final_weights(tmp_path):
    """COLA (knots at 2 and 4): rank 0 killed at the end of step 3, the launch resumed from
    step 2's checkpoint: the resumed chain is folded again into the sharded base. The adapter
    the main process saves loads in one process and (peft format) in peft."""
    import _fsdp_script
    import peft

    # one process at batch 4, uninterrupted (in this process)
    _fsdp_script.resume_main([str(tmp_path / "one"), "cola", "4", "6", "0"])
    args = ["resume", str(tmp_path / "two"), "cola", "2", "6"]
    killed = launch(FSDP_CONFIG, [*args, "3"], script=SCRIPT)
    assert killed.returncode != 0
    assert not (tmp_path / "two" / "result.json").exists()
    resumed = launch(FSDP_CONFIG, [*args, "0"], script=SCRIPT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["resumed_from"] == 2 and one["resumed_from"] is None
    assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5)
    ref = load_file(tmp_path / "one" / "final-rank0.safetensors")
    for rank in (0, 1):
        state = load_file(tmp_path / "two" / f"final-rank{rank}.safetensors")
        assert state.keys() == ref.keys()
        for key in ref:
            assert_close(state[key], ref[key], atol=1e-5, rtol=1e-4, msg=key)
    # the saved adapter, in one process: the same model (its chain folded into a fresh base)
    fresh = lv.load_adapter(make_tiny_llama(), tmp_path / "two" / "adapter")
    loaded = fresh.state_dict()
    for key in ref:
        assert_close(loaded[key], ref[key], atol=1e-5, rtol=1e-4, msg=key)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "two" / "adapter-peft")
    with torch.no_grad():
        want = fresh.eval()(tokens).logits
        assert_close(theirs.eval()(input_ids=tokens).logits, want, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_s2attn_with_gradient_checkpointing_under_fsdp_equals_one_process(tmp_path):
    """LongLoRA's memory recipe together: S2-Attn (32-token rows, groups of 8), gradient
    checkpointing (the frozen layers recomputed, all-gathered again in backward) and FSDP2."""
    import _fsdp_script

    _fsdp_script.long_main([str(tmp_path / "one"), "4", "2"])
    proc = launch(FSDP_CONFIG, ["long", str(tmp_path / "two"), "2", "2"], script=SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "result.json").read_text())["losses"]
    two = json.loads((tmp_path / "two" / "result.json").read_text())["losses"]
    assert len(two) == 2 and all(math.isfinite(x) for x in two)
    assert_close(torch.tensor(two), torch.tensor(one), atol=1e-5, rtol=1e-5)
    ref = load_file(tmp_path / "one" / "state-rank0.safetensors")
    for rank in (0, 1):
        state = load_file(tmp_path / "two" / f"state-rank{rank}.safetensors")
        for key in ref:
            assert_close(state[key], ref[key], atol=1e-5, rtol=1e-4, msg=key)
    assert any(ref[k].abs().sum() > 0 for k in ref if k.endswith("lora_B"))  # it trained


def _saved_activation_bytes(model, ids) -> int:
    """Bytes autograd saves for backward in decoder layer 0 (its input, the weights and the
    rotary tables left out): what gradient checkpointing recomputes, layer by layer."""
    layer = model.model.layers[0]
    x = model.model.embed_tokens(ids).detach().requires_grad_(True)
    positions = torch.arange(ids.shape[1])[None]
    rope = model.model.rotary_emb(x, positions)
    skip = {t.untyped_storage().data_ptr() for t in [x, *model.parameters(), *rope]}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, position_embeddings=rope, attention_mask=None, position_ids=positions)
    return sum(saved.values())


@pytest.mark.parametrize("variant", ["lora", "mixlora"])
def test_memory_plan_matches_a_measured_tiny_case(variant):
    """memory_plan's terms against what a tiny fp32 Llama holds (one process; the 2-process
    base shard is checked against the FSDP launch above)."""
    from loravariants.adapters import LoRAConfig, MixLoRAConfig

    adapter = {
        "lora": LoRAConfig(r=2, dropout=0.0),
        "mixlora": MixLoRAConfig(num_experts=4, top_k=2, r=2, dropout=0.0),
    }[variant]
    b, n = 2, 64
    plan = memory_plan(
        tiny_llama_config(),
        adapter,
        n,
        batch_size=b,
        world=1,
        trainable=("norm",),
        weight_bytes=4,
        activation_bytes=4,
        s2_attn=False,
    )
    model = lv.attach(make_tiny_llama(), adapter)
    lv.mark_trainable(
        model,
        [
            "model.norm",
            *[f"model.layers.{i}.input_layernorm" for i in (0, 1)],
            *[f"model.layers.{i}.post_attention_layernorm" for i in (0, 1)],
        ],
    )
    model.train().config._attn_implementation = "sdpa"
    ids = torch.randint(0, 128, (b, n), generator=torch.Generator().manual_seed(0))
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert plan.base_shard == frozen
    # the trained parameters' weights, gradients and AdamW moments, after one step
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params)
    inputs: list[int] = []
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, args, kwargs: inputs.append(
                (args[0] if args else kwargs["hidden_states"]).nbytes
            ),
            with_kwargs=True,
        )
        for layer in model.model.layers
    ]
    output = model(input_ids=ids, labels=ids)
    for hook in hooks:
        hook.remove()
    output.loss.backward()
    optimizer.step()
    state = sum(t.nbytes for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert plan.trainable == sum(p.nbytes + p.grad.nbytes for p in params) + state
    assert plan.checkpoints == sum(inputs)  # every decoder layer's input
    assert plan.logits == output.logits.numel() * 10
    measured = _saved_activation_bytes(model, ids)
    assert abs(plan.layer_work - measured) <= 0.1 * measured, (plan.layer_work, measured)
