"""Run by tests/test_fsdp.py: several tiny FSDP2 runs in one launch (one interpreter start-up).

python tests/_fsdp_script.py variants OUT_DIR BATCH_SIZE STEPS VARIANT [VARIANT ...]
    train each VARIANT (``_train_script.DDP_VARIANTS`` and ``FSDP_VARIANTS`` below) in turn,
    alone or under a launcher, into OUT_DIR/VARIANT as ``_train_script.variant_main`` does
    (result.json, state-rank{R}.safetensors, adapter-rank{R}/), plus per rank
    OUT_DIR/VARIANT/rank{R}.json: the resident bytes of the frozen base on this process (each
    tensor's local shard) and, per optimizer step, which adapter tensors had no gradient on
    this process before the cross-process average and, per MixLoRA layer, which experts this
    process's tokens never reached in that step (from the router's choices). Then
    OUT_DIR/average-rank{R}.json: a
    direct check of that average on tensors with a gradient on one process only, or none.
python tests/_fsdp_script.py resume OUT_DIR VARIANT BATCH_SIZE STEPS KILL_AT
    train VARIANT with a checkpoint every step into OUT_DIR/train, resuming what is there;
    with KILL_AT > 0 rank 0 SIGKILLs itself at the end of optimizer step KILL_AT (before its
    checkpoint). Every rank writes OUT_DIR/final-rank{R}.safetensors; the main process
    OUT_DIR/adapter (lv.save_adapter), OUT_DIR/adapter-peft (the LoRA family) and
    OUT_DIR/result.json.
python tests/_fsdp_script.py long OUT_DIR BATCH_SIZE STEPS
    LoRA with S2-Attn and gradient checkpointing (2 steps in the test): OUT_DIR/result.json and
    state-rank{R}.safetensors.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _train_script import (  # noqa: E402
    DDP_VARIANTS,
    _is_dtensor,
    _save_state,
    random_blocks,
    variant_main,
)
from conftest import make_tiny_llama  # noqa: E402

import loravariants as lv  # noqa: E402
import loravariants.train as lv_train  # noqa: E402
from loravariants.adapters import (  # noqa: E402
    COLAConfig,
    LoRAConfig,
    MixLoRAConfig,
    MultiLoRAConfig,
)
from loravariants.adapters.mixlora import MixLoRAFFN  # noqa: E402
from loravariants.train import TrainConfig, train  # noqa: E402

FSDP_VARIANTS = {
    # COLA's rank step-down: the link's parameters are resized in place at the knot
    "cola-step-down": lambda: COLAConfig(r=2, dropout=0.0, knots=[2], link_ranks=[2, 1]),
    # eight experts, top-1, few tokens per process: some expert is reached by one process's
    # tokens only at some step (the test checks it happened)
    "mixlora-sparse": lambda: MixLoRAConfig(
        num_experts=8, top_k=1, r=2, dropout=0.0, router_aux_loss_coef=1.0
    ),
    # one learned scale per branch and output channel
    "multilora-channel": lambda: MultiLoRAConfig(
        num_branches=2, r=2, dropout=0.0, scale_shape="channel"
    ),
}
DDP_VARIANTS.update(FSDP_VARIANTS)

RANK = int(os.environ.get("RANK", 0))


def frozen_bytes(model: torch.nn.Module) -> int:
    """Bytes of the frozen parameters this process holds (a sharded one: its local shard)."""
    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            local = p.to_local() if _is_dtensor(p) else p
            total += local.numel() * local.element_size()
    return total


def variants_main(argv: list[str]) -> None:
    out, batch, steps, variants = Path(argv[0]), argv[1], argv[2], argv[3:]
    real_average = lv_train.average_replicated_gradients
    real_route = MixLoRAFFN.route
    # experts each MixLoRA layer routed this process's tokens to since the last optimizer step
    # (the dispatch gives an expert no token reached a zero gradient, not None, so the
    # gradients alone no longer tell; the test has no padding: every routed token is real)
    reached: dict[int, tuple[MixLoRAFFN, set[int]]] = {}

    def route(self, x):
        probs, weights, experts = real_route(self, x)
        if torch.is_grad_enabled():  # the training forwards only
            reached.setdefault(id(self), (self, set()))[1].update(experts.flatten().tolist())
        return probs, weights, experts

    MixLoRAFFN.route = route
    for variant in variants:
        missing: list[list[str]] = []
        unreached: list[list[str]] = []
        memory: dict[str, int] = {}

        def average(accelerator, params, missing=missing, unreached=unreached, memory=memory):
            model = accelerator._models[0]
            memory.setdefault("frozen_bytes", frozen_bytes(model))
            names = {id(p): n for n, p in model.named_parameters()}
            missing.append(sorted(names[id(p)] for p in params if p.grad is None))
            paths = {id(m): n for n, m in model.named_modules()}
            unreached.append(
                sorted(
                    f"{paths[key]}:{e}"
                    for key, (layer, hit) in reached.items()
                    for e in range(layer.num_experts)
                    if e not in hit
                )
            )
            reached.clear()
            real_average(accelerator, params)

        lv_train.average_replicated_gradients = average
        if int(os.environ.get("WORLD_SIZE", 1)) == 1:  # one process: no average is called
            model = make_tiny_llama()
            memory["frozen_bytes"] = frozen_bytes(lv.attach(model, DDP_VARIANTS[variant]()))
        variant_main([variant, str(out / variant), batch, steps])
        lv_train.average_replicated_gradients = real_average
        record = {"missing_grads": missing, "unreached_experts": unreached, **memory}
        (out / variant / f"rank{RANK}.json").write_text(json.dumps(record))
    MixLoRAFFN.route = real_route
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        _check_average(out)


def _check_average(out: Path) -> None:
    """The cross-process gradient average on four tensors: a gradient on both processes, on
    rank 0 only, on rank 1 only, on neither."""
    from accelerate import PartialState

    from loravariants.distributed import average_replicated_gradients

    class Reducer:
        @staticmethod
        def reduce(t, reduction):
            import torch.distributed as dist

            t = t.clone()
            dist.all_reduce(t)
            return t / dist.get_world_size() if reduction == "mean" else t

    PartialState()
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(4)]
    params[0].grad = torch.full((3,), float(RANK + 1))
    params[RANK + 1].grad = torch.full((3,), 4.0)
    average_replicated_gradients(Reducer(), params)
    grads = [None if p.grad is None else p.grad.tolist() for p in params]
    (out / f"average-rank{RANK}.json").write_text(json.dumps(grads))


def resume_main(argv: list[str]) -> None:
    out, variant, batch = Path(argv[0]), argv[1], int(argv[2])
    steps, kill_at = int(argv[3]), int(argv[4])
    torch.set_num_threads(1)
    model = lv.attach(make_tiny_llama(), DDP_VARIANTS[variant]())
    if kill_at and RANK == 0:
        real_step_end = lv_train.on_step_end

        def on_step_end(inner, step, optimizer):
            reset = real_step_end(inner, step, optimizer)
            if step == kill_at:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return reset

        lv_train.on_step_end = on_step_end
    config = TrainConfig(
        max_steps=steps, batch_size=batch, lr=1e-2, warmup_steps=0, seed=3, save_every=1
    )
    result = train(model, random_blocks(masked=True), config, out / "train", progress=False)
    _save_state(model, out / f"final-rank{RANK}.safetensors")
    if RANK == 0:
        lv.save_adapter(model, out / "adapter")
        if variant in ("lora", "cola"):
            lv.save_adapter(model, out / "adapter-peft", format="peft")
        record = {"losses": result.losses, "resumed_from": result.resumed_from}
        (out / "result.json").write_text(json.dumps(record))


def long_main(argv: list[str]) -> None:
    out, batch, steps = Path(argv[0]), int(argv[1]), int(argv[2])
    torch.set_num_threads(1)
    import loravariants.longlora  # noqa: F401  (registers the "s2_attn" attention)

    model = make_tiny_llama(max_position_embeddings=64)
    model.config._attn_implementation = "s2_attn"
    model.config.s2_group_size = 8  # 32-token rows: 4 groups, half of the heads shifted
    lv.attach(model, LoRAConfig(r=2, dropout=0.0))
    config = TrainConfig(
        max_steps=steps,
        batch_size=batch,
        lr=1e-2,
        warmup_steps=0,
        seed=3,
        gradient_checkpointing=True,
    )
    result = train(model, random_blocks(n=8, length=32, masked=True), config, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    if RANK == 0:
        (out / "result.json").write_text(json.dumps({"losses": result.losses}))
    _save_state(model, out / f"state-rank{RANK}.safetensors")


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, rest = sys.argv[1], sys.argv[2:]
    {"variants": variants_main, "resume": resume_main, "long": long_main}[mode](rest)
