"""Moved to :mod:`loravariants.io.mixlora`; this old path keeps importing its public names."""

from .io.mixlora import (  # noqa: F401
    CONFIG_FILE,
    WEIGHTS_FILE,
    base_model_name,
    load_mixlora,
    read_mixlora_factors,
    save_mixlora,
)
