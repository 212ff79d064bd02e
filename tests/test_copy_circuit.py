"""The hand-written copy circuit of the built-in base (loravariants/copy_circuit.py): a
previous-token head in layer 0, an induction head in layer 1, kept fixed during pretraining."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_base_config, write_tiny_corpus
from transformers import LlamaForCausalLM

from loravariants.base_model import BaseModelConfig, pretrain
from loravariants.copy_circuit import (
    CopyCircuitError,
    check_shape,
    circuit_planes,
    frozen_slices,
    install_copy_circuit,
    rope_frequencies,
)
from loravariants.evaluate import induction_score


def _model(config: BaseModelConfig, circuit: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config.llama_config(), attn_implementation="eager")
    if circuit:
        install_copy_circuit(model, config.context_length, seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def default_shape():
    return BaseModelConfig()


def _attentions(model, span: int = 50, vocab: int = 4096):
    """Attention of layer 0 and layer 1, head 0, on random ids ``x x`` (``2 * span`` tokens)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, vocab, (1, span), generator=g)
    with torch.no_grad():
        out = model(input_ids=torch.cat([x, x], 1), output_attentions=True)
    return out.attentions[0][0, 0], out.attentions[1][0, 0]


def test_layer0_head0_attends_to_the_previous_token(default_shape):
    first, _ = _attentions(_model(default_shape))
    t = torch.arange(1, 100)
    assert first[t, t - 1].min() > 0.99


def test_layer1_head0_attends_to_the_token_after_the_earlier_occurrence(default_shape):
    _, second = _attentions(_model(default_shape))
    t = torch.arange(51, 100)  # second copy: x_t's earlier occurrence is at t - 50, copy t - 49
    assert second[t, t - 49].mean() > 0.7  # measured 0.78 (10 slow dimensions, random codes)


def test_it_copies_from_the_start_and_the_plain_model_does_not(default_shape):
    wired = induction_score(_model(default_shape), vocab_size=4096, span=50, low=3)
    plain = induction_score(_model(default_shape, circuit=False), vocab_size=4096, span=50, low=3)
    # measured: 8.41 -> 5.71 nats; the plain initialisation scores both copies alike
    assert wired.second_nll < wired.first_nll - 2.0
    assert wired.first_nll < math.log(4096) + 0.5  # gentle: first occurrences barely pay
    assert abs(plain.second_nll - plain.first_nll) < 0.1


def test_embeddings_leave_the_previous_token_slot_empty_and_codes_equal(default_shape):
    model = _model(default_shape)
    frozen = frozen_slices(model)
    G = frozen[3][2].double()  # layer 0 output columns of head 0: prev_scale * G
    E = model.model.embed_tokens.weight.double()
    assert (E @ G).abs().max() < 1e-5
    P = frozen[2][2].double()  # layer 0 value rows: the code directions P (hd, d)
    norms = (E[3:] @ P.T).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 4.0), atol=1e-4)  # embed_scale * 1.0


def test_planes_follow_the_models_rope(default_shape):
    model = _model(default_shape, circuit=False)
    ours = rope_frequencies(64, default_shape.rope_theta).float()
    assert torch.allclose(model.model.rotary_emb.inv_freq.float(), ours)
    fast, slow = circuit_planes(64, 10000.0, 256)
    assert fast == list(range(8)) and slow == [20, 21, 22, 23, 24]


def test_the_match_breaks_far_past_the_native_context(default_shape):
    """The slow pairs turn by >= 0.25 rad over 256 tokens, so by >= 1 rad at 4x: a copy 500
    tokens back is no longer found (the base should fail past its native length)."""
    model = _model(default_shape)
    near = induction_score(model, vocab_size=4096, span=50, low=3, sequences=4)
    far = induction_score(model, vocab_size=4096, span=500, low=3, sequences=4)
    assert near.second_nll < near.first_nll - 2.0
    assert far.second_nll > far.first_nll - 0.3  # measured: 8.40 -> 8.36


@pytest.mark.parametrize(
    "shape, match",
    [
        ((64, 4, 1, 10000.0, 256), "at least 2 layers"),
        ((32, 2, 2, 10000.0, 256), "at least 3 heads"),
        ((64, 4, 2, 10000.0, 10**9), "pairs that turn"),
    ],
)
def test_shapes_that_cannot_hold_it_are_refused(shape, match):
    with pytest.raises(CopyCircuitError, match=match):
        check_shape(*shape)


def test_off_by_default_and_the_default_base_keeps_its_cache_key():
    assert BaseModelConfig().copy_circuit is False
    # the key of a build without the circuit is the one it had before the field existed
    # (cached bases stay valid): this is the key docs/data.md gives the default base
    import sys

    from loravariants import __version__

    if __version__ == "0.1.0" and sys.version_info[:2] == (3, 11):
        assert BaseModelConfig().key() == "75a32dcb6592"
    assert BaseModelConfig(copy_circuit=True).key() != BaseModelConfig().key()


def test_config_refuses_a_shape_without_room_and_names_the_way_out():
    with pytest.raises(ValueError, match="copy_circuit: false"):
        BaseModelConfig(hidden_size=32, num_heads=2, num_kv_heads=1, copy_circuit=True)
    BaseModelConfig(hidden_size=32, num_heads=2, num_kv_heads=1)  # off by default


def test_tied_embeddings_are_refused(default_shape):
    torch.manual_seed(0)
    llama = default_shape.llama_config()
    llama.tie_word_embeddings = True
    model = LlamaForCausalLM._from_config(llama)
    with pytest.raises(CopyCircuitError, match="untied"):
        install_copy_circuit(model, 256)


def test_pretraining_keeps_the_circuit_exactly_and_trains_the_rest(tmp_path):
    write_tiny_corpus(tmp_path)
    config = tiny_base_config(
        tmp_path, hidden_size=64, num_heads=4, num_kv_heads=2, steps=5, copy_circuit=True
    )
    model, _, _ = pretrain(config, progress=False)
    torch.manual_seed(config.seed)
    start = LlamaForCausalLM._from_config(config.llama_config(), attn_implementation="sdpa")
    install_copy_circuit(start, config.context_length, seed=config.seed)
    for (trained, index, _), (initial, _, _) in zip(
        frozen_slices(model), frozen_slices(start), strict=True
    ):
        assert torch.equal(trained.detach()[index], initial.detach()[index])
    # everything else did train: the rest of layer 0's query rows, and the embeddings
    hd = 16
    q_trained = model.model.layers[0].self_attn.q_proj.weight.detach()[hd:]
    q_initial = start.model.layers[0].self_attn.q_proj.weight.detach()[hd:]
    assert not torch.equal(q_trained, q_initial)
    assert not torch.equal(model.model.embed_tokens.weight, start.model.embed_tokens.weight)
