"""The built-in base model's config: architecture, data and schedule (:class:`BaseModelConfig`),
its cache key, and the named recipes (:data:`RECIPES`)."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass

from transformers import LlamaConfig

from .._version import __version__
from ..copy_circuit import COPY_CIRCUIT_VERSION, check_shape
from ..data import DATA_PIPELINE_VERSION
from ..validation import check_range

__all__ = ["BaseModelConfig", "DEFAULT_NAME", "RECIPES", "recipe_config"]

#: the sentinel that names the built-in base model
DEFAULT_NAME = "default"


@dataclass
class BaseModelConfig:
    """Architecture, data and schedule of the built-in base model.

    Attributes:
        vocab_size: BPE vocabulary (including 256 bytes and 3 special tokens).
        hidden_size: model width; a multiple of ``num_heads``.
        num_layers: decoder layers.
        num_heads: attention heads.
        num_kv_heads: key/value heads (grouped-query attention); divides ``num_heads``.
        intermediate_size: SwiGLU FFN width.
        context_length: native context (``max_position_embeddings``) and block length.
        rope_theta: RoPE base.
        data_source: pretraining text (see ``data.load_documents``); ``stdlib`` by default.
        max_documents: cap on documents read (None: all).
        validation_fraction: documents held out (the same split the experiments use).
        tokenizer_chars: characters of training text used to learn the BPE merges.
        steps: optimizer steps.
        batch_size: blocks per step.
        lr: peak learning rate.
        min_lr_ratio: final learning rate as a share of ``lr`` (cosine decay).
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW decay on matrices (not on norms).
        max_grad_norm: gradient clipping (0: none).
        val_tokens: validation tokens scored for the final perplexity.
        seed: the one seed (initialisation, data order and the synthetic retrieval blocks).
        passkey_fraction: share of the training blocks that end with a passkey prompt and its
            answer (``data/retrieval.py``), in [0, 1).
        kv_fraction: share of the training blocks that end with key-value lookups spread
            through code, in [0, 1); the two shares sum to less than 1.
        answer_loss_weight: weight of an extra loss term, the mean cross-entropy over the
            retrieval examples' answer tokens only (0, the default: plain language-model loss).
        kv_max_pairs: most key-value pairs in one lookup example (1 to this many, uniformly).
        copy_circuit: start from a hand-written previous-token head and induction head (two of
            the heads of layers 0 and 1, ``copy_circuit.py``) and keep them fixed while the rest
            pretrains. Without it no copy mechanism forms within the build's budget and the base
            cannot retrieve; with it the base retrieves at its native length, but position
            interpolation breaks the fixed previous-token head (docs/data.md). Off by default.
    """

    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 688
    context_length: int = 256
    rope_theta: float = 10000.0
    data_source: str = "stdlib"
    max_documents: int | None = None
    validation_fraction: float = 0.05
    tokenizer_chars: int = 4_000_000
    steps: int = 400
    batch_size: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    val_tokens: int = 32768
    seed: int = 0
    passkey_fraction: float = 0.25
    kv_fraction: float = 0.5
    answer_loss_weight: float = 0.0
    kv_max_pairs: int = 8
    copy_circuit: bool = False

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "steps",
            "batch_size",
            "tokenizer_chars",
            "val_tokens",
        ):
            check_range(name, getattr(self, name), low=1, integer=True)
        check_range("vocab_size", self.vocab_size, low=259, integer=True)
        check_range("context_length", self.context_length, low=2, integer=True)
        check_range("warmup_steps", self.warmup_steps, low=0, integer=True)
        check_range("seed", self.seed, integer=True)
        check_range("lr", self.lr, low=0, low_open=True)
        check_range("rope_theta", self.rope_theta, low=0, low_open=True)
        check_range("min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        check_range("weight_decay", self.weight_decay, low=0)
        check_range("max_grad_norm", self.max_grad_norm, low=0)
        check_range("passkey_fraction", self.passkey_fraction, low=0, high=1, high_open=True)
        check_range("kv_fraction", self.kv_fraction, low=0, high=1, high_open=True)
        check_range("answer_loss_weight", self.answer_loss_weight, low=0)
        check_range("kv_max_pairs", self.kv_max_pairs, low=1, integer=True)
        if self.passkey_fraction + self.kv_fraction >= 1:
            raise ValueError(
                f"passkey_fraction + kv_fraction must be below 1 (some blocks must be plain "
                f"text), got {self.passkey_fraction} + {self.kv_fraction}"
            )
        check_range(
            "validation_fraction",
            self.validation_fraction,
            low=0,
            high=1,
            low_open=True,
            high_open=True,
        )
        if self.max_documents is not None:
            check_range("max_documents", self.max_documents, low=2, integer=True)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_heads ({self.num_heads})"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("hidden_size / num_heads must be even (RoPE rotates pairs)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})"
            )
        if self.copy_circuit:
            try:
                check_shape(
                    self.hidden_size,
                    self.num_heads,
                    self.num_layers,
                    self.rope_theta,
                    self.context_length,
                )
            except ValueError as e:
                raise ValueError(f"copy_circuit: {e} (or set copy_circuit: false)") from None
        if not isinstance(self.data_source, str) or not self.data_source:
            raise ValueError(f"data_source must be a non-empty string, got {self.data_source!r}")

    def key(self, device: str = "cpu") -> str:
        """A short hash of everything that determines the weights: this config, the data
        pipeline and library versions, the Python version (whose stdlib is the data) and,
        when it is not the CPU, the device it is built on (a GPU build is not bit-identical
        to a CPU one, and uses bf16 autocast)."""
        config = asdict(self)
        parts = {"data_pipeline": DATA_PIPELINE_VERSION}
        if self.copy_circuit:
            parts["copy_circuit"] = COPY_CIRCUIT_VERSION
        else:
            # added later and off by default: a build without it keeps the key it had before
            # the field existed, so cached bases stay valid
            del config["copy_circuit"]
        if device != "cpu":  # a CPU build keeps the key it had before builds had a device
            parts["device"] = device
        blob = json.dumps(
            {
                "config": config,
                **parts,
                "library": __version__,
                "python": list(sys.version_info[:2]),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.context_length,
            rope_theta=self.rope_theta,
            tie_word_embeddings=False,  # LongLoRA trains embed_tokens but not lm_head
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        )


#: named recipes (``loravariants pretrain-base --recipe NAME``): fields changed from
#: :class:`BaseModelConfig`'s defaults. ``cpu`` is the default base (about 3 min on 2 CPU
#: cores). ``gpu`` is sized for a few minutes of one H200 (not yet run; docs/data.md, "GPU work
#: pending"): the same architecture family, native length, tokenizer and data (stdlib text
#: mixed with passkey and key-value blocks), a wider and deeper model (8 layers, width 384:
#: about 16 M parameters against 5 M) and 40x the tokens (32.8 M), in bf16 autocast.
RECIPES: dict[str, dict] = {
    "cpu": {},
    "gpu": dict(
        hidden_size=384,
        num_layers=8,
        num_heads=6,
        num_kv_heads=2,
        intermediate_size=1024,
        steps=4000,
        batch_size=32,
        lr=1e-3,
        warmup_steps=200,
        val_tokens=65536,
        # the synthetic blocks are made on the CPU between steps: their shares set its cost per
        # step (about 50 ms on the 2-core machine at these shares, docs/data.md)
        passkey_fraction=0.25,
        kv_fraction=0.25,
    ),
}
#: ``gpu-1k``: the ``gpu`` recipe at a native length of 1024 (the same tokens per step), for
#: the GPU passkey experiment at 1k -> 4k (benchmarks/gpu_longcontext.py --base recipe:gpu-1k)
RECIPES["gpu-1k"] = {**RECIPES["gpu"], "context_length": 1024, "batch_size": 8}


def recipe_config(name: str) -> BaseModelConfig:
    """The :class:`BaseModelConfig` of recipe ``name`` (a key of :data:`RECIPES`)."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    return BaseModelConfig(**RECIPES[name])
