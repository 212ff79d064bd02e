"""S2-Attn without the shift (LongLoRA Table 1's control): every head attends causally inside
the unshifted groups [0, G), [G, 2G), ... -- checked against a hand-made group-masked
attention, and registered with transformers as ``s2_attn_noshift``."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama_config
from torch.testing import assert_close
from transformers import LlamaForCausalLM

import loravariants.longlora  # noqa: F401  (registers the attention names)
from loravariants.longlora import s2_block_mask, shifted_sparse_attention


def grouped_reference(q, k, v, group_size, key_valid=None):
    """Softmax attention where query i sees key j iff j <= i and i // G == j // G, written
    out by hand (no library mask). q: (b, h, n, d); k, v: (b, h_kv, n, d) -> (b, n, h, d)."""
    b, h, n, d = q.shape
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = torch.zeros(b, n, h, d, dtype=q.dtype)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                keys = [
                    j
                    for j in range(i + 1)
                    if j // group_size == i // group_size
                    and (key_valid is None or (key_valid[bi, j] and key_valid[bi, i]))
                ]
                if not keys:
                    continue
                scores = torch.stack([q[bi, hi, i] @ k[bi, hi, j] for j in keys]) / math.sqrt(d)
                weights = torch.softmax(scores, 0)
                out[bi, i, hi] = sum(w * v[bi, hi, j] for w, j in zip(weights, keys, strict=True))
    return out


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", [(1, 4, 4, 16, 4), (2, 3, 1, 13, 4), (1, 2, 2, 9, 3)])
def test_noshift_is_plain_group_masked_attention(kernel, shape):
    b, h, h_kv, n, g = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, x, n, 8, generator=gen, dtype=torch.float64) for x in (h, h_kv, h_kv))
    out = shifted_sparse_attention(q, k, v, g, kernel=kernel, shift=False)
    assert_close(out, grouped_reference(q, k, v, g))
    # the shifted version differs (its second half of heads sees other groups)
    shifted = shifted_sparse_attention(q, k, v, g, kernel=kernel)
    assert not torch.allclose(shifted[:, :, h - h // 2 :], out[:, :, h - h // 2 :])
    assert_close(shifted[:, :, : h - h // 2], out[:, :, : h - h // 2])


def test_noshift_with_padding_and_gradients_match_the_eager_reference():
    b, h, n, g = 2, 4, 12, 4
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, :3], valid[1, -2:] = False, False
    grads = []
    for kernel in ("sdpa", "eager"):
        gen = torch.Generator().manual_seed(1)
        qkv = [torch.randn(b, h, n, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
        qkv = [x.requires_grad_() for x in qkv]
        out = shifted_sparse_attention(*qkv, g, attention_mask=valid, kernel=kernel, shift=False)
        if kernel == "eager":
            assert_close(out, grouped_reference(*(x.detach() for x in qkv), g, valid))
        out.pow(2).sum().backward()
        grads.append([x.grad for x in qkv])
    for a, e in zip(*grads, strict=True):
        assert_close(a, e)


def test_noshift_block_mask_has_no_shifted_heads():
    mask = s2_block_mask(8, 4, num_heads=4, shift=False)
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    expected = (j <= i) & (i // 4 == j // 4)
    assert all(torch.equal(mask[head], expected) for head in range(4))
    assert not torch.equal(s2_block_mask(8, 4, num_heads=4)[3], expected)


def test_registered_noshift_in_training_and_full_attention_in_eval():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert "s2_attn_noshift" in AttentionInterface._global_mapping
    assert "s2_attn_noshift" in AttentionMaskInterface._global_mapping
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    losses = {}
    for attn, ratio in (("sdpa", 1.0), ("s2_attn_noshift", 1.0), ("s2_attn", 1.0)):
        model.config._attn_implementation = attn
        model.config.s2_group_size_ratio = ratio
        losses[attn] = model.train()(ids, labels=ids).loss
    # one group covering the sequence: no shift is full causal attention; the shift is not
    assert_close(losses["s2_attn_noshift"], losses["sdpa"])
    assert not torch.allclose(losses["s2_attn"], losses["sdpa"])
    model.config.s2_group_size_ratio = 0.25
    model.config._attn_implementation = "s2_attn_noshift"
    grouped = model.train()(ids, labels=ids).loss
    assert not torch.allclose(grouped, losses["sdpa"])
    with torch.no_grad():  # evaluation is exact full attention, as for s2_attn
        model.config._attn_implementation = "s2_attn_noshift"
        a = model.eval()(ids, labels=ids).loss
        model.config._attn_implementation = "sdpa"
        assert_close(a, model(ids, labels=ids).loss)
