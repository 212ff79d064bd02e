"""Hostile inputs: every field of every adapter format and every config key, given wrong
types, NaN/inf, negatives, huge values and path separators.

Each must give one clear error (a ``ValueError`` naming the file or key; from the CLI one line
on stderr and exit status 2), allocate nothing large, and leave existing files as they were.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

import loravariants as lv
from loravariants.adapters import LoRAConfig, MixLoRAConfig
from loravariants.cli import main
from loravariants.evaluate import perplexity
from loravariants.io import read_factors

HUGE = 10**9
# values no field of ours accepts as is (a string is never coerced to a number)
WRONG = ["4", 4.7, -1, 0, HUGE, math.nan, math.inf, -math.inf, True, [1, 2], {"a": 1}, "../x"]


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _set(meta: dict, key: str, value) -> None:
    node = meta
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------
# adapter files
# ---------------------------------------------------------------------------------------------

NATIVE_FIELDS = [
    "config.r",
    "config.alpha",
    "config.dropout",
    "config.target_modules",
    "config.rank_pattern",
    "config.alpha_pattern",
    "config.use_rslora",
    "config.variant",
    "adapter_name",
    "modules",
    "extra_trainable",
]
PEFT_FIELDS = [
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "modules_to_save",
    "peft_type",
    "bias",
    "use_dora",
    "fan_in_fan_out",
    "layers_to_transform",
]
MIXLORA_FIELDS = [
    "num_experts",
    "top_k",
    "r",
    "lora_alpha",
    "lora_dropout",
    "expert_lora.r",
    "expert_lora.lora_alpha",
    "target_modules",
    "router_aux_loss_coef",
    "router_init_range",
    "jitter_noise",
    "act_fn",
    "peft_type",
]
# sizes that must be refused before anything is allocated, and lenient parses (item 7)
MUST_REFUSE = {
    ("native", "config.r"): WRONG,
    ("peft", "r"): WRONG,
    ("peft", "rank_pattern"): [{"q_proj": HUGE}, {"q_proj": 4.7}, {"q_proj": "4"}],
    ("mixlora", "num_experts"): WRONG,
    ("mixlora", "r"): WRONG,
    ("mixlora", "expert_lora.r"): [HUGE, 4.7, "4", -1, 0],
    ("mixlora", "top_k"): ["1", 1.5, -1, HUGE],
}
CONFIG_FILES = {
    "native": "loravariants_config.json",
    "peft": "adapter_config.json",
    "mixlora": "adapter_config.json",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One adapter directory per format (module-scoped: written once)."""
    root = tmp_path_factory.mktemp("adapters")
    lora = lv.attach(make_tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lv.save_adapter(lora, root / "native", format="native")
    lv.save_adapter(lora, root / "peft", format="peft")
    mix = lv.attach(make_tiny_llama(), MixLoRAConfig(num_experts=2, top_k=1, r=2))
    lv.save_adapter(mix, root / "mixlora", format="mixlora")
    return root


def _cases():
    for fmt, fields in (
        ("native", NATIVE_FIELDS),
        ("peft", PEFT_FIELDS),
        ("mixlora", MIXLORA_FIELDS),
    ):
        for field in fields:
            for value in MUST_REFUSE.get((fmt, field), WRONG):
                yield pytest.param(fmt, field, value, id=f"{fmt}-{field}-{value!r}")


def _copy_of(saved, tmp_path, fmt):
    """A copy of the saved ``fmt`` adapter: its folder, config file and parsed config."""
    folder = tmp_path / fmt
    folder.mkdir()
    for f in (saved / fmt).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config_file = folder / CONFIG_FILES[fmt]
    return folder, config_file, json.loads(config_file.read_text())


@pytest.mark.parametrize("fmt, field, value", list(_cases()))
def test_hostile_adapter_field(saved, tmp_path, fmt, field, value):
    folder, config_file, meta = _copy_of(saved, tmp_path, fmt)
    _set(meta, field, value)
    config_file.write_text(json.dumps(meta))
    before = _tree_digest(folder)
    rss = _max_rss_mib()
    model = make_tiny_llama()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        lv.load_adapter(model, folder)
    except ValueError as e:
        message = str(e)
        assert str(folder) in message and "\n" not in message.strip(), message
        # nothing half-loaded: the model is as it was
        assert not lv.adapter_names(model)
        assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    else:
        assert (fmt, field) not in MUST_REFUSE, f"{field}={value!r} was accepted"
    assert _max_rss_mib() - rss < 256, "a large allocation was attempted"
    assert _tree_digest(folder) == before


@pytest.mark.parametrize("fmt", ["native", "peft", "mixlora"])
def test_hostile_adapter_files_read_factors(saved, tmp_path, fmt):
    """read_factors (analysis without a model) refuses huge sizes too."""
    folder, config_file, meta = _copy_of(saved, tmp_path, fmt)
    if fmt == "native":
        module = next(iter(meta["modules"]))
        meta["modules"][module]["in"] = HUGE
    else:
        meta["r"] = 4.7
    config_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=str(folder)):
        read_factors(folder)


# ---------------------------------------------------------------------------------------------
# experiment configs, through the CLI
# ---------------------------------------------------------------------------------------------

CONFIG_CASES = [
    # (override, what the message names)
    ("runs=[{name: ../../../escaped, adapter: lora}]", "runs[].name"),
    ("runs=[{name: a/b, adapter: lora}]", "runs[].name"),
    ("runs=[{name: .hidden, adapter: lora}]", "runs[].name"),
    ("runs=[{name: '', adapter: lora}]", "runs[].name"),
    ("runs=[{name: [1], adapter: lora}]", "runs[].name"),
    ("runs=[{name: x, adapter: 5}]", "adapter"),
    ("runs=[{name: x, adapter: lora, trainable: [../x]}]", "trainable"),
    ("runs=[{name: x, adapter: lora, extend_context: 1}]", "extend_context"),
    ("runs=[{name: x, adapter: lora, attention: [sdpa]}]", "attention"),
    ("runs=[{name: x, adapter: lora, overrides: 5}]", "overrides"),
    ("runs=[{name: x, adapter: lora, overrides: {r: 1e9}}]", "r"),
    ("runs=5", "runs"),
    ("spec_dir=5", "spec_dir"),
    ("output_dir=5", "output_dir"),
    ("base_model=[x]", "base_model"),
    ("base_model_config=5", "base_model_config"),
    ("seeds=[-1]", "seeds"),
    ("seeds=[1.5]", "seeds"),
    ("seeds=abc", "seeds"),
    ("match_params=-3", "match_params"),
    ("concurrent=yes please", "concurrent"),
    ("data.text_field=[1, 2]", "text_field"),
    ("data.text_field=5", "text_field"),
    ("data.source=5", "source"),
    ("data.max_documents=-5", "max_documents"),
    ("data.max_documents=1.5", "max_documents"),
    ("data.validation_fraction=.nan", "validation_fraction"),
    ("data.validation_fraction=1e300", "validation_fraction"),
    ("context.target_length=1.5", "target_length"),
    ("context.target_length=-4", "target_length"),
    ("context.method=[linear]", "method"),
    ("context.attention=../x", "attention"),
    ("context.group_size_ratio=.inf", "group_size_ratio"),
    ("train.lr=.nan", "lr"),
    ("train.lr=-1", "lr"),
    ("train.lr=abc", "lr"),
    ("train.lr=[1]", "lr"),
    ("train.max_steps=-1", "max_steps"),
    ("train.max_steps=1.5", "max_steps"),
    ("train.max_steps='10'", "max_steps"),
    ("train.batch_size=0", "batch_size"),
    ("train.batch_size=.inf", "batch_size"),
    ("train.grad_accum=true", "grad_accum"),
    ("train.betas=[0.9]", "betas"),
    ("train.betas=[0.9, 2]", "betas"),
    ("train.betas=.nan", "betas"),
    ("train.weight_decay=-.inf", "weight_decay"),
    ("train.warmup_steps=-1", "warmup_steps"),
    ("train.schedule=[constant]", "schedule"),
    ("train.max_grad_norm=.nan", "max_grad_norm"),
    ("train.gradient_checkpointing=yes please", "gradient_checkpointing"),
    ("train.mixed_precision=[no]", "mixed_precision"),
    ("train.seed=-1", "seed"),
    ("train.save_every=-1", "save_every"),
    ("train.keep_last=0", "keep_last"),
    ("train.log_every=0.5", "log_every"),
    ("train.nonsense=1", "nonsense"),
    ("eval.lengths=[64.9]", "eval.lengths"),
    ("eval.lengths=64", "eval.lengths"),
    ("eval.lengths=[-1]", "eval.lengths"),
    ("eval.lengths=[.inf]", "eval.lengths"),
    ("eval.max_tokens=-1", "max_tokens"),
    ("eval.stride_ratio=2", "stride_ratio"),
    ("eval.passkey_lengths=5", "passkey_lengths"),
    ("eval.passkey_lengths=[1.5]", "passkey_lengths"),
    ("eval.passkey_trials=0", "passkey_trials"),
]


@pytest.fixture
def experiment(tmp_path):
    file = tmp_path / "exp.yaml"
    file.write_text(
        f"output_dir: {tmp_path / 'out'}\n"
        "train: {max_steps: 1}\n"
        "runs:\n  - {name: lora, adapter: lora}\n"
    )
    return file


@pytest.mark.parametrize("override, names", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_hostile_config_key_is_one_line_and_exit_2(experiment, capsys, override, names):
    before = experiment.read_bytes()
    assert main(["compare", "--config", str(experiment), "--quiet", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and names in err, err
    assert "Traceback" not in err
    assert experiment.read_bytes() == before
    assert not (experiment.parent / "out").exists()


def test_yaml_alias_bomb_is_refused_quickly(tmp_path, capsys):
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        bomb.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 10)}]")
    file = tmp_path / "bomb.yaml"
    file.write_text(
        "\n".join(bomb)
        + f"\noutput_dir: {tmp_path / 'out'}\ndata: {{text_field: *i}}\n"
        + "runs:\n  - {name: lora, adapter: lora}\n"
    )
    assert main(["compare", "--config", str(file), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "alias" in err


def test_yaml_1_1_exponent_without_dot_is_a_float(experiment):
    from loravariants.config import load_experiment

    config = load_experiment(experiment, ["train.lr=2e-4"])
    assert config.train.lr == 2e-4 and isinstance(config.train.lr, float)


def test_a_row_name_cannot_escape_the_output_folder(experiment):
    from loravariants.config import load_experiment

    for name in ["../../../escaped", "a/b", "a\\b", "..", "."]:
        with pytest.raises(ValueError, match="runs\\[\\].name"):
            load_experiment(experiment, [f"runs=[{{name: '{name}', adapter: lora}}]"])
    load_experiment(experiment, ["runs=[{name: lora-r8_v1.2, adapter: lora}]"])


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def test_token_id_out_of_range_names_the_vocabulary():
    model = make_tiny_llama()
    tokens = torch.arange(40) + 100  # vocabulary 128: ids 128.. are out of range
    with pytest.raises(ValueError, match="vocabulary of 128"):
        perplexity(model, tokens, context_length=16)
    with pytest.raises(ValueError, match="token id -1"):
        perplexity(model, torch.full((40,), -1), context_length=16)
