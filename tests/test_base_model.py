"""The built-in base model: config validation, caching, determinism, loading (tiny configs)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import tiny_base_config, write_tiny_corpus

from loravariants.base_model import (
    BaseModelConfig,
    base_model_path,
    build_base_model,
    default_cache_dir,
    load_base_model,
    resolve_base_model,
)
from loravariants.cli import pretrain_base_main


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_tiny_corpus(root)
    return root


def _state(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_build_caches_and_loads(corpus_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = tiny_base_config(corpus_dir)
    path = build_base_model(config, cache_dir=tmp_path, progress=False)
    assert path == base_model_path(config, tmp_path) and path.parent.parent == tmp_path
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left
    info = json.loads((path / "build_info.json").read_text())
    assert info["config"]["hidden_size"] == 32 and info["metrics"]["validation_perplexity"] > 1
    # the induction probe is recorded (a tiny model cannot copy: both copies near ln(vocab))
    metrics = info["metrics"]
    assert metrics["induction_second_nll"] > 0.5 * metrics["induction_first_nll"] > 0

    stamp = (path / "build_info.json").stat().st_mtime_ns
    start = time.perf_counter()
    assert build_base_model(config, cache_dir=tmp_path, progress=False) == path
    assert time.perf_counter() - start < 1.0  # reused, not retrained
    assert (path / "build_info.json").stat().st_mtime_ns == stamp

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.max_position_embeddings == 32 and model.config.num_key_value_heads == 1
    assert model.config.vocab_size == len(tok) == 300
    ids = torch.tensor([tok("def f(x):")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], 300)

    loaded, tok2 = load_base_model(str(path))
    assert not loaded.training and tok2.eos_token == "</s>"
    again, _ = resolve_base_model(str(path))
    assert str(again) == str(path)


def test_build_is_deterministic_across_dirs(corpus_dir, tmp_path):
    config = tiny_base_config(corpus_dir)
    a = _state(build_base_model(config, cache_dir=tmp_path / "a", progress=False))
    b = _state(build_base_model(config, cache_dir=tmp_path / "b", progress=False))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # a different seed is a different model (and a different cache entry)
    assert base_model_path(tiny_base_config(corpus_dir, seed=1), tmp_path / "a") != base_model_path(
        config, tmp_path / "a"
    )


def test_force_rebuilds_atomically(corpus_dir, tmp_path):
    config = tiny_base_config(corpus_dir)
    path = build_base_model(config, cache_dir=tmp_path, progress=False)
    stamp = (path / "build_info.json").stat().st_mtime_ns
    time.sleep(0.01)
    assert build_base_model(config, cache_dir=tmp_path, force=True, progress=False) == path
    assert (path / "build_info.json").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_cache_key_follows_config(corpus_dir, tmp_path):
    a = base_model_path(tiny_base_config(corpus_dir), tmp_path)
    assert a == base_model_path(tiny_base_config(corpus_dir), tmp_path)
    assert a != base_model_path(tiny_base_config(corpus_dir, steps=5), tmp_path)
    # the retrieval mix is part of the build: each knob changes the key
    keys = {
        base_model_path(tiny_base_config(corpus_dir, **mix), tmp_path)
        for mix in (
            {},
            {"passkey_fraction": 0.25},
            {"passkey_fraction": 0.5},
            {"kv_fraction": 0.25},
        )
    }
    assert len(keys) == 4


def test_default_base_mixes_retrieval():
    config = BaseModelConfig()
    assert 0 < config.passkey_fraction < 1 and 0 < config.kv_fraction < 1


def _mix_config(corpus_dir, **overrides):
    fields = dict(
        context_length=256, vocab_size=400, batch_size=4, passkey_fraction=0.5, kv_fraction=0.25
    )
    return tiny_base_config(corpus_dir, **{**fields, **overrides})


def test_retrieval_mix_counts_and_content(corpus_dir):
    from loravariants.base_model import _RetrievalMix
    from loravariants.data import join_with_eos, load_corpus, tokenize_documents, train_tokenizer

    config = _mix_config(corpus_dir, batch_size=3)
    corpus = load_corpus(str(corpus_dir))
    texts = [d.text for d in corpus.train]
    tokenizer = train_tokenizer(texts, 400)
    stream = join_with_eos(tokenize_documents(texts, tokenizer), tokenizer.eos_token_id)
    mix = _RetrievalMix(config, tokenizer, stream, texts)
    # 3 x 0.5 and 3 x 0.25 blocks per step on average: over 8 steps exactly 12 and 6
    n_passkey = [mix._count(step, 0.5) for step in range(8)]
    n_kv = [mix._count(step, 0.25) for step in range(8)]
    assert sum(n_passkey) == 12 and sum(n_kv) == 6
    assert all(a + b <= 3 for a, b in zip(n_passkey, n_kv, strict=True))
    batches = [mix.blocks(step) for step in range(8)]
    assert [b.shape[0] for b, _ in batches] == [a + b for a, b in zip(n_passkey, n_kv, strict=True)]
    text = [tokenizer.decode(row) for b, _ in batches for row in b]
    assert all(len(row) == 256 for b, _ in batches for row in b)
    assert sum("What is the pass key? The pass key is" in t for t in text) == 12
    assert sum("\nassert " in t for t in text) == 6
    # the answer mask covers the end of each block: the key after the question, or the lookups
    for blocks, mask in batches:
        assert mask.shape == blocks.shape
        for row, m in zip(blocks, mask, strict=True):
            n = int(m.sum())
            assert 1 <= n < 256 and m[-n:].all()
            answer = tokenizer.decode(row[-n:])
            if tokenizer.decode(row[:-n]).endswith("What is the pass key? The pass key is"):
                assert answer.strip().rstrip(".").isdigit()
            else:
                assert "assert" in answer
    # seeded: the same config gives the same blocks
    again = _RetrievalMix(config, tokenizer, stream, texts)
    for step in range(8):
        b, m = again.blocks(step)
        assert torch.equal(b, batches[step][0]) and torch.equal(m, batches[step][1])


def test_build_with_retrieval_mix_is_deterministic(corpus_dir, tmp_path):
    config = _mix_config(corpus_dir)
    a = _state(build_base_model(config, cache_dir=tmp_path / "a", progress=False))
    b = _state(build_base_model(config, cache_dir=tmp_path / "b", progress=False))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    plain = _state(
        build_base_model(
            _mix_config(corpus_dir, passkey_fraction=0.0, kv_fraction=0.0),
            cache_dir=tmp_path / "c",
            progress=False,
        )
    )
    assert any(not torch.equal(a[k], plain[k]) for k in a)
    # the answer term changes the update (and the cache key)
    weighted = _mix_config(corpus_dir, answer_loss_weight=1.0)
    assert base_model_path(weighted, tmp_path) != base_model_path(config, tmp_path)
    c = _state(build_base_model(weighted, cache_dir=tmp_path / "d", progress=False))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_too_short_context_for_passkey_is_a_clear_error(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="passkey_fraction"):
        build_base_model(
            tiny_base_config(corpus_dir, passkey_fraction=0.25), cache_dir=tmp_path, progress=False
        )
    assert not (tmp_path / "base-models").exists() or not any((tmp_path / "base-models").iterdir())


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "loravariants"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "loravariants"


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", 0),
        ("num_heads", 3),  # 32 is not a multiple of 3
        ("num_kv_heads", 3),
        ("vocab_size", 100),
        ("lr", 0.0),
        ("steps", 1.5),
        ("validation_fraction", 1.0),
        ("min_lr_ratio", 2.0),
        ("passkey_fraction", 1.0),
        ("kv_fraction", -0.1),
        ("kv_fraction", 0.9),  # with passkey 0.25 (as set below): no plain text left
        ("answer_loss_weight", -1.0),
    ],
)
def test_bad_config_raises(corpus_dir, field, value):
    with pytest.raises(ValueError, match=field):
        tiny_base_config(corpus_dir, **{"passkey_fraction": 0.25, field: value})


def test_missing_local_model_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        resolve_base_model(str(tmp_path / "no-such-model"))


def test_cli_function_reuses_cache(corpus_dir, tmp_path, capsys, monkeypatch):
    # The CLI always builds the default config; point it at a cached tiny build instead.
    import loravariants.base_model as bm

    config = tiny_base_config(corpus_dir)
    path = build_base_model(config, cache_dir=tmp_path, progress=False)
    monkeypatch.setattr(bm, "BaseModelConfig", lambda: config)
    assert pretrain_base_main(["--cache-dir", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(path) and "reused" in out.err


# ---------------------------------------------------------------- recipes, device, acceptance


def test_recipes_keep_the_default_and_share_the_family():
    from loravariants.base_model import RECIPES, recipe_config

    assert recipe_config("cpu") == BaseModelConfig()
    # the default base's cache key must not move (cached bases and recorded figures use it)
    assert BaseModelConfig().key() == BaseModelConfig().key("cpu") == "75a32dcb6592"
    assert BaseModelConfig().key("cuda") != BaseModelConfig().key()
    gpu, cpu = recipe_config("gpu"), BaseModelConfig()
    for field in ("context_length", "vocab_size", "tokenizer_chars", "data_source", "seed"):
        assert getattr(gpu, field) == getattr(cpu, field), field
    assert gpu.passkey_fraction > 0 and gpu.kv_fraction > 0  # the retrieval mix stays
    assert gpu.hidden_size * gpu.num_layers > cpu.hidden_size * cpu.num_layers
    assert gpu.steps * gpu.batch_size > 10 * cpu.steps * cpu.batch_size
    assert set(RECIPES) == {"cpu", "gpu", "gpu-1k"}
    long = recipe_config("gpu-1k")
    assert long.context_length == 1024 and long.batch_size * 1024 == gpu.batch_size * 256
    with pytest.raises(ValueError, match="recipe must be one of"):
        recipe_config("tpu")


def test_device_cuda_without_cuda_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    from loravariants.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["pretrain-base", "--device", "cuda", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA is not available" in err
    assert not any(tmp_path.iterdir())  # refused before any work
    assert main(["pretrain-base", "--recipe", "gpu", "--config", "x.yaml"]) == 2
    assert "not both" in capsys.readouterr().err


def test_build_records_recipe_and_device(corpus_dir, tmp_path):
    config = tiny_base_config(corpus_dir)
    path = build_base_model(
        config, cache_dir=tmp_path, progress=False, device="auto", acceptance_prompts=5
    )
    record = json.loads((path / "build_info.json").read_text())
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert record["device"] == expected and record["recipe"] == "custom"
    # too few held-out tokens in this corpus for 4x the context: recorded as absent
    assert record["metrics"]["acceptance"] is None


def _tiny_retrieval_model(corpus_dir, tmp_path):
    from loravariants.data import join_with_eos, load_corpus, tokenize_documents

    path = build_base_model(_mix_config(corpus_dir, steps=2), cache_dir=tmp_path, progress=False)
    model, tokenizer = load_base_model(str(path))
    texts = [d.text for d in load_corpus(str(corpus_dir)).train]
    stream = join_with_eos(tokenize_documents(texts, tokenizer), tokenizer.eos_token_id)
    return model, tokenizer, stream


def test_acceptance_measurements_at_tiny_size(corpus_dir, tmp_path):
    from loravariants.base_model import ACCEPTANCE, acceptance_measurements
    from loravariants.evaluate import perplexity

    model, tokenizer, stream = _tiny_retrieval_model(corpus_dir, tmp_path)
    out = acceptance_measurements(model, tokenizer, stream, 256, 150.0, prompts=3)
    assert out["prompts"] == 3 and out["native"] == 256 and out["factor"] == 4
    for key in ("passkey_native", "passkey_4x_no_pi_beyond_native"):
        assert out[key] in (0.0, 1 / 3, 2 / 3, 1.0)
    # the perplexities are the library's own, on the same tokens at both lengths
    assert out["ppl_native_no_pi"] == pytest.approx(perplexity(model, stream, 256, 128))
    assert out["ppl_4x_no_pi"] == pytest.approx(perplexity(model, stream, 1024, 512))
    checks = out["checks"]
    assert set(checks) == {
        "passkey_native",
        "passkey_4x_no_pi",
        "ppl_4x_clearly_above_1x",
        "validation_perplexity_no_worse",
    }
    assert checks["validation_perplexity_no_worse"] is False  # 150 > 131.77
    assert checks["passkey_native"] is (out["passkey_native"] >= ACCEPTANCE["passkey_native_min"])
    assert out["accepted"] is False
    with pytest.raises(ValueError, match="val_tokens"):
        acceptance_measurements(model, tokenizer, stream[:1000], 256, 100.0, prompts=1)


def test_acceptance_places_the_4x_keys_beyond_the_native_length(monkeypatch, corpus_dir, tmp_path):
    import loravariants.evaluate as ev
    from loravariants.base_model import acceptance_measurements

    model, tokenizer, stream = _tiny_retrieval_model(corpus_dir, tmp_path)
    calls = []

    def fake(model, tokenizer, length, trials, seed, depth_range):
        calls.append((length, depth_range))
        hit = length < 256  # "retrieves" at the native length only
        return [ev.PasskeyTrial(seed, length, 0.5, 1, hit, "") for _ in range(trials)]

    monkeypatch.setattr(ev, "passkey_trials", fake)
    out = acceptance_measurements(model, tokenizer, stream, 256, 100.0, prompts=100)
    assert calls[0] == (240, (0.0, 1.0))
    length, (low, high) = calls[1]
    assert length == 1008 and low == 0 and high == pytest.approx(1 - 1.25 / 4)
    assert out["passkey_native"] == 1.0 and out["passkey_4x_no_pi_beyond_native"] == 0.0
    assert out["checks"]["passkey_native"] and out["checks"]["passkey_4x_no_pi"]


def test_passkey_trials_pair_and_spread_depths(corpus_dir, tmp_path):
    from loravariants.evaluate import passkey_trials

    model, tokenizer, _ = _tiny_retrieval_model(corpus_dir, tmp_path)
    a = passkey_trials(model, tokenizer, 250, 4, seed=3, depth_range=(0.2, 0.6))
    b = passkey_trials(model, tokenizer, 250, 4, seed=3, depth_range=(0.2, 0.6))
    assert [t.depth for t in a] == pytest.approx([0.25, 0.35, 0.45, 0.55])
    assert [(t.seed, t.hit, t.answer) for t in a] == [(t.seed, t.hit, t.answer) for t in b]
    assert all(t.length <= 250 and 0 < t.key_distance < t.length for t in a)
    assert a[0].key_distance > a[-1].key_distance  # deeper keys sit nearer the question
    with pytest.raises(ValueError, match="depth_range"):
        passkey_trials(model, tokenizer, 250, 1, depth_range=(0.7, 0.2))
