"""Run by tests/test_train.py: a tiny training run, alone or under torch.distributed.run.

python tests/_train_script.py OUT_DIR BATCH_SIZE [STEPS]
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_tiny_llama  # noqa: E402

import loravariants as lv  # noqa: E402
from loravariants.adapters import LoRAConfig  # noqa: E402
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


if __name__ == "__main__":
    main()
