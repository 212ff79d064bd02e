"""Every variant under ``transformers.Trainer`` and TRL's ``SFTTrainer``: one callback.

::

    from loravariants.integrations.transformers import LoRAVariantsCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[LoRAVariantsCallback()])

What the Trainer does not know about, and the callback adds:

* **the step-end hook** (COLA's knots: fold the link, start a new one, reset its Adam state):
  ``on_step_end`` runs ``lv.on_step_end(model, state.global_step, optimizer)`` with the
  Trainer's optimizer, after its optimizer step, before a checkpoint of that step is written.
* **the extra loss** (MixLoRA's balance loss): a forward hook on the model, for the duration
  of ``train()``, adds ``lv.aux_loss(model)`` to the model's output ``loss`` in training mode.
  Folding it into the output rather than into a ``compute_loss`` override keeps the callback
  the only thing a user adds, works with any Trainer subclass that takes the model's loss
  (``SFTTrainer``), puts the term into the logged ``loss`` (and TensorBoard), and leaves
  evaluation (eval mode) the plain LM loss. Under gradient accumulation the Trainer scales
  the output loss in one of two ways, and the hook follows it so the extra loss enters each
  optimizer step once, as a mean over the step's micro-batches:

  - the model is given ``num_items_in_batch`` (a transformers LM's default): the Trainer does
    not divide, each micro-batch's LM loss is already its share ``n_micro / N`` of the step's
    label tokens, and the extra loss gets the same share ``n_micro / N``;
  - otherwise the Trainer divides the whole loss by the number of micro-batches, and the
    extra loss is added as it is.

  TRL's ``SFTTrainer`` computes its loss from the output's per-token ``log_probs`` (its fused
  LM head) instead: the hook lowers each scored token's log-probability by the extra loss,
  which puts it into that loss once, with the same share (for ``loss_type="nll"``, the
  default; ``"dft"`` weighs it by each token's probability).

  ``loravariants.train`` weighs micro-batches equally (``1 / grad_accum``); the two agree
  exactly when the micro-batches hold equally many label tokens, and otherwise differ only in
  how the step's balance losses are averaged.

COLA's ``restart_lr_schedule=True`` is refused: the LR schedule is the Trainer's own. Saving
(``save_model``, ``save_steps`` checkpoints, ``resume_from_checkpoint``) needs no callback:
``save_pretrained`` of a model with adapters writes them (:func:`loravariants.io.save_pretrained`).
A model that needs these hooks, trained without them, warns once
(:mod:`loravariants.training_hooks`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

from ..inject import adapter_config, adapter_names, aux_loss, on_step_end

__all__ = ["LoRAVariantsCallback"]


def _inner(model: nn.Module) -> nn.Module:
    """The model the adapters are attached to (``torch.compile`` keeps it as ``_orig_mod``)."""
    return getattr(model, "_orig_mod", model)


def fold_aux_loss(module: nn.Module, args, kwargs, output):
    """Forward hook: ``output.loss += share * lv.aux_loss(module)`` in training mode.

    ``share`` is ``n_micro / num_items_in_batch`` when the Trainer passed
    ``num_items_in_batch`` (the micro-batch's label tokens over the step's), else 1 (see the
    module docstring). TRL's fused LM head (``SFTTrainer``) computes its loss from the output's
    per-token ``log_probs``: each scored token's log-probability is lowered by the extra loss,
    which adds it to that loss with the same share. An output without a loss is left alone
    (the loss is computed outside the model then; the training-hook watch warns that the
    extra loss is missing).
    """
    if not module.training:
        return None
    loss = getattr(output, "loss", None)
    if loss is None:
        return None
    extra = aux_loss(module)
    log_probs, mask = getattr(output, "log_probs", None), getattr(output, "label_mask", None)
    if log_probs is not None and mask is not None:
        # TRL's fused LM head: SFTTrainer's loss is -sum(log_probs) / tokens, not output.loss.
        # Every scored token carries the extra loss once: the token mean then holds it once,
        # with the same share n_micro / N as below under num_items_in_batch.
        output.log_probs = log_probs - extra.to(log_probs.dtype) * mask.to(log_probs.dtype)
    n_items = kwargs.get("num_items_in_batch")
    if n_items is not None:
        labels = kwargs.get("shift_labels")
        if labels is None:
            labels = kwargs["labels"][..., 1:]
        extra = extra * ((labels != -100).sum() / torch.as_tensor(n_items))
    output.loss = loss + extra.to(loss.device, loss.dtype)
    return output


class LoRAVariantsCallback(TrainerCallback):
    """Runs the adapters' training hooks under ``transformers.Trainer`` (and its subclasses:
    TRL's ``SFTTrainer``): ``lv.on_step_end`` after every optimizer step, and the extra loss
    (``lv.aux_loss``) folded into the model's training loss. See the module docstring.

    Harmless for variants without hooks (LoRA, MultiLoRA): it then does nothing.
    """

    def __init__(self) -> None:
        self._handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = _inner(model)
        for name in adapter_names(model):
            if adapter_config(model, name).restarts_lr_schedule():
                raise ValueError(
                    f"adapter {name!r} asks for its LR schedule to restart at every knot "
                    "(restart_lr_schedule=True), which transformers' Trainer cannot do (the "
                    "schedule is its own); set it to False, or train with loravariants.train"
                )
        self._remove()
        self._handle = model.register_forward_hook(fold_aux_loss, with_kwargs=True)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        # the Trainer's optimizer (accelerate's wrapper): its .state is the torch optimizer's
        on_step_end(_inner(model), state.global_step, optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove()

    def _remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
