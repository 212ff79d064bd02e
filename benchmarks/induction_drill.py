"""Does an induction head form in the built-in base's shape? (docs/data.md, "Why it could not
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

The levers that are said to speed up induction-head formation can be set: the drill's own
vocabulary (``--drill-vocab 64``: ids from ``[3, 67)`` only, so every embedding is trained
often), tied input/output embeddings (``--tied``), the initialisation scale (``--init-std``,
the base's is 0.02), the depth (``--layers``), short rows (``--row-length 32 --batch 64``,
the same tokens a step) and a higher learning rate. The drill loss is printed on the first
copies (unpredictable: ``ln(drill vocabulary)`` at best) and on the second copies (near 0 for
a model that copies by content) separately; the probe draws its ids from the drill's.

    python benchmarks/induction_drill.py [--steps 2000] [--lr 1e-3] [--every 100]
    python benchmarks/induction_drill.py --fixed-period 32 --row-length 64 --batch 32 --steps 500
    python benchmarks/induction_drill.py --drill-vocab 64 --tied --init-std 0.06 \
        --row-length 32 --batch 64 --min-period 4 --max-period 12 --lr 3e-3 --steps 500
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


def drill_row(
    rng: random.Random, vocab: int, n: int, periods: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(n,)`` row of spans of random ids in ``[3, 3 + vocab)``, each span repeated once,
    and an ``(n,)`` bool mask that is True where a token is predictable by copying (the second
    copy of a span, its first token excepted: nothing announces where a copy starts)."""
    ids: list[int] = []
    copy: list[bool] = []
    while len(ids) < n:
        span = [rng.randrange(3, 3 + vocab) for _ in range(rng.randint(*periods))]
        ids += span + span
        copy += [False] * (len(span) + 1) + [True] * (len(span) - 1)
    return torch.tensor(ids[:n]), torch.tensor(copy[:n])


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
    parser.add_argument(
        "--drill-vocab", type=int, default=0, help="draw ids from this many (0: the whole vocab)"
    )
    parser.add_argument("--tied", action="store_true", help="tie input and output embeddings")
    parser.add_argument("--init-std", type=float, default=0.02, help="initializer_range")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (0: the base's)")
    args = parser.parse_args(argv)
    periods = (args.fixed_period,) * 2 if args.fixed_period else (args.min_period, args.max_period)

    config = BaseModelConfig(lr=args.lr, num_layers=args.layers or BaseModelConfig.num_layers)
    drill_vocab = args.drill_vocab or config.vocab_size - 3
    if not 2 <= drill_vocab <= config.vocab_size - 3:
        parser.error(f"--drill-vocab must be in [2, {config.vocab_size - 3}]")
    llama = config.llama_config()
    llama.tie_word_embeddings = args.tied
    llama.initializer_range = args.init_std
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM._from_config(llama, attn_implementation="sdpa")
    optimizer = _pretraining_optimizer(model, config)  # the base build's AdamW
    rng = random.Random(args.seed)
    print(
        f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"periods {periods}, lr {args.lr}, {args.batch} x {args.row_length} tokens a step, "
        f"drill vocabulary {drill_vocab}, {config.num_layers} layers, "
        f"{'tied' if args.tied else 'untied'} embeddings, init std {args.init_std}"
    )
    print(
        "| step | seconds | drill loss | on first copies | on second copies "
        "| probe: first copy | second copy |"
    )
    print("|---|---|---|---|---|---|---|")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / 20)  # 20 warm-up steps, then constant
        rows = [drill_row(rng, drill_vocab, args.row_length, periods) for _ in range(args.batch)]
        batch = torch.stack([ids for ids, _ in rows])
        copy = torch.stack([mask for _, mask in rows])[:, 1:]
        logits = model(input_ids=batch).logits[:, :-1]
        per_token = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        ).view(copy.shape)
        loss = per_token.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.every == 0 or step == args.steps:
            # on the drill's own ids; restores train mode
            probe = induction_score(model, vocab_size=3 + drill_vocab, span=50, sequences=16)
            print(
                f"| {step} | {time.perf_counter() - start:.0f} | {loss.item():.2f} | "
                f"{per_token[~copy].mean().item():.2f} | {per_token[copy].mean().item():.2f} | "
                f"{probe.first_nll:.2f} | {probe.second_nll:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
