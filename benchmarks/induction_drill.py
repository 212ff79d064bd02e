"""Does an induction head form in the built-in base's shape? (docs/data.md, "Why it cannot
retrieve")

Trains a freshly initialised model of the default base's shape (4 layers, hidden 256, vocabulary
4096) on a pure copying drill: every 256-token row is made of random token ids ``x`` of a random
length in ``[--min-period, --max-period]``, each followed by itself (``x x y y z z ...``), so the
second copy of every span is predictable only by matching content earlier in the row. Every
``--every`` steps it prints ``evaluate.induction_score`` (random ids repeated once; first copy
-> second copy NLL in nats). A model that has grown an induction head scores the second copy far
below the first.

``--fixed-period 32 --row-length 64 --batch 32`` instead makes every row one span of 32 ids
twice, which a model can solve by copying from 32 tokens back: the drill loss falls, and the
probe (spans of 50) shows that what it learned is not a content match.

    python benchmarks/induction_drill.py [--steps 2000] [--lr 1e-3] [--every 100]
    python benchmarks/induction_drill.py --fixed-period 32 --row-length 64 --batch 32 --steps 500
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from loravariants.base_model import BaseModelConfig, _pretraining_optimizer
from loravariants.evaluate import induction_score


def drill_row(rng: random.Random, vocab: int, n: int, periods: tuple[int, int]) -> torch.Tensor:
    """One ``(n,)`` row of spans of random ids in ``[3, vocab)``, each span repeated once."""
    ids: list[int] = []
    while len(ids) < n:
        span = [rng.randrange(3, vocab) for _ in range(rng.randint(*periods))]
        ids += span + span
    return torch.tensor(ids[:n])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--row-length", type=int, default=256, help="tokens per row")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-period", type=int, default=6)
    parser.add_argument("--max-period", type=int, default=40)
    parser.add_argument("--fixed-period", type=int, default=0, help="every span this long")
    parser.add_argument("--every", type=int, default=100, help="steps between probes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    periods = (args.fixed_period,) * 2 if args.fixed_period else (args.min_period, args.max_period)

    config = BaseModelConfig(lr=args.lr)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM._from_config(config.llama_config(), attn_implementation="sdpa")
    optimizer = _pretraining_optimizer(model, config)  # the base build's AdamW
    rng = random.Random(args.seed)
    print(
        f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"periods {periods}, lr {args.lr}, {args.batch} x {args.row_length} tokens a step"
    )
    print("| step | seconds | drill loss | probe: first copy | second copy |")
    print("|---|---|---|---|---|")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / 20)  # 20 warm-up steps, then constant
        batch = torch.stack(
            [drill_row(rng, config.vocab_size, args.row_length, periods) for _ in range(args.batch)]
        )
        logits = model(input_ids=batch).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.every == 0 or step == args.steps:
            probe = induction_score(model, span=50, sequences=16)  # restores train mode
            print(
                f"| {step} | {time.perf_counter() - start:.0f} | {loss.item():.2f} | "
                f"{probe.first_nll:.2f} | {probe.second_nll:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
