"""MixLoRA's balance loss under HF gradient checkpointing (issue 18, item 5).

Non-reentrant checkpointing keeps the loss and gives the same gradient as no checkpointing;
reentrant checkpointing would silently drop it, so lv.aux_loss refuses it in one message.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from torch.testing import assert_close

import loravariants as lv
from loravariants.adapters import MixLoRAConfig


def _model():
    model = make_tiny_llama()
    lv.attach(model, MixLoRAConfig(num_experts=4, top_k=2, r=2, dropout=0.0, target_modules=[]))
    return model.train()


def _router_grad(model, tokens):
    """Gradient of the balance loss alone with respect to the routers."""
    model.zero_grad()
    model(tokens)
    loss = lv.aux_loss(model)
    assert loss.requires_grad
    loss.backward()
    return torch.cat(
        [
            p.grad.flatten()
            for n, p in model.named_parameters()
            if "router" in n and p.grad is not None
        ]
    )


def test_non_reentrant_checkpointing_keeps_the_balance_loss(tokens):
    plain = _model()
    ref = _router_grad(plain, tokens)
    assert ref.abs().max() > 0
    ckpt = _model()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_close(_router_grad(ckpt, tokens), ref, rtol=1e-5, atol=1e-7)


def test_reentrant_checkpointing_is_refused_with_the_fix(tokens):
    model = _model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model(tokens)
    with pytest.raises(RuntimeError, match=r"no gradient.*use_reentrant\": False"):
        lv.aux_loss(model)
    with torch.no_grad():  # logging the value without autograd stays allowed
        assert torch.isfinite(lv.aux_loss(model))
