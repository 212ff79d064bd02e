"""Experiment trackers and validation during training, for the one training loop.

    train.report_to: [tensorboard | wandb | trackio | mlflow]     (default [], none)
      config check  -> every name known and its package installed, else one line naming the
                       ``pip install`` (before any training: accelerate would drop it silently)
      setup         -> Accelerator(log_with=..., project_config=...) -> init_trackers
      every log step-> accelerator.log({train/loss, train/aux_loss, train/lr, train/grad_norm,
                       train/tokens_per_s, eval/perplexity, adapter/<metric>})
      done          -> each tracker's finish() (not accelerator.end_training(), which would
                       also tear down the process group of a distributed launch)
    train.eval_every: N  -> validation perplexity every N steps (the training block length)

The adapter metrics come from each layer's :meth:`~loravariants.adapters.AdapterLayer.metrics`
(COLA: ``link_index``; MixLoRA: ``router_load/expert_<i>``), averaged over an adapter's
layers; nothing here names a variant.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .evaluate import perplexity
from .inject import iter_adapters

__all__ = [
    "TRACKERS",
    "check_report_to",
    "tracker_settings",
    "start_trackers",
    "adapter_metrics",
    "tracker_values",
    "log_line",
    "check_eval_data",
    "validation_perplexity",
]

#: tracker name -> (accelerate's availability check, the package to install)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("is_tensorboard_available", "tensorboard"),
    "wandb": ("is_wandb_available", "wandb"),
    "trackio": ("is_trackio_available", "trackio"),
    "mlflow": ("is_mlflow_available", "mlflow"),
}
#: the project every tracker files runs under (TensorBoard: the folder under ``tensorboard/``)
PROJECT = "loravariants"


def check_report_to(value: Any) -> list[str]:
    """Validate ``train.report_to``: a list of tracker names (a single name is a list of one).

    Uses accelerate's own availability checks, so a name that passes is one that accelerate
    will really start (it leaves out an unavailable tracker without an error).

    Raises:
        ValueError: not a list of strings, an unknown name, or a tracker that is not
            installed (naming the ``pip install`` command).
    """
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"report_to must be a list of {list(TRACKERS)}, got {value!r}")
    if not names:
        return []
    import accelerate.utils as accelerate_utils  # on use: most configs name no tracker

    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"report_to must name trackers among {list(TRACKERS)}, got {name!r}")
        check, package = TRACKERS[name]
        if not getattr(accelerate_utils, check)():
            raise ValueError(
                f"report_to names {name}, which is not installed: pip install {package} "
                "(or pip install 'loravariants[trackers]')"
            )
    return list(dict.fromkeys(names))


def tracker_settings(report_to: Sequence[str], out: Path | None) -> dict[str, Any]:
    """The ``Accelerator`` arguments for ``report_to``: ``{}`` without trackers.

    TensorBoard writes under ``out/tensorboard/<PROJECT>/``; the others where their own
    settings say (W&B and trackio: their servers or local folders; MLflow:
    ``MLFLOW_TRACKING_URI``).

    Raises:
        ValueError: a tracker that writes files (TensorBoard) without an output directory.
    """
    if not report_to:
        return {}
    from accelerate.utils import ProjectConfiguration

    if "tensorboard" in report_to and out is None:
        raise ValueError("report_to: tensorboard needs an output directory (output_dir)")
    project = None
    if out is not None:
        project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard"))
    return {"log_with": list(report_to), "project_config": project}


def _hparams(config: Any) -> dict[str, Any]:
    """The training config as flat values every tracker stores (lists and None as text)."""
    from dataclasses import asdict

    return {
        k: v if isinstance(v, (bool, int, float, str)) else str(v)
        for k, v in asdict(config).items()
    }


def start_trackers(
    accelerator, config: Any, run_name: str | None, stack: contextlib.ExitStack
) -> bool:
    """Start the accelerator's trackers (none without ``report_to``) and finish them when
    ``stack`` closes, also when training stops on an error. Returns whether any runs."""
    if not config.report_to:
        return False
    init_kwargs = {}
    if run_name:
        init_kwargs = {"wandb": {"name": run_name}, "trackio": {"name": run_name}}
        init_kwargs["mlflow"] = {"run_name": run_name}
    accelerator.init_trackers(PROJECT, config=_hparams(config), init_kwargs=init_kwargs)

    def finish() -> None:
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers.clear()

    stack.callback(finish)
    return True


def adapter_metrics(model: nn.Module) -> dict[str, float]:
    """Every adapter layer's :meth:`metrics`, averaged per name over the layers reporting it.

    Returns:
        ``{metric: mean}`` with one adapter attached, ``{"<adapter>/<metric>": mean}`` with
        several.
    """
    sums: dict[tuple[str, str], list[float]] = {}
    for _, name, layer in iter_adapters(model):
        for key, value in layer.metrics().items():
            sums.setdefault((name, key), []).append(float(value))
    several = len({name for name, _ in sums}) > 1
    return {
        (f"{name}/{key}" if several else key): sum(v) / len(v) for (name, key), v in sums.items()
    }


# metrics-line keys -> tracker keys; the adapters' metrics go under adapter/
_TRACKER_KEYS = {
    "loss": "train/loss",
    "aux_loss": "train/aux_loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "val_ppl": "eval/perplexity",
}


def tracker_values(line: Mapping[str, Any], adapters: Mapping[str, float]) -> dict[str, float]:
    """What one metrics line and the adapters' metrics log to the trackers."""
    values = {_TRACKER_KEYS[k]: float(v) for k, v in line.items() if k in _TRACKER_KEYS}
    values.update({f"adapter/{k}": float(v) for k, v in adapters.items()})
    return values


def log_line(accelerator, model: nn.Module, line: Mapping[str, Any]) -> None:
    """Send one metrics line and the adapters' metrics to the running trackers (main process;
    nothing without ``report_to``)."""
    if accelerator.trackers:
        values = tracker_values(line, adapter_metrics(model))
        accelerator.log(values, step=int(line["step"]))


def check_eval_data(config: Any, eval_data: torch.Tensor | None, block_length: int) -> None:
    """``eval_every`` needs validation tokens, at least one training block of them.

    Raises:
        ValueError: naming what is missing.
    """
    if not config.eval_every:
        return
    if eval_data is None:
        raise ValueError("eval_every > 0 needs validation tokens (train(..., eval_data=tokens))")
    n = int(torch.as_tensor(eval_data).numel())
    if n < block_length:
        raise ValueError(
            f"eval_every: the validation tokens ({n}) are fewer than one training block "
            f"({block_length} tokens)"
        )


def validation_perplexity(
    model: nn.Module, tokens: torch.Tensor, block_length: int, batch_size: int
) -> float:
    """Perplexity of ``tokens`` (1-D) at the training block length with half-overlapping
    windows (:func:`loravariants.evaluate.perplexity`: eval mode, full attention; the model
    goes back to training mode after).

    Eval mode uses no randomness (no dropout, no router jitter), so a run with ``eval_every``
    trains exactly as one without.
    """
    return perplexity(model, tokens, block_length, max(1, block_length // 2), batch_size)
