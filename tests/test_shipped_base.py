"""Shipped bases: export a built base, verify it by hash, refuse a tampered one (tiny bases)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from conftest import tiny_base_config, write_tiny_corpus

from loravariants.base_model import build_base_model, resolve_base_model
from loravariants.shipped_base import (
    MANIFEST,
    SHIPPED_DIR,
    ShippedBaseError,
    base_weights_sha256,
    export_shipped_base,
    find_shipped_base,
    verify_shipped_base,
    weights_hash,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    write_tiny_corpus(corpus)
    config = tiny_base_config(corpus)
    return config, build_base_model(config, cache_dir=tmp_path_factory.mktemp("c"), progress=False)


def _state(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def test_export_round_trips_bit_identical(built, tmp_path):
    config, build = built
    manifest = export_shipped_base(build, tmp_path / "tiny", name="tiny")
    shipped = tmp_path / "tiny"
    assert manifest == verify_shipped_base(shipped)
    assert manifest["config"] == asdict(config) and manifest["dtype"] == "float32"
    assert manifest["recipe"] == "custom" and manifest["metrics"]["validation_perplexity"] > 1
    assert set(manifest["files"]) == {p.name for p in shipped.iterdir()} - {MANIFEST}
    # float32: the very weights of the build, whatever the split into files
    a, b = _state(build), _state(shipped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert manifest["weights_sha256"] == weights_hash(build) == base_weights_sha256(shipped)
    assert base_weights_sha256(build) == weights_hash(build)
    assert base_weights_sha256("some/hub-model") is None
    # the tokenizer travels with it
    path, tokenizer = resolve_base_model(str(shipped))
    assert path == shipped and tokenizer.eos_token == "</s>"


def test_small_file_limit_shards_the_weights(built, tmp_path):
    _, build = built
    manifest = export_shipped_base(build, tmp_path / "s", name="s", max_file_bytes=2**17)
    weights = [n for n in manifest["files"] if n.endswith(".safetensors")]
    assert len(weights) > 1
    assert all((tmp_path / "s" / n).stat().st_size <= 2**17 for n in manifest["files"])
    assert manifest["weights_sha256"] == weights_hash(build)  # same tensors, other files


def test_half_precision_is_recorded_and_hashes_differently(built, tmp_path):
    _, build = built
    manifest = export_shipped_base(build, tmp_path / "h", name="h", dtype="bfloat16")
    assert manifest["dtype"] == "bfloat16" and manifest["weights_sha256"] != weights_hash(build)
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_shipped_base(build, tmp_path / "x", name="x", dtype="int8")


def test_a_tampered_byte_is_refused(built, tmp_path):
    _, build = built
    export_shipped_base(build, tmp_path / "t", name="t")
    shipped = tmp_path / "t"
    weights = next(shipped.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ShippedBaseError, match=f"{weights.name} has sha256") as info:
        verify_shipped_base(shipped)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(ShippedBaseError):  # never used silently, by any path
        resolve_base_model(str(shipped))


def test_missing_extra_and_unreadable_files_are_refused(built, tmp_path):
    _, build = built
    for case in ("missing", "extra", "manifest"):
        shipped = tmp_path / case
        export_shipped_base(build, shipped, name=case)
        if case == "missing":
            (shipped / "config.json").unlink()
            match = "config.json is missing"
        elif case == "extra":
            (shipped / "evil.safetensors").write_bytes(b"x")
            match = "evil.safetensors is not in its manifest"
        else:
            (shipped / MANIFEST).write_text("{not json")
            match = "unreadable manifest.json"
        with pytest.raises(ShippedBaseError, match=match):
            verify_shipped_base(shipped)


def test_export_never_overwrites(built, tmp_path):
    _, build = built
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="already exists"):
        export_shipped_base(build, tmp_path / "taken", name="x")
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="not a built base"):
        export_shipped_base(tmp_path / "taken", tmp_path / "new", name="x")
    assert not (tmp_path / "new").exists()


def test_default_uses_a_shipped_base_for_its_config(built, tmp_path, monkeypatch):
    import loravariants.shipped_base as sb

    config, build = built
    root = tmp_path / "bases"
    export_shipped_base(build, root / "tiny", name="tiny")
    assert find_shipped_base(asdict(config), root) == root / "tiny"
    assert find_shipped_base({**asdict(config), "seed": 9}, root) is None
    monkeypatch.setattr(sb, "SHIPPED_DIR", root)
    cache = tmp_path / "cache"
    path, _ = resolve_base_model("default", cache_dir=cache, config=config)
    assert path == root / "tiny" and not cache.exists()  # used, not rebuilt
    # damaged: refused with the one-line error, not silently rebuilt
    (root / "tiny" / "tokenizer.json").write_text("{}")
    with pytest.raises(ShippedBaseError, match="tokenizer.json"):
        resolve_base_model("default", cache_dir=cache, config=config)
    assert not cache.exists()


def test_the_package_ships_only_valid_bases():
    if not SHIPPED_DIR.is_dir():
        return  # nothing shipped in this version (docs/data.md says why)
    for folder in (p for p in SHIPPED_DIR.iterdir() if p.is_dir()):
        manifest = verify_shipped_base(folder)
        assert manifest["weights_sha256"] == weights_hash(folder)
        assert json.loads((folder / MANIFEST).read_text())["metrics"]["validation_perplexity"]


def test_cli_exports_a_verified_base(built, tmp_path, capsys, monkeypatch):
    import loravariants.base_model as bm
    from loravariants.cli import main

    config, build = built
    monkeypatch.setattr(bm, "BaseModelConfig", lambda: config)
    cache = build.parent.parent
    out = tmp_path / "export"
    assert main(["pretrain-base", "--cache-dir", str(cache), "--quiet", "--export", str(out)]) == 0
    err = capsys.readouterr().err
    manifest = verify_shipped_base(out)
    assert manifest["weights_sha256"] in err and manifest["weights_sha256"] == weights_hash(build)
    # a second export into the same folder is refused before any work
    assert main(["pretrain-base", "--cache-dir", str(cache), "--export", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
