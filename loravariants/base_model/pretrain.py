"""Pretraining the built-in base model from scratch: the data (stdlib text mixed with synthetic
retrieval blocks), the loop (AdamW, warm-up + cosine, optional fixed copy circuit), and the
acceptance figures every build records (:func:`acceptance_measurements`)."""

from __future__ import annotations

import contextlib
import math
import random
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

# evaluate through its module: its functions are looked up when called (a test replaces
# evaluate.passkey_trials to place the keys without a trained model)
from .. import evaluate
from ..copy_circuit import frozen_slices, install_copy_circuit
from ..data import join_with_eos, load_corpus, pack_blocks, tokenize_documents, train_tokenizer
from ..data.retrieval import kv_example, passkey_example, passkey_min_tokens, retrieval_block
from ..validation import check_range
from .config import BaseModelConfig

__all__ = ["ACCEPTANCE", "acceptance_measurements", "pretrain", "resolve_device"]


def resolve_device(device: str) -> str:
    """``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available) as the device to build on.

    Raises:
        ValueError: an unknown name, or ``"cuda"`` on a machine without CUDA.
    """
    if device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device must be one of cpu, cuda, auto, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: CUDA is not available on this machine (use --device cpu)")
    return device


def _lr_at(step: int, config: BaseModelConfig) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``min_lr_ratio * lr`` (step is 0-based)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


class _RetrievalMix:
    """The synthetic retrieval blocks of each pretraining step (``data/retrieval.py``).

    Step ``t`` gets ``floor((t + 1) * B * f) - floor(t * B * f)`` blocks of each kind (batch
    size ``B``, fraction ``f``), so every prefix of the run holds its share to within one block.
    """

    def __init__(self, config: BaseModelConfig, tokenizer, stream: torch.Tensor, documents):
        self.config = config
        self.tokenizer = tokenizer
        self.stream = stream
        self.documents = documents
        self.rng = random.Random(config.seed)

    def _count(self, step: int, fraction: float) -> int:
        per_step = self.config.batch_size * fraction
        return math.floor((step + 1) * per_step) - math.floor(step * per_step)

    def blocks(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(blocks, answer_mask)`` for ``step``: ``(k, context_length)`` token ids (``k`` may
        be 0) and a boolean mask of the same shape, True on each example's answer tokens."""
        c, n = self.config, self.config.context_length
        examples = [
            passkey_example(self.tokenizer, n - 1, self.rng)
            for _ in range(self._count(step, c.passkey_fraction))
        ] + [
            kv_example(self.tokenizer, n - 1, self.rng, self.documents, c.kv_max_pairs)
            for _ in range(self._count(step, c.kv_fraction))
        ]
        eos = self.tokenizer.eos_token_id
        rows = [retrieval_block(ex, self.stream, n, eos, self.rng) for ex, _ in examples]
        mask = torch.zeros(len(rows), n, dtype=torch.bool)
        for i, (_, n_answer) in enumerate(examples):
            mask[i, n - n_answer :] = True
        if not rows:
            return torch.empty(0, n, dtype=torch.long), mask
        return torch.stack(rows), mask


#: the acceptance of a base that retrieves (issue 28): thresholds the build record checks
ACCEPTANCE = {
    "passkey_native_min": 0.9,  # passkey at the native length
    "passkey_4x_no_pi_max": 0.1,  # passkey at 4x without interpolation, keys beyond native
    "ppl_4x_ratio_min": 1.1,  # ppl at 4x / ppl at 1x without interpolation: "clearly above"
    # today's default base (cpu recipe, cache key 75a32dcb6592, docs/data.md): no worse
    "validation_perplexity_max": 131.77,
}
#: seed of the acceptance prompts (seeds 7000 onwards; pretraining draws its from 10**9 up)
ACCEPTANCE_SEED = 7


def acceptance_measurements(
    model: nn.Module,
    tokenizer,
    val_tokens: torch.Tensor,
    native: int,
    validation_perplexity: float,
    prompts: int = 100,
    factor: int = 4,
    seed: int = ACCEPTANCE_SEED,
) -> dict:
    """The acceptance figures of a base: can it retrieve at its native length, and does that
    (and its perplexity) break at ``factor`` times that length without interpolation?

    * passkey over ``prompts`` prompts of ``native - 16`` tokens (room for the answer), key
      depths spread evenly over the whole prompt;
    * passkey over ``prompts`` prompts of ``factor * native - 16`` tokens, the key always
      further than ``1.25 * native`` tokens from the question (a key inside the native span
      is reachable without any extension, so it would not test the extension);
    * perplexity at ``native`` and ``factor * native`` tokens on the same held-out tokens
      (``evaluate.perplexity_at_lengths``, stride 1/2);
    * each figure against :data:`ACCEPTANCE` (``checks``).

    A length the passkey prompt does not fit (tiny test models) is recorded as ``None``.

    Args:
        model: the base, in its native positions (no interpolation).
        tokenizer: its tokenizer.
        val_tokens: held-out tokens ``(n,)``, ``n >= factor * native``.
        native: the native context length.
        validation_perplexity: the build's validation perplexity (checked, not recomputed).
        prompts: passkey prompts per length, at least 1.
        factor: the extension factor tested, at least 2.
        seed: base seed of the prompts' keys.

    Returns:
        A JSON-ready dict of the figures and their checks.
    """
    check_range("prompts", prompts, low=1, integer=True)
    check_range("factor", factor, low=2, integer=True)
    long = factor * native
    shortest = passkey_min_tokens(tokenizer)

    def passkey(length: int, depth_range: tuple[float, float]) -> float | None:
        if length - 16 < shortest:
            return None
        trials = evaluate.passkey_trials(model, tokenizer, length - 16, prompts, seed, depth_range)
        return sum(t.hit for t in trials) / len(trials)

    far = max(0.0, 1 - 1.25 * native / long)
    val_tokens = val_tokens.flatten()
    if val_tokens.numel() < long:
        raise ValueError(
            f"acceptance: {val_tokens.numel()} validation tokens are fewer than {factor} x the "
            f"native length ({long}); raise val_tokens"
        )
    ppl = evaluate.perplexity_at_lengths(model, val_tokens, [native, long])
    out = {
        "prompts": prompts,
        "seed": seed,
        "native": native,
        "factor": factor,
        "passkey_native": passkey(native, (0.0, 1.0)),
        "passkey_4x_no_pi_beyond_native": passkey(long, (0.0, far)),
        "ppl_native_no_pi": ppl[native],
        "ppl_4x_no_pi": ppl[long],
        "validation_perplexity": validation_perplexity,
    }
    a = ACCEPTANCE
    checks = {
        "ppl_4x_clearly_above_1x": out["ppl_4x_no_pi"] >= a["ppl_4x_ratio_min"] * ppl[native],
        "validation_perplexity_no_worse": validation_perplexity <= a["validation_perplexity_max"],
    }
    if out["passkey_native"] is not None:
        checks["passkey_native"] = out["passkey_native"] >= a["passkey_native_min"]
    if out["passkey_4x_no_pi_beyond_native"] is not None:
        checks["passkey_4x_no_pi"] = (
            out["passkey_4x_no_pi_beyond_native"] <= a["passkey_4x_no_pi_max"]
        )
    out["thresholds"] = dict(a)
    out["checks"] = checks
    out["accepted"] = len(checks) == 4 and all(checks.values())
    return out


@torch.no_grad()
def _validation_perplexity(model, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        batch = blocks[i : i + batch_size].to(device)
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += float(model(input_ids=batch, labels=batch).loss) * n
        count += n
    model.train()
    return math.exp(total / count)


def _pretraining_data(config: BaseModelConfig):
    """The corpus, a BPE tokenizer trained on it, and the packed token blocks.

    Returns:
        ``(corpus, tokenizer, train_stream, blocks, val_blocks)``: the train stream is one
        long ``(n,)`` tensor of documents joined by end-of-text; ``blocks`` is ``(m,
        context_length)``; ``val_blocks`` holds at most ``val_tokens`` validation tokens.
    """
    corpus = load_corpus(
        config.data_source,
        max_documents=config.max_documents,
        validation_fraction=config.validation_fraction,
    )

    def tokenizer_texts():
        chars = 0
        for doc in corpus.train:
            if chars >= config.tokenizer_chars:
                return
            text = doc.text[: config.tokenizer_chars - chars]
            chars += len(text)
            yield text

    # No model_max_length: the tokenizer also serves the context-extended model.
    tokenizer = train_tokenizer(tokenizer_texts(), config.vocab_size)
    train_stream = join_with_eos(
        tokenize_documents([d.text for d in corpus.train], tokenizer), tokenizer.eos_token_id
    )
    blocks, _ = pack_blocks(train_stream, config.context_length)
    val_stream = join_with_eos(
        tokenize_documents([d.text for d in corpus.validation], tokenizer),
        tokenizer.eos_token_id,
    )[: config.val_tokens]
    val_blocks, _ = pack_blocks(val_stream, min(config.context_length, val_stream.numel()))
    return corpus, tokenizer, train_stream, blocks, val_blocks


def _pretraining_optimizer(model: nn.Module, config: BaseModelConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def pretrain(
    config: BaseModelConfig,
    progress: bool = True,
    device: str = "cpu",
    acceptance_prompts: int = 100,
):
    """Train the tokenizer and the model of ``config`` from scratch (no caching).

    Args:
        config: the base to build.
        progress: show a progress bar.
        device: ``"cpu"`` (bit-identical across builds of one machine) or ``"cuda"`` (bf16
            autocast for the forward; weights and optimizer state stay float32).
        acceptance_prompts: passkey prompts per length of :func:`acceptance_measurements`
            (0: skip them).

    Returns:
        ``(model, tokenizer, info)``; ``info`` holds the final training loss (mean of the last
        10 steps), validation perplexity, tokens seen, seconds taken and the acceptance figures.
    """
    start = time.perf_counter()
    corpus, tokenizer, train_stream, blocks, val_blocks = _pretraining_data(config)
    torch.manual_seed(config.seed)
    model, frozen = _initial_model(config, device)
    model.train()
    optimizer = _pretraining_optimizer(model, config)
    order = _BlockOrder(blocks.shape[0], config.seed)
    mix = _RetrievalMix(config, tokenizer, train_stream, [d.text for d in corpus.train])
    losses = []
    train_start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="pretrain base", disable=not progress, leave=False)
    for step in bar:
        synthetic, answers = mix.blocks(step)
        n_plain = config.batch_size - synthetic.shape[0]  # the rest of the batch: packed text
        batch = torch.cat([blocks[order.take(n_plain)], synthetic]).to(device)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        loss, total = _losses(model, batch, answers.to(device), n_plain, config, device)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        with torch.no_grad():
            for weight, index, value in frozen:  # the copy circuit stays as written
                weight[index] = value
        # on a GPU, reading the loss every step would wait for it and leave the device idle
        # while the next step's synthetic blocks are made: read it every 50 steps there
        losses.append(loss.detach())
        if device == "cpu" or step % 50 == 0 or step == config.steps - 1:
            elapsed = time.perf_counter() - train_start
            bar.set_postfix(
                loss=f"{float(losses[-1]):.3f}",
                tok_s=f"{(step + 1) * batch.numel() / max(elapsed, 1e-9):,.0f}",
            )
    bar.close()
    train_seconds = time.perf_counter() - train_start
    info = _build_figures(
        model,
        tokenizer,
        config,
        device,
        blocks,
        val_blocks,
        losses,
        train_seconds,
        acceptance_prompts,
    )
    info["total_seconds"] = time.perf_counter() - start
    return model, tokenizer, info


def _autocast(device: str):
    """bf16 on the GPU; nothing on the CPU (its builds stay bit-identical)."""
    if device == "cpu":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def _initial_model(config: BaseModelConfig, device: str) -> tuple[nn.Module, list]:
    """The freshly initialised Llama on ``device`` (seed it first), and the weight slices to
    hold fixed (:func:`copy_circuit.frozen_slices`; none without ``copy_circuit``)."""
    model = LlamaForCausalLM._from_config(config.llama_config(), attn_implementation="sdpa")
    if config.copy_circuit:  # written on the CPU (its seeded basis lives there), then moved
        install_copy_circuit(model, config.context_length, seed=config.seed)
    model.to(device)
    return model, frozen_slices(model) if config.copy_circuit else []


class _BlockOrder:
    """The data order: one seeded permutation of the blocks per epoch (independent of the
    global RNG), consumed in order across steps."""

    def __init__(self, n_blocks: int, seed: int) -> None:
        self.n_blocks = n_blocks
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n_blocks, generator=self.gen)
        self.cursor = 0

    def take(self, count: int) -> list[int]:
        """The next ``count`` block indices, starting a new permutation at an epoch's end."""
        rows: list[int] = []
        while len(rows) < count:
            if self.cursor == self.order.numel():
                self.order, self.cursor = torch.randperm(self.n_blocks, generator=self.gen), 0
            take = min(count - len(rows), self.order.numel() - self.cursor)
            rows += self.order[self.cursor : self.cursor + take].tolist()
            self.cursor += take
        return rows


def _losses(
    model: nn.Module,
    batch: torch.Tensor,
    answers: torch.Tensor,
    n_plain: int,
    config: BaseModelConfig,
    device: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(language-model loss, loss to optimise)`` of one batch ``(B, context_length)``, the
    last ``B - n_plain`` rows synthetic with ``answers`` (same shape) marking their answers."""
    with _autocast(device):
        logits = model(input_ids=batch).logits[:, :-1].float()
    targets = batch[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    # Optional extra weight on the answers, a few tokens in thousands (measured: it did not
    # teach the copy and cost language modelling, docs/data.md; off by default).
    if config.answer_loss_weight > 0 and answers.any():  # (no device sync when off)
        at = answers[:, 1:]
        synthetic_rows = slice(n_plain, None)  # the synthetic blocks close the batch
        answer_loss = F.cross_entropy(logits[synthetic_rows][at], targets[synthetic_rows][at])
        return loss, loss + config.answer_loss_weight * answer_loss
    return loss, loss


def _build_figures(
    model: nn.Module,
    tokenizer,
    config: BaseModelConfig,
    device: str,
    blocks: torch.Tensor,
    val_blocks: torch.Tensor,
    losses: list[torch.Tensor],
    train_seconds: float,
    acceptance_prompts: int,
) -> dict:
    """The trained model's record: final loss, validation perplexity, induction score, sizes,
    and the acceptance figures (leaves ``model`` in eval mode)."""
    losses = [float(x) for x in losses]
    val_ppl = _validation_perplexity(model, val_blocks, config.batch_size)
    model.eval()
    # whether it can copy from its context at all (retrieval needs it): docs/data.md
    induction = evaluate.induction_score(model, vocab_size=config.vocab_size, span=50, low=3)
    info = {
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "validation_perplexity": val_ppl,
        "validation_tokens": int(val_blocks.numel()),
        "induction_first_nll": induction.first_nll,
        "induction_second_nll": induction.second_nll,
        "train_tokens_available": int(blocks.numel()),
        "tokens_seen": config.steps * config.batch_size * config.context_length,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": train_seconds,
        "torch_threads": torch.get_num_threads(),
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
    }
    if acceptance_prompts and val_blocks.numel() < 4 * config.context_length:
        info["acceptance"] = None  # tiny test builds: too few held-out tokens for 4x
    elif acceptance_prompts:
        measure_start = time.perf_counter()
        info["acceptance"] = acceptance_measurements(
            model,
            tokenizer,
            val_blocks.flatten(),
            config.context_length,
            val_ppl,
            prompts=acceptance_prompts,
        )
        info["acceptance_seconds"] = time.perf_counter() - measure_start
    return info
