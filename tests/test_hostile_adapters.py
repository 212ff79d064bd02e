"""Hostile adapter folders of a second audit (issue 27: items 3, 5-11, 13, 17).

Nothing deleted that is not ours, nothing allocated before its size is known from the bytes
actually present, nothing non-finite or non-float loaded, and a failed load or attach leaves
the model as it was. Every refusal is one ``ValueError`` line naming the file.
"""

from __future__ import annotations

import json
import math
import resource
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file, save_file

import loravariants as lv
from loravariants.adapters import LoRAConfig, MixLoRAConfig
from loravariants.adapters.host import AdapterHost
from loravariants.cli import main
from loravariants.io import read_factors

CONFIG = {
    "native": "loravariants_config.json",
    "peft": "adapter_config.json",
    "mixlora": "adapter_config.json",
}
WEIGHTS = {
    "native": "adapter_model.safetensors",
    "peft": "adapter_model.safetensors",
    "mixlora": "adapter_model.bin",
}
FORMATS = list(CONFIG)


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One adapter folder per format, written once."""
    root = tmp_path_factory.mktemp("adapters")
    lora = lv.attach(make_tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lv.save_adapter(lora, root / "native", format="native")
    lv.save_adapter(lora, root / "peft", format="peft")
    mix = lv.attach(make_tiny_llama(), MixLoRAConfig(num_experts=2, top_k=1, r=2))
    with pytest.warns(UserWarning):  # dropout 0 and no base name: the reference loaders' needs
        lv.save_adapter(mix, root / "mixlora", format="mixlora")
    return root


def _copy(saved: Path, tmp_path: Path, fmt: str) -> Path:
    folder = tmp_path / fmt
    folder.mkdir()
    for f in (saved / fmt).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def _edit_config(folder: Path, fmt: str, edit) -> None:
    file = folder / CONFIG[fmt]
    meta = json.loads(file.read_text())
    edit(meta)
    file.write_text(json.dumps(meta))


def _edit_tensors(folder: Path, fmt: str, edit) -> None:
    """Rewrite the weights file after ``edit(dict of tensors)``."""
    file = folder / WEIGHTS[fmt]
    if fmt == "mixlora":
        tensors = torch.load(file, weights_only=True)
        edit(tensors)
        torch.save(tensors, file)
    else:
        tensors = load_file(file)
        edit(tensors)
        save_file(tensors, file, metadata={"format": "pt"})


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _refused_unchanged(model, before, load, *names) -> str:
    """``load()`` raises one ValueError line naming ``names``; the model is as it was."""
    with pytest.raises(ValueError) as info:
        load()
    message = str(info.value)
    assert "\n" not in message and len(message) < 1000, message
    for name in names:
        assert str(name) in message, message
    assert not lv.adapter_names(model)
    now = model.state_dict()
    assert now.keys() == before.keys()
    assert all(torch.equal(before[k], now[k]) for k in before)
    return message


# ---------------------------------------------------------------------------------------------
# item 3: a save never deletes a file that is not ours
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_never_deletes_a_users_readme(tmp_path, fmt):
    target = tmp_path / "a"
    target.mkdir()
    (target / "README.md").write_text("my notes\n")
    cfg = LoRAConfig(r=2) if fmt != "mixlora" else MixLoRAConfig(num_experts=2, top_k=1, r=2)
    model = lv.attach(make_tiny_llama(), cfg)
    with pytest.raises(ValueError, match="README.md"):
        lv.save_adapter(model, target, format=fmt, base_model_name_or_path="tiny")
    assert [p.name for p in target.iterdir()] == ["README.md"]
    assert (target / "README.md").read_text() == "my notes\n"


def test_save_never_replaces_an_adapter_written_by_someone_else(tmp_path, saved):
    """A folder of adapter-named files without our mark (a peft save, a hand-made folder)."""
    target = tmp_path / "theirs"
    target.mkdir()
    (target / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (target / "adapter_model.safetensors").write_bytes(b"their weights")
    model = lv.attach(make_tiny_llama(), LoRAConfig(r=2))
    with pytest.raises(ValueError, match="did not write"):
        lv.save_adapter(model, target, format="peft")
    assert (target / "adapter_model.safetensors").read_bytes() == b"their weights"
    # a folder of ours is replaced as before, in every format
    for fmt in FORMATS:
        ours = tmp_path / f"ours-{fmt}"
        ours.mkdir()
        for f in (saved / fmt).iterdir():
            (ours / f.name).write_bytes(f.read_bytes())
        if fmt == "mixlora":
            continue  # a LoRA adapter has no MixLoRA form
        lv.save_adapter(model, ours, format=fmt)
        assert lv.load_adapter(make_tiny_llama(), ours) is not None


# ---------------------------------------------------------------------------------------------
# item 5: the allocation bound comes from the bytes actually present
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [300_000, 50_000_000])
def test_a_sparse_file_or_link_beside_the_weights_raises_no_bound(saved, tmp_path, r):
    folder = _copy(saved, tmp_path, "native")
    sparse = tmp_path / "sparse.bin"
    with sparse.open("wb") as f:
        f.truncate(2**40)  # 1 TiB, no block stored
    (folder / "pad.bin").symlink_to(sparse)
    with (folder / "pad2.bin").open("wb") as f:
        f.truncate(2**40)
    _edit_config(folder, "native", lambda m: m["config"].update(r=r))
    model = make_tiny_llama()
    before, rss = _snapshot(model), _max_rss_mib()
    _refused_unchanged(model, before, lambda: lv.load_adapter(model, folder), folder)
    assert _max_rss_mib() - rss < 64, "allocated before the refusal"
    with pytest.raises(ValueError, match="native"):
        read_factors(folder)


def test_a_sparse_weights_file_is_refused_before_reading(saved, tmp_path):
    """A safetensors header declaring a 1 TiB tensor over a sparse file: nothing is read."""
    folder = _copy(saved, tmp_path, "native")
    header = json.dumps(
        {"adapter.x.lora_A": {"dtype": "F32", "shape": [2**38], "data_offsets": [0, 2**40]}}
    ).encode()
    weights = folder / WEIGHTS["native"]
    with weights.open("wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 2**40)
    model = make_tiny_llama()
    before = _snapshot(model)
    _refused_unchanged(
        model, before, lambda: lv.load_adapter(model, folder), weights, "bytes on disk"
    )


# ---------------------------------------------------------------------------------------------
# item 6: a MixLoRA .bin is checked before torch.load inflates it
# ---------------------------------------------------------------------------------------------


def test_a_compressed_mixlora_bin_is_refused_unread(saved, tmp_path):
    folder = _copy(saved, tmp_path, "mixlora")
    weights = folder / WEIGHTS["mixlora"]
    original = zipfile.ZipFile(weights)
    bomb = tmp_path / "bomb.bin"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as out:
        for entry in original.infolist():
            if not entry.filename.endswith("/data/0"):
                out.writestr(entry.filename, original.read(entry))
                continue
            # the first tensor's storage: 512 MiB of zeros, about 0.5 MB deflated
            with out.open(entry.filename, "w", force_zip64=True) as f:
                for _ in range(512):
                    f.write(bytes(2**20))
    original.close()
    bomb.replace(weights)
    assert weights.stat().st_size < 4 * 2**20
    model = make_tiny_llama()
    before, rss = _snapshot(model), _max_rss_mib()
    _refused_unchanged(
        model, before, lambda: lv.load_adapter(model, folder), weights, "is compressed;"
    )
    assert _max_rss_mib() - rss < 64, "inflated before the refusal"


def test_a_zero_stride_view_in_a_mixlora_bin_is_refused(saved, tmp_path):
    """A tensor of 2^40 values over a 4-byte storage (zero strides): a 2 KB file."""
    folder = _copy(saved, tmp_path, "mixlora")

    def expand(tensors):
        key = sorted(tensors)[-1]
        tensors[key] = torch.zeros(1).expand(2**20, 2**20)

    _edit_tensors(folder, "mixlora", expand)
    weights = folder / WEIGHTS["mixlora"]
    assert weights.stat().st_size < 2**20
    with pytest.raises(ValueError, match="view larger than"):
        read_factors(folder)
    model = make_tiny_llama()
    before = _snapshot(model)
    _refused_unchanged(model, before, lambda: lv.load_adapter(model, folder), weights, "view")


# ---------------------------------------------------------------------------------------------
# items 7 and 10: every JSON config read is size-capped and depth-checked
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_huge_sparse_config_is_refused_unread(saved, tmp_path, fmt):
    folder = _copy(saved, tmp_path, fmt)
    config = folder / CONFIG[fmt]
    text = config.read_bytes()
    with config.open("wb") as f:  # the real config, then 64 MiB of (sparse) NUL bytes
        f.write(text)
        f.truncate(64 * 2**20)
    model = make_tiny_llama()
    before = _snapshot(model)
    _refused_unchanged(model, before, lambda: lv.load_adapter(model, folder), config, "larger")
    with pytest.raises(ValueError, match="larger than"):
        read_factors(folder)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("depth", [100_000, 100])
def test_deeply_nested_config_json(saved, tmp_path, fmt, depth):
    folder = _copy(saved, tmp_path, fmt)
    config = folder / CONFIG[fmt]
    text = config.read_text().rstrip()
    assert text.endswith("}")
    config.write_text(text[:-1] + ', "nested": ' + "[" * depth + "]" * depth + "}")
    model = make_tiny_llama()
    before = _snapshot(model)
    _refused_unchanged(model, before, lambda: lv.load_adapter(model, folder), config, "nested")
    with pytest.raises(ValueError, match="nested deeper"):
        read_factors(folder)


# ---------------------------------------------------------------------------------------------
# item 8: reserved adapter names, and attach / load roll back fully
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["keys", "items", "values", "update", "training", "forward"])
def test_a_module_dict_attribute_is_no_adapter_name(name):
    model = make_tiny_llama()
    before = _snapshot(model)
    _refused_unchanged(model, before, lambda: lv.attach(model, LoRAConfig(r=2), name=name), name)
    assert not any(isinstance(m, AdapterHost) for m in model.modules())


def test_a_saved_reserved_name_is_refused_and_the_model_left_as_it_was(saved, tmp_path):
    folder = _copy(saved, tmp_path, "native")
    _edit_config(folder, "native", lambda m: m.update(adapter_name="keys"))
    model = make_tiny_llama()
    before = _snapshot(model)
    _refused_unchanged(model, before, lambda: lv.load_adapter(model, folder), "keys")
    assert not any(isinstance(m, AdapterHost) for m in model.modules())


def test_an_attach_failing_midway_leaves_no_module_wrapped(monkeypatch):
    """The third layer's construction fails: the two wrapped before are unwrapped again."""
    model = make_tiny_llama()
    lv.attach(model, LoRAConfig(r=2, target_modules=["q_proj"]), name="first")
    before = _snapshot(model)
    calls = []
    real = LoRAConfig.create_layer

    def failing(self, path, module):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(self, path, module)

    monkeypatch.setattr(LoRAConfig, "create_layer", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        lv.attach(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]), name="second")
    assert lv.adapter_names(model) == ["first"]
    assert model.state_dict().keys() == before.keys()
    hosts = [m for m in model.modules() if isinstance(m, AdapterHost)]
    assert len(hosts) == 2 and all(list(h.adapters) == ["first"] for h in hosts)


# ---------------------------------------------------------------------------------------------
# item 9: the saved context extension is validated, and applied inside the rollback
# ---------------------------------------------------------------------------------------------

NATIVE_LENGTH = 32
GOOD_EXTENSION = {"method": "linear", "factor": 4.0, "original_length": 32, "target_length": 128}
BAD_EXTENSIONS = [
    {"method": "linear"},
    "linear x4",
    [1, 2],
    {**GOOD_EXTENSION, "method": "ntk-by-parts"},
    {**GOOD_EXTENSION, "target_length": "128"},
    {**GOOD_EXTENSION, "target_length": 128.5},
    {**GOOD_EXTENSION, "original_length": True},
    {**GOOD_EXTENSION, "factor": "4"},
    {**GOOD_EXTENSION, "factor": 1e300, "target_length": 10**9},
    {**GOOD_EXTENSION, "factor": math.nan},
    {**GOOD_EXTENSION, "factor": 0.5, "target_length": 16},  # shrinking
    {**GOOD_EXTENSION, "factor": 2.0},  # 32 x 2 is not 128
    {**GOOD_EXTENSION, "original_length": 16, "target_length": 64},  # another base's length
    {**GOOD_EXTENSION, "unknown": 1},
]


@pytest.mark.parametrize("fmt", ["native", "peft"])
@pytest.mark.parametrize("extension", BAD_EXTENSIONS, ids=lambda e: repr(e)[:40])
def test_a_bad_saved_context_extension_is_refused(tmp_path, fmt, extension):
    model = lv.attach(make_tiny_llama(max_position_embeddings=NATIVE_LENGTH), LoRAConfig(r=2))
    lv.save_adapter(model, tmp_path / "a", format=fmt)
    key = "context_extension" if fmt == "native" else "loravariants_context_extension"
    _edit_config(tmp_path / "a", fmt, lambda m: m.update({key: extension}))
    plain = make_tiny_llama(max_position_embeddings=NATIVE_LENGTH)
    before = _snapshot(plain)
    rope = json.dumps(plain.config.rope_parameters, sort_keys=True)
    file = tmp_path / "a" / CONFIG[fmt]
    _refused_unchanged(plain, before, lambda: lv.load_adapter(plain, tmp_path / "a"), file)
    assert json.dumps(plain.config.rope_parameters, sort_keys=True) == rope
    assert plain.config.max_position_embeddings == NATIVE_LENGTH
    with pytest.raises(ValueError, match=str(file)):
        lv.apply_saved_context(plain, tmp_path / "a")


def test_a_saved_extension_that_fails_to_apply_takes_the_adapter_out(tmp_path, monkeypatch):
    """Applied inside the rollback: its failure leaves no adapter attached."""
    import loravariants.longlora.context as context

    model = lv.attach(make_tiny_llama(max_position_embeddings=NATIVE_LENGTH), LoRAConfig(r=2))
    lv.save_adapter(model, tmp_path / "a")
    _edit_config(tmp_path / "a", "native", lambda m: m.update(context_extension=GOOD_EXTENSION))

    def broken(*args, **kwargs):
        raise ValueError("no rotary embedding module found")

    monkeypatch.setattr(context, "extend_context", broken)
    plain = make_tiny_llama(max_position_embeddings=NATIVE_LENGTH)
    before = _snapshot(plain)
    _refused_unchanged(plain, before, lambda: lv.load_adapter(plain, tmp_path / "a"), "rotary")


# ---------------------------------------------------------------------------------------------
# item 11: an invalid regex in peft's patterns
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["rank_pattern", "alpha_pattern"])
def test_an_invalid_pattern_regex_names_file_and_key(saved, tmp_path, capsys, key):
    folder = _copy(saved, tmp_path, "peft")
    _edit_config(folder, "peft", lambda m: m.update({key: {"q_proj(": 4}}))
    model = make_tiny_llama()
    before = _snapshot(model)
    config = folder / CONFIG["peft"]
    _refused_unchanged(model, before, lambda: lv.load_adapter(model, folder), config, key)
    assert main(["analyze", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------
# item 13: non-finite tensors are refused at load
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_tensor_is_refused_naming_it(saved, tmp_path, fmt, value):
    folder = _copy(saved, tmp_path, fmt)
    poisoned = []

    def poison(tensors):
        key = sorted(tensors)[-1]
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
        poisoned.append(key)

    _edit_tensors(folder, fmt, poison)
    model = make_tiny_llama()
    before = _snapshot(model)
    weights = folder / WEIGHTS[fmt]
    _refused_unchanged(
        model, before, lambda: lv.load_adapter(model, folder), weights, poisoned[0], "non-finite"
    )
    with pytest.raises(ValueError, match="non-finite"):
        read_factors(folder)


# ---------------------------------------------------------------------------------------------
# item 17: no lenient parsing of MixLoRA fields or of tensor dtypes
# ---------------------------------------------------------------------------------------------

LENIENT = [
    ("lora_alpha", "8"),
    ("lora_alpha", True),
    ("lora_dropout", "0.1"),
    ("lora_dropout", False),
    ("expert_lora.lora_alpha", "8"),
    ("expert_lora.lora_alpha", True),
    ("expert_lora.lora_dropout", "0.1"),
    ("router_aux_loss_coef", "0.01"),
    ("router_init_range", True),
    ("jitter_noise", "0"),
    ("expert_lora", [1]),
    ("target_modules", "q_proj"),
]


@pytest.mark.parametrize("field, value", LENIENT, ids=[f"{f}={v!r}" for f, v in LENIENT])
def test_a_mixlora_field_is_not_coerced(saved, tmp_path, field, value):
    folder = _copy(saved, tmp_path, "mixlora")

    def edit(meta):
        node = meta
        *parents, last = field.split(".")
        for part in parents:
            node = node[part]
        node[last] = value

    _edit_config(folder, "mixlora", edit)
    model = make_tiny_llama()
    before = _snapshot(model)
    config = folder / CONFIG["mixlora"]
    _refused_unchanged(model, before, lambda: lv.load_adapter(model, folder), config, last(field))
    with pytest.raises(ValueError, match=last(field)):
        read_factors(folder)


def last(field: str) -> str:
    return field.rsplit(".", 1)[-1]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, torch.uint8])
def test_a_non_float_tensor_is_refused_naming_it(saved, tmp_path, fmt, dtype):
    folder = _copy(saved, tmp_path, fmt)
    changed = []

    def cast(tensors):
        key = sorted(tensors)[0]
        tensors[key] = torch.ones_like(tensors[key], dtype=dtype)
        changed.append(key)

    _edit_tensors(folder, fmt, cast)
    model = make_tiny_llama()
    before = _snapshot(model)
    weights = folder / WEIGHTS[fmt]
    _refused_unchanged(
        model, before, lambda: lv.load_adapter(model, folder), weights, changed[0], "floating"
    )
    with pytest.raises(ValueError, match="floating"):
        read_factors(folder)


def test_an_integer_buffer_loads_and_takes_no_float(tmp_path):
    """COLA's link index is an int64 buffer: it loads as one, and a float in its place (or
    an integer in a float's) is refused, not cast."""
    from loravariants.adapters import COLAConfig

    model = lv.attach(make_tiny_llama(), COLAConfig(r=2))
    lv.save_adapter(model, tmp_path / "a")
    lv.load_adapter(make_tiny_llama(), tmp_path / "a")  # the round trip still works

    def float_index(tensors):
        key = next(k for k in sorted(tensors) if k.endswith("link_index"))
        tensors[key] = tensors[key].float() + 0.5

    _edit_tensors(tmp_path / "a", "native", float_index)
    plain = make_tiny_llama()
    before = _snapshot(plain)
    weights = tmp_path / "a" / WEIGHTS["native"]
    _refused_unchanged(plain, before, lambda: lv.load_adapter(plain, tmp_path / "a"), weights)


FALSY = [
    ("peft", "use_dora", 0),
    ("peft", "fan_in_fan_out", 0),
    ("peft", "layers_to_transform", 0),  # peft reads it as "layer 0 only"
    ("peft", "modules_to_save", 0),
    ("peft", "target_modules", 0),
    ("peft", "alpha_pattern", 0),
    ("peft", "rank_pattern", False),
    ("native", "extra_trainable", False),
    ("native", "modules", "4"),
]


@pytest.mark.parametrize("fmt, field, value", FALSY, ids=[f"{f}-{k}={v!r}" for f, k, v in FALSY])
def test_a_zero_or_false_is_not_null(saved, tmp_path, fmt, field, value):
    folder = _copy(saved, tmp_path, fmt)
    _edit_config(folder, fmt, lambda m: m.update({field: value}))
    model = make_tiny_llama()
    before = _snapshot(model)
    _refused_unchanged(model, before, lambda: lv.load_adapter(model, folder), folder, field)
