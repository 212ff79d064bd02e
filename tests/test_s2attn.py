"""S2-Attn: kernels against the dense float64 reference, semantics, transformers integration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_llama_config
from torch.testing import assert_close
from transformers import (
    AutoModelForCausalLM,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import loravariants.longlora as ll
from loravariants.longlora import s2_block_mask, shifted_sparse_attention

# (b, h, h_kv, n, G): even/odd heads, GQA/MQA, G dividing n or not, G odd, G > n, G = 1
SHAPES = [
    (1, 4, 4, 16, 8),
    (2, 4, 2, 13, 4),
    (2, 6, 3, 10, 4),
    (1, 2, 1, 9, 3),
    (2, 3, 3, 7, 7),
    (1, 4, 1, 5, 8),
    (2, 8, 2, 24, 6),
    (1, 2, 2, 6, 1),
]


def qkv(b, h, h_kv, n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda heads: torch.randn(b, heads, n, d, generator=g, dtype=torch.float64)  # noqa: E731
    return [x.requires_grad_() for x in (make(h), make(h_kv), make(h_kv))]


def padding_mask(b, n, side):
    mask = torch.ones(b, n, dtype=torch.long)
    if side == "left":
        mask[0, : n // 3] = 0
    elif side == "right":
        mask[-1, n - n // 3 :] = 0
    elif side == "both":
        mask[0, : n // 3] = 0
        mask[-1, n - 2 :] = 0
    return mask


def run_both(kernel, shape, mask=None):
    """Output and (q, k, v) gradients of ``kernel`` and of the eager reference."""
    b, h, h_kv, n, g = shape
    results = []
    for k in (kernel, "eager"):
        q, key, v = qkv(b, h, h_kv, n)
        out = shifted_sparse_attention(q, key, v, g, attention_mask=mask, kernel=k)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
        (out * weight).sum().backward()
        results.append((out.detach(), q.grad, key.grad, v.grad))
    return results


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", ["none", "left", "right", "both"])
def test_sdpa_kernel_matches_reference(shape, side):
    mask = None if side == "none" else padding_mask(shape[0], shape[3], side)
    got, want = run_both("sdpa", shape, mask)
    for a, e in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        assert_close(a, e, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_sdpa_kernel_on_module_layout_inputs(shape):
    """Inputs viewed from (b, n, h, d) storage, as attention modules produce them: the kernel
    works on views of that storage (no copies) and must still match the reference exactly,
    outputs and gradients, padded or not."""
    b, h, h_kv, n, g = shape
    for mask in (None, padding_mask(b, n, "both")):
        results = []
        for kernel in ("sdpa", "eager"):
            q, key, v = (
                x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
                for x in qkv(b, h, h_kv, n)
            )
            assert q.transpose(1, 2).is_contiguous()
            out = shifted_sparse_attention(q, key, v, g, attention_mask=mask, kernel=kernel)
            assert out.shape == (b, n, h, 8) and out.is_contiguous()
            weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).double()
            (out * weight).sum().backward()
            results.append((out.detach(), q.grad, key.grad, v.grad))
        for a, e in zip(*results, strict=True):
            assert_close(a, e, atol=1e-10, rtol=1e-10)


def test_unused_output_positions_still_get_gradients():
    """A loss on part of the output (other positions' gradients are None inside autograd)."""
    q, k, v = qkv(2, 4, 2, 16)
    out = shifted_sparse_attention(q, k, v, 8)
    out[:, :3].sum().backward()
    q2, k2, v2 = qkv(2, 4, 2, 16)
    shifted_sparse_attention(q2, k2, v2, 8, kernel="eager")[:, :3].sum().backward()
    for a, e in zip((q.grad, k.grad, v.grad), (q2.grad, k2.grad, v2.grad), strict=True):
        assert_close(a, e, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shape", SHAPES[:4])
def test_4d_boolean_mask_matches_2d(shape):
    b, _, _, n, g = shape
    mask2 = padding_mask(b, n, "both")
    mask4 = mask2.bool()[:, None, None, :] & torch.ones(n, n, dtype=torch.bool).tril()
    q, k, v = qkv(*shape[:4])
    with torch.no_grad():
        ref = shifted_sparse_attention(q, k, v, g, attention_mask=mask4, kernel="eager")
        out4 = shifted_sparse_attention(q, k, v, g, attention_mask=mask4)
        out2 = shifted_sparse_attention(q, k, v, g, attention_mask=mask2)
    assert_close(out4, ref)
    valid = mask2.bool()[:, :, None, None]
    assert_close(out4 * valid, out2 * valid)  # valid queries agree; padded rows are free


@pytest.mark.parametrize("dtype", [torch.bool, torch.float64])
def test_a_non_causal_4d_mask_is_still_intersected_with_causality(dtype):
    """A user's (b, 1, n, n) mask without causality (all True / all zeros): every kernel gives
    the mask-free output."""
    shape = (2, 4, 2, 12, 4)
    q, k, v = qkv(*shape[:4])
    mask = torch.ones(2, 1, 12, 12, dtype=torch.bool)
    if dtype != torch.bool:
        mask = torch.zeros(2, 1, 12, 12, dtype=dtype)  # additive: 0 = keep
    with torch.no_grad():
        free = shifted_sparse_attention(q, k, v, 4, kernel="eager")
        for kernel in ("sdpa", "eager"):
            out = shifted_sparse_attention(q, k, v, 4, attention_mask=mask, kernel=kernel)
            assert_close(out, free, msg=kernel)


def test_padded_queries_are_zero_and_finite():
    q, k, v = qkv(2, 4, 2, 12)
    mask = padding_mask(2, 12, "left")
    out = shifted_sparse_attention(q, k, v, 4, attention_mask=mask)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert out[0, :4].abs().max() == 0  # left-padded rows see no key at all


def test_padded_positions_are_zero_with_2d_mask():
    q, k, v = qkv(2, 4, 2, 12)
    mask = padding_mask(2, 12, "both")
    with torch.no_grad():
        for kernel in ("sdpa", "eager"):
            out = shifted_sparse_attention(q, k, v, 4, attention_mask=mask, kernel=kernel)
            assert out[mask == 0].abs().max() == 0


def test_all_ones_mask_equals_no_mask():
    q, k, v = qkv(2, 4, 4, 10)
    with torch.no_grad():
        a = shifted_sparse_attention(q, k, v, 4)
        b = shifted_sparse_attention(q, k, v, 4, attention_mask=torch.ones(2, 10))
    assert_close(a, b)


def test_unshifted_heads_with_one_group_are_full_causal():
    q, k, v = qkv(2, 4, 4, 16)
    with torch.no_grad():
        out = shifted_sparse_attention(q, k, v, 16)
        full = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert_close(out[:, :, :2], full[:, :, :2])
    assert not torch.allclose(out[:, :, 2:], full[:, :, 2:])


def test_block_mask_boundaries():
    n, g = 16, 8
    mask = s2_block_mask(n, g, num_heads=2)
    plain, shifted = mask[0], mask[1]
    assert plain[7, 0] and not plain[8, 7] and plain[15, 8]
    # shifted groups: [0, 4), [4, 12), [12, 16)
    assert shifted[3, 0] and not shifted[4, 3] and shifted[11, 4]
    assert not shifted[12, 11] and shifted[15, 12]
    assert not mask.triu(1).any()  # causal, and no wrap-around from the end to the start


def test_shifted_boundary_in_the_op():
    """A query at G/2 in a shifted head ignores key G/2 - 1; the unshifted head does not."""
    n, g = 16, 8
    q, k, v = qkv(1, 2, 2, n)
    with torch.no_grad():
        base = shifted_sparse_attention(q, k, v, g)
        v2 = v.detach().clone()
        v2[:, :, g // 2 - 1] += 100.0
        moved = shifted_sparse_attention(q, k, v2, g)
    delta = (moved - base).abs()[0, :, :, :].amax(-1)  # (n, h)
    assert delta[g // 2, 1] == 0 and delta[g // 2 - 1, 1] > 0  # shifted head
    assert delta[g // 2, 0] > 0 and delta[g, 0] == 0  # unshifted head


def test_output_layout_and_validation():
    q, k, v = qkv(1, 4, 2, 8)
    assert shifted_sparse_attention(q, k, v, 4).shape == (1, 8, 4, 8)
    with pytest.raises(ValueError, match="group_size"):
        shifted_sparse_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="kernel"):
        shifted_sparse_attention(q, k, v, 4, kernel="nope")
    with pytest.raises(ValueError, match="multiple"):
        shifted_sparse_attention(q, k[:, :1].expand(1, 3, 8, 8), v[:, :1].expand(1, 3, 8, 8), 4)
    with pytest.raises(ValueError, match="attention_mask"):
        shifted_sparse_attention(q, k, v, 4, attention_mask=torch.ones(1, 7))
    with pytest.raises(ValueError, match="flash"):
        shifted_sparse_attention(q, k, v, 4, kernel="flash")  # no CUDA / flash-attn here


def test_dropout_only_when_asked():
    q, k, v = qkv(1, 2, 2, 8)
    with torch.no_grad():
        a = shifted_sparse_attention(q, k, v, 4)
        torch.manual_seed(0)
        b = shifted_sparse_attention(q, k, v, 4, dropout=0.5)
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------- models


def tiny(cls_config=None, attn="s2_attn", seed=0, **overrides):
    torch.manual_seed(seed)
    if cls_config is None:
        config, model_cls = tiny_llama_config(**overrides), LlamaForCausalLM
    else:
        config_cls, model_cls = cls_config
        config = tiny_config(config_cls, **overrides)
    config._attn_implementation = attn
    return model_cls(config)


def batch(n=32, pad=True):
    ids = torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, n, dtype=torch.long)
    if pad:
        mask[0, :5] = 0  # left padding
        mask[1, -3:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def loss_with(model, attn, ids, mask, labels):
    model.config._attn_implementation = attn
    return model(ids, attention_mask=mask, labels=labels).loss


def test_registered_names():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert "s2_attn" in AttentionInterface._global_mapping
    assert "s2_attn" in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("pad", [False, True])
def test_llama_eval_equals_sdpa(pad):
    model = tiny().eval()
    ids, mask, labels = batch(pad=pad)
    with torch.no_grad():
        assert_close(
            loss_with(model, "s2_attn", ids, mask, labels),
            loss_with(model, "sdpa", ids, mask, labels),
        )


def manual_s2_loss(model, ids, mask, labels, group_size):
    """Train-mode loss with S2 computed by the eager reference through a custom interface."""
    from transformers import AttentionInterface

    def eager_s2(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        out = shifted_sparse_attention(
            query, key, value, group_size, attention_mask=mask, scaling=scaling, kernel="eager"
        )
        return out, None

    AttentionInterface.register("s2_manual_test", eager_s2)
    try:
        return loss_with(model, "s2_manual_test", ids, mask, labels)
    finally:
        model.config._attn_implementation = "s2_attn"


@pytest.mark.parametrize("pad", [False, True])
def test_llama_train_differs_from_sdpa_and_matches_manual(pad):
    model = tiny().train()  # attention_dropout is 0, so train mode is deterministic
    ids, mask, labels = batch(pad=pad)
    s2 = loss_with(model, "s2_attn", ids, mask, labels)
    full = loss_with(model, "sdpa", ids, mask, labels)
    manual = manual_s2_loss(model, ids, mask, labels, group_size=32 // 4)
    assert not torch.allclose(s2, full)
    assert_close(s2, manual)
    model.config._attn_implementation = "s2_attn"
    s2.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_unpadded_training_batch_takes_the_maskless_path(monkeypatch):
    from loravariants.longlora import s2attn

    seen = []
    real = s2attn.shifted_sparse_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["attention_mask"])
        return real(*args, **kwargs)

    monkeypatch.setattr(s2attn, "shifted_sparse_attention", spy)
    model = tiny().train()
    for pad in (False, True):
        seen.clear()
        ids, mask, labels = batch(pad=pad)
        loss_with(model, "s2_attn", ids, mask, labels)
        assert len(seen) == 2
        assert all((m is None) != pad for m in seen)


def test_group_size_from_config():
    model = tiny(s2_group_size=4).train()
    ids, mask, labels = batch(pad=False)
    s2 = loss_with(model, "s2_attn", ids, mask, labels)
    manual = manual_s2_loss(model, ids, mask, labels, group_size=4)
    assert_close(s2, manual)
    model.config.s2_group_size = None
    model.config.s2_group_size_ratio = 0.5
    assert_close(
        loss_with(model, "s2_attn", ids, mask, labels),
        manual_s2_loss(model, ids, mask, labels, group_size=16),
    )


def test_short_query_falls_back_to_full_attention():
    model = tiny(s2_group_size=64).train()  # group longer than the input
    ids, mask, labels = batch(pad=True)
    assert_close(
        loss_with(model, "s2_attn", ids, mask, labels), loss_with(model, "sdpa", ids, mask, labels)
    )


@pytest.mark.parametrize(
    "family", [(MistralConfig, MistralForCausalLM), (Qwen2Config, Qwen2ForCausalLM)]
)
def test_other_families_with_gqa(family):
    model = tiny(family, num_key_value_heads=1)
    ids, mask, labels = batch(pad=True)
    model.eval()
    with torch.no_grad():
        assert_close(
            loss_with(model, "s2_attn", ids, mask, labels),
            loss_with(model, "sdpa", ids, mask, labels),
        )
    model.train()
    s2 = loss_with(model, "s2_attn", ids, mask, labels)
    assert not torch.allclose(s2, loss_with(model, "sdpa", ids, mask, labels))
    assert_close(s2, manual_s2_loss(model, ids, mask, labels, group_size=8))


def test_generation_with_kv_cache_matches_sdpa():
    model = tiny().eval()
    ids, mask, _ = batch(n=12)
    outs = {}
    for attn in ("s2_attn", "sdpa"):
        model.config._attn_implementation = attn
        outs[attn] = model.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    assert torch.equal(outs["s2_attn"], outs["sdpa"])


def test_no_grad_in_train_mode_is_full_attention_and_grad_mode_is_s2():
    """generate() on a model left in train() mode runs under no_grad: exact full attention."""
    ids, mask, _ = batch(n=12, pad=False)
    model = tiny().train()
    outs = {}
    for attn in ("s2_attn", "sdpa"):
        model.config._attn_implementation = attn
        torch.manual_seed(0)  # dropout draws (none in this config) stay aligned
        with torch.no_grad():
            prefill = model(ids).logits
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        with torch.enable_grad():
            trained = model(ids).logits
        outs[attn] = (prefill, generated, trained)
    assert_close(outs["s2_attn"][0], outs["sdpa"][0])
    assert torch.equal(outs["s2_attn"][1], outs["sdpa"][1])
    assert not torch.allclose(outs["s2_attn"][2], outs["sdpa"][2])  # training: S2-Attn


def test_from_pretrained_and_from_config(tmp_path):
    model = tiny(attn="sdpa")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="s2_attn")
    assert loaded.config._attn_implementation == "s2_attn"
    built = AutoModelForCausalLM.from_config(model.config, attn_implementation="s2_attn")
    assert built.config._attn_implementation == "s2_attn"
    ids, mask, labels = batch()
    with torch.no_grad():
        assert_close(
            loaded.eval()(ids, attention_mask=mask, labels=labels).loss,
            model.eval()(ids, attention_mask=mask, labels=labels).loss,
        )


def test_register_is_idempotent():
    ll.register()
    ll.register()
    model = tiny().eval()
    ids, mask, labels = batch()
    with torch.no_grad():
        assert torch.isfinite(loss_with(model, "s2_attn", ids, mask, labels))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("side", ["none", "left", "right"])
def test_flash_kernel_matches_sdpa(side):
    pytest.importorskip("flash_attn")
    b, h, h_kv, n, g = 2, 8, 2, 200, 48
    mask = None if side == "none" else padding_mask(b, n, side).cuda()
    results = []
    for kernel in ("flash", "sdpa"):
        q, k, v = (
            x.detach().cuda().to(torch.bfloat16).requires_grad_() for x in qkv(b, h, h_kv, n)
        )
        out = shifted_sparse_attention(q, k, v, g, attention_mask=mask, kernel=kernel)
        out.float().square().sum().backward()
        results.append((out.float(), q.grad.float(), k.grad.float(), v.grad.float()))
    for a, e in zip(*results, strict=True):
        assert_close(a, e, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sdpa_kernel_on_cuda_matches_reference():
    q, k, v = (x.detach().cuda() for x in qkv(2, 4, 2, 40))
    mask = padding_mask(2, 40, "both").cuda()
    out = shifted_sparse_attention(q, k, v, 8, attention_mask=mask)
    ref = shifted_sparse_attention(q, k, v, 8, attention_mask=mask, kernel="eager")
    assert_close(out, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", ["none", "left", "both"])
def test_sdpa_kernel_on_cuda_equals_the_cpu_reference(shape, side):
    """float64 on CUDA, inputs in the module layout: outputs and gradients equal the eager
    reference computed on the CPU (GQA, padding, lengths that G does not divide)."""
    b, h, h_kv, n, g = shape
    mask = None if side == "none" else padding_mask(b, n, side)
    results = []
    for device, kernel in (("cuda", "sdpa"), ("cpu", "eager")):
        q, key, v = (
            x.detach().transpose(1, 2).contiguous().transpose(1, 2).to(device).requires_grad_()
            for x in qkv(b, h, h_kv, n)
        )
        m = None if mask is None else mask.to(device)
        out = shifted_sparse_attention(q, key, v, g, attention_mask=m, kernel=kernel)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).double()
        (out * weight.to(device)).sum().backward()
        results.append([t.detach().cpu() for t in (out, q.grad, key.grad, v.grad)])
    for a, e in zip(*results, strict=True):
        assert_close(a, e, atol=1e-10, rtol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("side", ["none", "right"])
def test_bf16_cuda_kernel_is_close_to_the_float64_reference(side):
    """What training runs (bf16 on a GPU, fused SDPA kernels, n not divisible by G) against
    the float64 reference, within bf16 accuracy."""
    b, h, h_kv, n, g = 2, 8, 2, 1000, 256
    mask = None if side == "none" else padding_mask(b, n, side)
    results = []
    for device, dtype, kernel in (("cuda", torch.bfloat16, "sdpa"), ("cpu", None, "eager")):
        q, key, v = (
            x.detach()
            .transpose(1, 2)
            .contiguous()
            .transpose(1, 2)
            .to(device, dtype or x.dtype)
            .requires_grad_()
            for x in qkv(b, h, h_kv, n, d=64)
        )
        m = None if mask is None else mask.to(device)
        out = shifted_sparse_attention(q, key, v, g, attention_mask=m, kernel=kernel)
        out.float().square().sum().backward()
        results.append([t.detach().double().cpu() for t in (out, q.grad, key.grad, v.grad)])
    for a, e in zip(*results, strict=True):
        # bf16 keeps ~3 significant digits: compare the error's norm with the tensor's (single
        # elements of bf16 gradients may be off by more than 5%)
        assert float((a - e).norm() / e.norm()) < 1e-2
