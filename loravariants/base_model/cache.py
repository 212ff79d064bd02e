"""The built-in base model's cache: ``<cache>/base-models/<name>-<key>``, built atomically by
:func:`build_base_model` and reused until its key changes; :func:`resolve_base_model` and
:func:`load_base_model` also resolve shipped bases, named real models and any
``from_pretrained`` path."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from .._version import __version__
from ..real_models import REAL_MODELS, build_real_model
from ..shipped_base import find_shipped_base, is_shipped_base, verify_shipped_base
from ..utils import atomic_directory, default_cache_dir
from .config import DEFAULT_NAME, RECIPES, BaseModelConfig, recipe_config
from .pretrain import pretrain, resolve_device

__all__ = ["base_model_path", "build_base_model", "load_base_model", "resolve_base_model"]


def base_model_path(
    config: BaseModelConfig, cache_dir: str | os.PathLike | None = None, device: str = "cpu"
) -> Path:
    """Where ``config``'s model (built on ``device``) is (or would be) cached."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    c = config
    name = f"llama-{c.num_layers}L{c.hidden_size}d-ctx{c.context_length}-{c.key(device)}"
    return root / "base-models" / name


def build_base_model(
    config: BaseModelConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    device: str = "cpu",
    recipe: str | None = None,
    acceptance_prompts: int = 0,
) -> Path:
    """The cached base model's folder, pretraining it first when missing (or ``force``).

    The folder holds ``save_pretrained`` output of the model and tokenizer (so
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load it) and
    ``build_info.json`` (config, metrics, versions). It appears atomically: a killed build
    leaves no partial folder behind.

    Args:
        config: the model to build (default: ``BaseModelConfig()``).
        cache_dir: cache root (default: :func:`default_cache_dir`).
        force: rebuild even when cached.
        progress: show a progress bar.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (:func:`resolve_device`); a non-CPU build
            is cached under its own key.
        recipe: the recipe's name, recorded in ``build_info.json`` (``None``: ``"cpu"`` when
            ``config`` is that recipe, else ``"custom"``).
        acceptance_prompts: passkey prompts per length of the acceptance figures (0, the
            default: none, so that an implicit build by ``quickstart`` costs no more;
            ``loravariants pretrain-base`` measures them with 100).
    """
    config = config or BaseModelConfig()
    device = resolve_device(device)
    if recipe is None:
        recipe = next((n for n in RECIPES if recipe_config(n) == config), "custom")
    path = base_model_path(config, cache_dir, device)
    if (path / "build_info.json").is_file() and not force:
        return path
    # fail before minutes of pretraining, not when saving its result
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the base-model cache folder {path.parent} ({e})") from e
    model, tokenizer, info = pretrain(
        config, progress, device=device, acceptance_prompts=acceptance_prompts
    )
    model.to("cpu")
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {
            "recipe": recipe,
            "device": device,
            "config": asdict(config),
            "metrics": info,
            "key": config.key(device),
            "versions": {
                "loravariants": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": sys.version.split()[0],
            },
        }
        (tmp / "build_info.json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def resolve_base_model(
    name: str = DEFAULT_NAME,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    config: BaseModelConfig | None = None,
):
    """``(path_or_hub_name, tokenizer)`` of a base model without loading its weights.

    ``"default"`` uses the base shipped with the package for that config when there is one
    (``shipped_base.py``; verified by hash), else builds (or reuses) the built-in model —
    ``config`` changes its fields (each variant is cached under its own key); a folder with a
    shipped-base manifest is verified before use; a name in ``real_models.REAL_MODELS`` (e.g.
    ``"smollm2-135m"``) converts (or reuses) that packaged pretrained model; anything else is
    passed to ``from_pretrained`` (a local folder, or a hub name, which downloads).

    Raises:
        real_models.MissingExtraError: a named real model's optional packages are missing.
        shipped_base.ShippedBaseError: a shipped base's files do not match its manifest.
    """
    if name == DEFAULT_NAME:
        # a base shipped with the package for exactly this config wins over a build, once its
        # files match their manifest's hashes (a mismatch is an error, never a silent rebuild)
        shipped = find_shipped_base(asdict(config or BaseModelConfig()))
        if shipped is not None:
            verify_shipped_base(shipped)
            path: str | Path = shipped
        else:
            path = build_base_model(config, cache_dir=cache_dir, progress=progress)
    elif name in REAL_MODELS:
        path = build_real_model(name, cache_dir=cache_dir, progress=progress)
    else:
        path = name
        local = Path(name).expanduser()
        if local.exists():
            path = local
            if is_shipped_base(local):
                verify_shipped_base(local)
        elif name.startswith((".", "/", "~")):
            raise FileNotFoundError(f"base model folder {name!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs one; EOS is the usual stand-in
    return path, tokenizer


def load_base_model(
    path_or_name: str = DEFAULT_NAME,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
):
    """``(model, tokenizer)``: the built-in base (``"default"``), a named real model
    (``"smollm2-135m"``) or any ``from_pretrained`` path / hub name. The model is returned in
    eval mode."""
    path, tokenizer = resolve_base_model(path_or_name, cache_dir, progress)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), tokenizer
