"""The built-in base model: a small Llama pretrained at 256 tokens on the Python standard library.

The LongLoRA experiments need a base model with a short native context to extend. Downloading
one is not always possible, so the library trains its own on the one long-document corpus every
machine has offline (the stdlib's source; see ``data/corpus.py``)::

    stdlib *.py --split by hash--> train docs --BPE--> tokenizer (4096)
                                        |                  |
                                        +--> <s> doc </s> <s> doc </s> ... --> 256-token blocks
                                                                                   |
    LlamaForCausalLM (4 layers, d=256) <-- AdamW, warm-up + cosine, fixed seed ----+

The result is saved with ``save_pretrained`` (model and tokenizer) under
``<cache>/base-models/<name>-<hash of the config>``; the build is atomic (temporary folder,
then rename) and reused until the config, the data pipeline, the library or the Python
version (the stdlib is the data) change. ``docs/data.md`` records its time, loss and perplexity.

Two recipes (:data:`RECIPES`): ``cpu``, the default base, and ``gpu``, a larger model and
many more tokens of the same data for a few minutes of one GPU. Every build's record also holds
its acceptance figures (:func:`acceptance_measurements`): passkey at the native length, passkey
and perplexity at 4x without position interpolation, and validation perplexity.

The package: ``config.py`` (:class:`BaseModelConfig`, its cache key, :data:`RECIPES`),
``pretrain.py`` (:func:`pretrain`, the acceptance figures) and ``cache.py`` (the cached build
and :func:`resolve_base_model` / :func:`load_base_model`); every name is importable from here.
"""

from ..utils import default_cache_dir
from .cache import base_model_path, build_base_model, load_base_model, resolve_base_model
from .config import DEFAULT_NAME, RECIPES, BaseModelConfig, recipe_config

# ACCEPTANCE_SEED, _pretraining_optimizer, _RetrievalMix: not in __all__, but tests and
# benchmarks/induction_drill.py import them from here
from .pretrain import (  # noqa: F401
    ACCEPTANCE,
    ACCEPTANCE_SEED,
    _pretraining_optimizer,
    _RetrievalMix,
    acceptance_measurements,
    pretrain,
    resolve_device,
)

__all__ = [
    "ACCEPTANCE",
    "BaseModelConfig",
    "DEFAULT_NAME",
    "RECIPES",
    "acceptance_measurements",
    "recipe_config",
    "resolve_device",
    "default_cache_dir",
    "base_model_path",
    "build_base_model",
    "pretrain",
    "resolve_base_model",
    "load_base_model",
]
