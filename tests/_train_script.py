"""Run by the tests: a tiny training run, alone or under torch.distributed.run.

python tests/_train_script.py OUT_DIR BATCH_SIZE [STEPS]
    (tests/test_train.py) train and write the losses and adapter tensors.
python tests/_train_script.py fault VARIANT OUT_DIR KILL [--no-exchange] [--steps N]
        [--reference]
    (tests/test_faults.py) train VARIANT with a checkpoint every step into OUT_DIR/train
    (resuming what is there) and export the adapter to OUT_DIR/adapter after every step; SIGKILL
    this process at KILL = ``<point>:<n>[:cut]``, the n-th time it reaches ``point``, or ``-``
    for never. Points: ``torch_save`` (a checkpoint file written; ``:cut`` writes half of it),
    ``save_file`` (an adapter's safetensors written), ``replace`` (just before a folder is
    switched into place), ``rename_gap`` (between the two renames of the fallback replace),
    ``step_end`` (an optimizer step done, before its checkpoint), ``any`` (the n-th of them
    all). ``--no-exchange`` forces the two-rename replace. Writes OUT_DIR/final.safetensors
    (every model tensor, the frozen weights included) and OUT_DIR/ticks.json at the end;
    ``--reference`` then trains the same run uninterrupted in this process and writes
    OUT_DIR/reference.safetensors.
python tests/_train_script.py fault-compare OUT_DIR KILL
    (tests/test_faults.py) the same kill points in a two-row comparison (LoRA and COLA) into
    OUT_DIR, resuming what is there.
python tests/_train_script.py shard OUT_DIR i/N
    (tests/test_shard.py) one shard of that test's grid, beside the others.
python tests/_train_script.py variant VARIANT OUT_DIR BATCH_SIZE STEPS
    (tests/test_distributed.py) train VARIANT (``DDP_VARIANTS``), alone or under a launcher;
    rank 0 writes OUT_DIR/result.json (losses, balance losses, router statistics) and every rank
    OUT_DIR/state-rank{R}.safetensors (every model tensor: COLA folds links into the frozen
    weights; FSDP's sharded ones gathered) and its ``lv.save_adapter`` to
    OUT_DIR/adapter-rank{R}.

The kill hook lives here, in the test's process only: the library has no switch for it.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file as save_file_plain

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_tiny_llama  # noqa: E402

import loravariants as lv  # noqa: E402
from loravariants.adapters import (  # noqa: E402
    COLAConfig,
    LoRAConfig,
    MixLoRAConfig,
    MultiLoRAConfig,
)
from loravariants.train import TrainConfig, train  # noqa: E402


def random_blocks(
    n: int = 32, length: int = 16, seed: int = 0, masked: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Random token rows; ``masked``: each row's labels start after a random prompt (SFT-like),
    so rows hold different numbers of label tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, length), generator=g)
    prompts = torch.randint(0, length - 2, (n,), generator=g) if masked else torch.zeros(n)
    blocks = []
    for row, prompt in zip(ids, prompts.tolist(), strict=True):
        labels = row.clone()
        labels[: int(prompt)] = -100
        blocks.append({"input_ids": row, "labels": labels})
    return blocks


def main() -> None:
    out, batch_size = sys.argv[1], int(sys.argv[2])
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    # dropout 0: each process draws its own dropout masks, so only a dropout-free run can equal
    # the single-process run bit for bit (up to the all-reduce's summation order)
    model = lv.attach(make_tiny_llama(), LoRAConfig(r=4, dropout=0.0))
    config = TrainConfig(max_steps=steps, batch_size=batch_size, lr=1e-2, warmup_steps=0, seed=3)
    # masked prompts: rows hold different numbers of label tokens, so equality with one
    # process needs the loss averaged over the global step's tokens
    result = train(model, random_blocks(masked=True), config, progress=False)
    rank = int(os.environ.get("RANK", 0))
    os.makedirs(out, exist_ok=True)
    if rank == 0:
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump(result.losses, f)
    state = {k: v for k, v in model.state_dict().items() if "adapters" in k}
    torch.save(state, os.path.join(out, f"adapter-rank{rank}.pt"))


VARIANTS = {
    "lora": lambda: LoRAConfig(r=2, dropout=0.0),
    # knots at 2 and 4: two links folded into the frozen weight before the end
    "cola": lambda: COLAConfig(r=2, dropout=0.0, knots=[2, 4]),
    "multilora": lambda: MultiLoRAConfig(num_branches=2, r=2, dropout=0.0),
    "mixlora": lambda: MixLoRAConfig(num_experts=2, top_k=1, r=2, dropout=0.0),
}


# for the data-parallel tests: MixLoRA's balance loss at coefficient 1 (0.01 would hide a
# balance loss that is reduced differently from one process's), two experts, top-1 routing
DDP_VARIANTS = {
    **VARIANTS,
    "mixlora": lambda: MixLoRAConfig(
        num_experts=2, top_k=1, r=2, dropout=0.0, router_aux_loss_coef=1.0
    ),
    "mixlora-per-layer": lambda: MixLoRAConfig(
        num_experts=2,
        top_k=1,
        r=2,
        dropout=0.0,
        router_aux_loss_coef=1.0,
        balance_loss_aggregation="per_layer",
    ),
    # the paper's rank step-down: a DDP run must refuse it before training
    "cola-step-down": lambda: COLAConfig(r=2, dropout=0.0, knots=[2], link_ranks=[2, 1]),
}


def variant_main(argv: list[str]) -> None:
    variant, out, batch_size, steps = argv[0], Path(argv[1]), int(argv[2]), int(argv[3])
    model = lv.attach(make_tiny_llama(), DDP_VARIANTS[variant]())
    config = TrainConfig(max_steps=steps, batch_size=batch_size, lr=1e-2, warmup_steps=0, seed=3)
    result = train(model, random_blocks(masked=True), config, progress=False)
    rank = int(os.environ.get("RANK", 0))
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        stats = {
            path: {k: v.tolist() if torch.is_tensor(v) else v for k, v in s.items()}
            for path, layer in lv.adapter_layers(model).items()
            if hasattr(layer, "router_stats") and (s := layer.router_stats()) is not None
        }
        record = {"losses": result.losses, "aux": result.aux_losses, "router": stats}
        # what FSDP sharded (DTensors) and left whole, to show the run was sharded at all
        record["sharded"] = sorted(n for n, p in model.named_parameters() if _is_dtensor(p))
        record["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        (out / "result.json").write_text(json.dumps(record))
    _save_state(model, out / f"state-rank{rank}.safetensors")
    lv.save_adapter(model, out / f"adapter-rank{rank}")


class _Killer:
    """Counts the points a run reaches and SIGKILLs the process at the chosen one."""

    def __init__(self, spec: str) -> None:
        parts = spec.split(":")
        self.point = None if spec == "-" else parts[0]
        self.n = int(parts[1]) if len(parts) > 1 else 0
        self.cut = len(parts) > 2 and parts[2] == "cut"
        self.counts: dict[str, int] = {}
        self.ticks = 0

    def due(self, point: str) -> bool:
        self.ticks += 1
        self.counts[point] = self.counts.get(point, 0) + 1
        if self.point == "any":
            return self.ticks == self.n
        return point == self.point and self.counts[point] == self.n

    def tick(self, point: str) -> None:
        if self.due(point):
            self.kill()

    @staticmethod
    def kill() -> None:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _save_state(model, file: Path) -> None:
    from torch.distributed.tensor import DTensor

    # FSDP's sharded tensors gathered (collective: every rank reaches here, in the same order)
    state = {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().contiguous().clone()
        for k, v in model.state_dict().items()
    }
    save_file_plain(state, str(file))


def fault_main(argv: list[str]) -> None:
    import loravariants.io as lv_io
    import loravariants.train as lv_train
    import loravariants.utils as lv_utils

    variant, out, spec = argv[0], Path(argv[1]), argv[2]
    steps = int(argv[argv.index("--steps") + 1]) if "--steps" in argv else 8
    killer = _Killer(spec)
    torch.set_num_threads(1)

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if killer.due("torch_save"):
            if killer.cut:  # a disk that lost the end of the file
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                Path(f).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
            else:
                real_save(obj, f, *args, **kwargs)
            killer.kill()
        real_save(obj, f, *args, **kwargs)

    real_save_file = lv_io.save_file

    def save_file(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        killer.tick("save_file")

    real_replace = os.replace

    def replace(src, dst):
        killer.tick("replace")
        real_replace(src, dst)
        if ".old-" in Path(dst).name:
            killer.tick("rename_gap")

    real_exchange = lv_utils._exchange

    def exchange(a, b):
        if "--no-exchange" in argv:
            return False
        killer.tick("replace")
        return real_exchange(a, b)

    model = lv.attach(make_tiny_llama(), VARIANTS[variant]())
    real_step_end = lv_train.on_step_end

    def on_step_end(inner, step, optimizer):
        reset = real_step_end(inner, step, optimizer)
        killer.tick("step_end")
        lv.save_adapter(inner, out / "adapter")  # a live export, replaced every step
        (out / "adapter.written").touch()
        return reset

    torch.save = save
    lv_io.save_file = save_file
    lv_utils.os.replace = replace  # the os module: every rename of the run
    lv_utils._exchange = exchange
    lv_train.on_step_end = on_step_end
    out.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(
        max_steps=steps, batch_size=2, lr=1e-2, warmup_steps=0, seed=3, save_every=1
    )
    train(model, random_blocks(n=16), config, output_dir=out / "train", progress=False)
    torch.save = real_save
    os.replace = real_replace
    lv_train.on_step_end = real_step_end
    _save_state(model, out / "final.safetensors")
    if "--reference" in argv:  # the same run uninterrupted, in this process, to compare with
        fresh = lv.attach(make_tiny_llama(), VARIANTS[variant]())
        train(fresh, random_blocks(n=16), config, out / "reference", resume=False, progress=False)
        _save_state(fresh, out / "reference.safetensors")
    (out / "ticks.json").write_text(json.dumps({"ticks": killer.ticks, "counts": killer.counts}))


def fault_compare_main(argv: list[str]) -> None:
    """``fault-compare OUT_DIR KILL``: a two-row comparison (LoRA, and COLA with a folded
    link) under the same kill points; resumes what OUT_DIR holds."""
    from test_compare import _tiny_env

    import loravariants.io as lv_io
    import loravariants.utils as lv_utils
    from loravariants.compare import compare
    from loravariants.config import experiment_from_dict

    out, killer = Path(argv[0]), _Killer(argv[1])
    torch.set_num_threads(1)
    real_save, real_save_file, real_replace = torch.save, lv_io.save_file, os.replace
    real_exchange = lv_utils._exchange

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        killer.tick("torch_save")

    def save_file(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        killer.tick("save_file")

    def replace(src, dst):
        killer.tick("replace")
        real_replace(src, dst)

    def exchange(a, b):
        killer.tick("replace")
        return real_exchange(a, b)

    torch.save, lv_io.save_file, lv_utils.os.replace = save, save_file, replace
    lv_utils._exchange = exchange
    config = experiment_from_dict(
        {
            "output_dir": str(out),
            "context": {"target_length": 64},
            "train": {"max_steps": 3, "batch_size": 2, "warmup_steps": 0, "lr": 0.01},
            "eval": {"max_tokens": 128, "lengths": [32]},
            "seeds": [0],
            "runs": [
                {"name": "lora", "adapter": "lora", "overrides": {"r": 2, "dropout": 0.0}},
                {
                    "name": "cola",
                    "adapter": "cola",
                    "overrides": {"r": 2, "dropout": 0.0, "chain_length": 3},
                },
            ],
        }
    )
    config.train.save_every = 1
    compare(config, progress=False, log=lambda s: None, env=_tiny_env())
    (out / "ticks.json").write_text(json.dumps({"ticks": killer.ticks, "counts": killer.counts}))


if __name__ == "__main__":
    if sys.argv[1] == "fault":
        fault_main(sys.argv[2:])
    elif sys.argv[1] == "fault-compare":
        fault_compare_main(sys.argv[2:])
    elif sys.argv[1] == "shard":  # shard OUT_DIR i/N: tests/test_shard.py's grid, one shard
        torch.set_num_threads(1)
        from test_shard import run_shard

        run_shard(Path(sys.argv[2]), sys.argv[3])
    elif sys.argv[1] == "variant":
        torch.set_num_threads(1)
        variant_main(sys.argv[2:])
    else:
        main()
