"""LongLoRA's passkey experiment at GPU lengths, in one run: a pilot, then the training rows.

    python benchmarks/gpu_longcontext.py --out DIR [--base default|recipe:gpu|PATH]
        [--steps 200] [--batch 8] [--prompts 40] [--docs 32] [--train auto|always|never]
    python benchmarks/gpu_longcontext.py --out DIR --tiny     # a CPU check, seconds

What it does (sized for <= 8 min on one H200 with the built-in base; docs/benchmarks.md)::

    base (native n) --+-- no PI ------------------------------+
                      +-- linear PI to 4n (untrained) --------+--> evaluate at n, 2n, 4n
                                                              |      passkey: --prompts per
    pilot: is base-PI's passkey at 4n off floor and ceiling? -+      length, key depth inside
      no  -> stop (say which)                                         / beyond the native n
      yes -> train at 4n, bf16, one seed (loravariants.compare):     perplexity: long held-out
             lora, longlora (embed+norm, S2-Attn), longlora-fullattn, documents (stdlib files
             cola, multilora, mixlora (parameter-matched to longlora) concatenated per package)
          -> the same evaluation of each trained row
          -> paired statistics: exact McNemar per prompt (scipy.stats.binomtest),
             a t-interval over documents of the log-perplexity difference

It reuses the library throughout: ``base_model`` (build / shipped base), ``compare`` (the rows,
parameter matching, the one training loop), ``io.load_adapter`` (the trained rows, with their
context extension and embed/norm weights), ``evaluate`` (perplexity, ``passkey_trials``).
Seed variance is not measured (one seed); the report says so.

Writes ``DIR/gpu_longcontext.json`` (every per-prompt and per-document outcome) and
``DIR/gpu_longcontext.md`` (the tables), rewritten after every row, so a run stopped by a time
limit still leaves what it measured. ``DIR/train`` holds compare's own folder (results.json,
adapters) for the training rows.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from scipy import stats
from transformers import AutoModelForCausalLM

from loravariants.base_model import (
    BaseModelConfig,
    build_base_model,
    recipe_config,
    resolve_base_model,
)
from loravariants.compare import compare
from loravariants.compare.plan import count_adapter_params
from loravariants.compare.records import run_folder
from loravariants.config import CONFIG_DIR, load_adapter_spec, load_experiment
from loravariants.data import join_with_eos, load_corpus, tokenize_documents
from loravariants.evaluate import passkey_trials, perplexity
from loravariants.io import load_adapter
from loravariants.longlora import extend_context
from loravariants.shipped_base import base_weights_sha256

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FACTOR = 4  # the extension tested: LongLoRA's 4x (2k -> 8k in the paper)
#: the training rows (compare's RunSpec fields); all but `lora` train embed+norm (LongLoRA)
TRAIN_ROWS = [
    {"name": "lora", "adapter": "lora"},
    {"name": "longlora", "adapter": "lora", "trainable": ["embed", "norm"]},
    {
        "name": "longlora-fullattn",
        "adapter": "lora",
        "trainable": ["embed", "norm"],
        "attention": "sdpa",
    },
    {"name": "cola", "adapter": "cola", "trainable": ["embed", "norm"]},
    {"name": "multilora", "adapter": "multilora", "trainable": ["embed", "norm"]},
    {"name": "mixlora", "adapter": "mixlora", "trainable": ["embed", "norm"]},
]
#: contrasts (row, comparator): each pair differs in the factor named
CONTRASTS = [
    ("base-PI", "base-noPI", "position interpolation, untrained"),
    ("longlora", "base-PI", "LongLoRA fine-tuning"),
    ("lora", "longlora", "embed+norm not trained"),
    ("longlora-fullattn", "longlora", "full attention instead of S2-Attn in training"),
    ("cola", "longlora", "adapter: COLA"),
    ("multilora", "longlora", "adapter: MultiLoRA"),
    ("mixlora", "longlora", "adapter: MixLoRA"),
]
FLOOR, CEILING = 0.05, 0.95  # base-PI's passkey share at 4x: at the floor / at the ceiling
ANSWER_ROOM = 16  # prompt tokens left free for the generated answer


# ----------------------------------------------------------------------------- base model


def tiny_base_config(max_documents: int) -> BaseModelConfig:
    """A base that builds in seconds on a CPU; native 256 so that a passkey prompt fits."""
    return BaseModelConfig(
        vocab_size=512,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        context_length=256,
        max_documents=max_documents,
        tokenizer_chars=200_000,
        steps=3,
        batch_size=2,
        warmup_steps=1,
        val_tokens=256,
        passkey_fraction=0.0,
        kv_fraction=0.0,
    )


def resolve_base(args, cache: Path) -> tuple[Path, dict[str, Any]]:
    """The base's folder and what is known of it (recipe, data source, build figures)."""
    if args.tiny:
        path = build_base_model(
            tiny_base_config(args.max_documents), cache, progress=False, acceptance_prompts=0
        )
    elif args.base.startswith("recipe:"):
        device = "cuda" if DEVICE.type == "cuda" else "cpu"
        path = build_base_model(
            recipe_config(args.base.removeprefix("recipe:")),
            progress=not args.quiet,
            device=device,
            recipe=args.base.removeprefix("recipe:"),
            acceptance_prompts=100,
        )
    else:
        path = Path(resolve_base_model(args.base, progress=not args.quiet)[0])
    info: dict[str, Any] = {"path": str(path), "weights_sha256": base_weights_sha256(path)}
    for name in ("build_info.json", "manifest.json"):
        if (path / name).is_file():
            record = json.loads((path / name).read_text())
            info.update(
                recipe=record.get("recipe"),
                data_source=record.get("config", {}).get("data_source", "stdlib"),
                validation_fraction=record.get("config", {}).get("validation_fraction", 0.05),
                build_metrics={
                    k: v
                    for k, v in (record.get("metrics") or {}).items()
                    if not isinstance(v, dict)
                },
            )
    return path, info


def load_model(path: Path, pi: bool, native: int) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if pi:
        extend_context(model, FACTOR * native, method="linear", trainable=())
    return model.to(DEVICE).eval()


# ----------------------------------------------------------------------------- evaluation


def held_out_documents(tokenizer, info: dict, length: int, max_docs: int, max_documents):
    """Long held-out documents: the base's validation files, concatenated per package (first
    path component; top-level modules form one group), cut into chunks of ``length`` tokens.

    Returns:
        ``[(package, tokens (length,))]``, at most ``max_docs``, spread over packages.
    """
    corpus = load_corpus(
        info.get("data_source", "stdlib"),
        max_documents=max_documents,
        validation_fraction=info.get("validation_fraction", 0.05),
    )
    groups: dict[str, list[str]] = {}
    for doc in corpus.validation:
        parts = doc.id.split("/")
        package = parts[1] if len(parts) > 2 else "(top level)"
        groups.setdefault(package, []).append(doc.text)
    chunks: dict[str, list[torch.Tensor]] = {}
    for package, texts in sorted(groups.items()):
        stream = join_with_eos(tokenize_documents(texts, tokenizer), tokenizer.eos_token_id)
        n = stream.numel() // length
        if n:
            chunks[package] = list(stream[: n * length].view(n, length))
    docs: list[tuple[str, torch.Tensor]] = []
    while len(docs) < max_docs and any(chunks.values()):  # round-robin over packages
        for package in list(chunks):
            if chunks[package] and len(docs) < max_docs:
                docs.append((package, chunks[package].pop(0)))
    if not docs:
        raise SystemExit(f"no held-out package has {length} tokens; use a longer corpus")
    return docs


def passkey_strata(native: int, length: int, prompts: int) -> dict[str, tuple[float, float]]:
    """Depth ranges: ``inside`` puts the key within 0.8 native lengths of the question,
    ``beyond`` further than 1.25 native lengths (none at the native length itself)."""
    if length <= native:
        return {"inside": (0.0, 1.0)}
    return {
        "inside": (1 - 0.8 * native / length, 1.0),
        "beyond": (0.0, max(0.0, 1 - 1.25 * native / length)),
    }


def evaluate_row(model, tokenizer, native: int, docs, prompts: int) -> dict[str, Any]:
    """Per-prompt passkey outcomes and per-document perplexities at 1x, 2x and 4x native."""
    out: dict[str, Any] = {"passkey": {}, "ppl": {}}
    for k in (1, 2, FACTOR):
        length = k * native
        strata = passkey_strata(native, length, prompts)
        per = max(1, prompts // len(strata))
        trials = []
        for s, (name, depth_range) in enumerate(sorted(strata.items())):
            for t in passkey_trials(
                model,
                tokenizer,
                length - ANSWER_ROOM,
                per,
                seed=100 + 10 * k + s,
                depth_range=depth_range,
            ):
                trials.append({"stratum": name, **t.__dict__})
        out["passkey"][str(length)] = trials
        nll = [math.log(perplexity(model, doc, length, max(1, length // 2))) for _, doc in docs]
        out["ppl"][str(length)] = nll  # mean NLL per token of each document
    return out


def summarize_row(row: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for length, trials in row["passkey"].items():
        cell = {"all": sum(t["hit"] for t in trials) / len(trials), "n": len(trials)}
        for stratum in sorted({t["stratum"] for t in trials}):
            sub = [t["hit"] for t in trials if t["stratum"] == stratum]
            cell[stratum] = sum(sub) / len(sub)
        summary[f"passkey@{length}"] = cell
    for length, nll in row["ppl"].items():
        summary[f"ppl@{length}"] = math.exp(sum(nll) / len(nll))  # equal-length documents
    return summary


def mcnemar(a: list[dict], b: list[dict]) -> dict[str, Any]:
    """Exact McNemar test of two rows' outcomes on the same prompts (row a against b)."""
    assert [t["seed"] for t in a] == [t["seed"] for t in b], "prompts must pair"
    only_a = sum(x["hit"] and not y["hit"] for x, y in zip(a, b, strict=True))
    only_b = sum(y["hit"] and not x["hit"] for x, y in zip(a, b, strict=True))
    n = only_a + only_b
    p = stats.binomtest(only_a, n, 0.5).pvalue if n else 1.0
    diff = (only_a - only_b) / len(a)
    return {"difference": diff, "only_row": only_a, "only_comparator": only_b, "p": float(p)}


def paired_documents(a: list[float], b: list[float]) -> dict[str, Any]:
    """Per-document log-perplexity differences: mean, 95% t-interval, as perplexity ratios."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return {"ratio": math.exp(mean), "low": None, "high": None, "p": None, "documents": n}
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    p = float(stats.ttest_rel(a, b).pvalue) if sd > 0 else (1.0 if mean == 0 else 0.0)
    return {
        "ratio": math.exp(mean),
        "low": math.exp(mean - half),
        "high": math.exp(mean + half),
        "p": p,
        "documents": n,
    }


def contrasts(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row, ref, factor in CONTRASTS:
        if "ppl" not in rows.get(row, {}) or "ppl" not in rows.get(ref, {}):
            continue  # a row not run (pilot stop) or failed
        for length in rows[row]["ppl"]:
            out.append(
                {
                    "row": row,
                    "comparator": ref,
                    "factor": factor,
                    "length": int(length),
                    "passkey": mcnemar(rows[row]["passkey"][length], rows[ref]["passkey"][length]),
                    "ppl": paired_documents(rows[row]["ppl"][length], rows[ref]["ppl"][length]),
                }
            )
    return out


def pilot_decision(passkey_4x: float, mode: str) -> dict[str, Any]:
    """Whether to train: base-PI's passkey at 4x must sit off the floor and the ceiling
    (``mode`` ``auto``), unless ``always`` / ``never`` says otherwise; the reason in words."""
    where = "floor" if passkey_4x <= FLOOR else "ceiling" if passkey_4x >= CEILING else "between"
    go = mode == "always" or (mode == "auto" and where == "between")
    said = {"floor": f"at the floor (<= {FLOOR})", "ceiling": f"at the ceiling (>= {CEILING})"}
    reason = (
        f"base-PI passkey at {FACTOR}x is {passkey_4x:.2f}: "
        + said.get(where, "off both floor and ceiling")
        + ("; training rows run" if go else "; training rows skipped")
        + (f" (--train {mode})" if mode != "auto" else "")
    )
    return {"base_pi_passkey_4x": passkey_4x, "where": where, "train": go, "reason": reason}


# ----------------------------------------------------------------------------- training rows


def train_rows(args, base: Path, native: int, out: Path) -> tuple[Path, dict[str, Any]]:
    """The training rows through ``loravariants.compare`` (one seed, 4x, bf16 on CUDA)."""
    bf16 = DEVICE.type == "cuda" and torch.cuda.is_bf16_supported()
    overrides = [
        f"base_model={base}",
        "base_model_config=null",
        f"context.target_length={FACTOR * native}",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch}",
        f"train.mixed_precision={'bf16' if bf16 else repr('no')}",  # YAML: 'no', not false
        "seeds=[0]",
        f"eval.lengths=[{FACTOR * native}]",
        f"eval.max_tokens={2 * FACTOR * native}",
        "eval.passkey_lengths=[]",
        f"output_dir={out / 'train'}",
    ]
    if args.max_documents is not None:
        overrides.append(f"data.max_documents={args.max_documents}")
    # parameter-matched to longlora: its LoRA's adapter parameters are every row's target
    target = count_adapter_params(
        lambda: AutoModelForCausalLM.from_pretrained(base), load_adapter_spec("lora", {}, None)
    )
    config = load_experiment(
        CONFIG_DIR / "quickstart.yaml",
        overrides
        + [f"match_params={target}", "runs=" + json.dumps(TRAIN_ROWS)]
        + (["match_params_tolerance=1.0"] if args.tiny else []),
    )
    start = time.perf_counter()
    compare(config, progress=not args.quiet, log=lambda m: print(m, file=sys.stderr))
    seconds = time.perf_counter() - start
    results = json.loads((out / "train" / "results.json").read_text())
    records = {r["row"]: r for r in results["runs"]} if results["runs"] else {}
    return out / "train", {
        "seconds": seconds,
        "match_params": target,
        "steps": args.steps,
        "batch": args.batch,
        "bf16": bf16,
        "records": {
            name: {
                k: records.get(name, {}).get(k)
                for k in (
                    "adapter_params",
                    "trainable_params",
                    "match_params",
                    "final_loss",
                    "tokens_per_s",
                    "wall_s",
                    "peak_mem_mib",
                    "error",
                )
            }
            for name in (r["name"] for r in TRAIN_ROWS)
        },
    }


# ----------------------------------------------------------------------------- report


def markdown(result: dict[str, Any]) -> str:
    rows, native = result["rows"], result["native"]
    lengths = [str(k * native) for k in (1, 2, FACTOR)]
    lines = [
        "# LongLoRA's passkey experiment on the GPU (benchmarks/gpu_longcontext.py)",
        "",
        f"*{result['date']} · {result['machine']} · {result['seconds']:.0f} s "
        f"({'tiny CPU check, not a measurement' if result['tiny'] else 'measured'})*",
        "",
        f"Base `{result['base']['path']}` (weights sha256 "
        f"`{(result['base']['weights_sha256'] or '?')[:16]}`), native {native} tokens; "
        f"linear PI to {FACTOR * native}. Passkey: {result['prompts']} prompts per length, keys "
        f"inside / beyond the native length; perplexity on {result['documents']} held-out "
        f"documents of {FACTOR * native} tokens (stdlib files concatenated per package).",
        "",
        "| row | "
        + " | ".join(f"passkey@{n} (in / beyond)" for n in lengths)
        + " | "
        + " | ".join(f"ppl@{n}" for n in lengths)
        + " |",
        "|---|" + "---|" * (2 * len(lengths)),
    ]
    for name, row in rows.items():
        if "summary" not in row:
            lines.append(f"| {name} | {row.get('error', 'not evaluated')} |")
            continue
        s = row["summary"]
        cells = []
        for n in lengths:
            c = s[f"passkey@{n}"]
            beyond = f" / {c['beyond']:.2f}" if "beyond" in c else ""
            cells.append(f"{c['all']:.2f} ({c['inside']:.2f}{beyond})")
        cells += [f"{s[f'ppl@{n}']:.2f}" for n in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"**Pilot decision:** {result['decision']['reason']}", ""]
    if result["contrasts"]:
        lines += [
            "Paired contrasts at each length (row − comparator): passkey by exact McNemar on the "
            "same prompts, perplexity as the ratio of per-document perplexities with a 95% "
            "t-interval over documents.",
            "",
            "| row − comparator | factor | length | passkey diff (only row / only comp.) | "
            "McNemar p | ppl ratio [95% CI] | p |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in result["contrasts"]:
            pk, pp = c["passkey"], c["ppl"]
            ci = f"[{pp['low']:.3f}, {pp['high']:.3f}]" if pp["low"] is not None else ""
            p = f"{pp['p']:.3g}" if pp["p"] is not None else "—"
            lines.append(
                f"| {c['row']} − {c['comparator']} | {c['factor']} | {c['length']} | "
                f"{pk['difference']:+.2f} ({pk['only_row']} / {pk['only_comparator']}) | "
                f"{pk['p']:.3g} | {pp['ratio']:.3f} {ci} | {p} |"
            )
    lines += ["", result["seed_note"], ""]
    return "\n".join(lines)


def write(out: Path, result: dict[str, Any]) -> None:
    for name, text in (
        ("gpu_longcontext.json", json.dumps(result, indent=2, default=str)),
        ("gpu_longcontext.md", markdown(result)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text + "\n")
        tmp.replace(out / name)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the JSON and markdown (created)")
    p.add_argument("--base", default="default", help="default | recipe:gpu | a model folder")
    p.add_argument("--steps", type=int, default=200, help="training steps per row")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--prompts", type=int, default=40, help="passkey prompts per length (>= 2)")
    p.add_argument("--docs", type=int, default=32, help="held-out documents (>= 2)")
    p.add_argument("--max-documents", type=int, default=None, help="cap on corpus files read")
    p.add_argument("--train", choices=("auto", "always", "never"), default="auto")
    p.add_argument("--tiny", action="store_true", help="a CPU check of the script (seconds)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch, args.quiet = 3, 1, True
        args.prompts, args.docs = min(args.prompts, 2), min(args.docs, 3)
        args.max_documents = args.max_documents or 60
    for name in ("steps", "batch", "prompts", "docs"):
        if getattr(args, name) < (2 if name in ("prompts", "docs") else 1):
            p.error(f"--{name} is too small: {getattr(args, name)}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        p.error(f"--out {out} exists and is not an empty folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        base, info = resolve_base(args, Path(cache))
        _, tokenizer = resolve_base_model(str(base), progress=False)
        native = int(AutoModelForCausalLM.from_pretrained(base).config.max_position_embeddings)
        docs = held_out_documents(tokenizer, info, FACTOR * native, args.docs, args.max_documents)
        gpu = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "none"
        result: dict[str, Any] = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.node()} · GPU {gpu} · torch {torch.__version__} · "
            f"Python {platform.python_version()}",
            "tiny": args.tiny,
            "base": info,
            "native": native,
            "prompts": args.prompts,
            "documents": len(docs),
            "document_packages": sorted({p for p, _ in docs}),
            "rows": {},
            "contrasts": [],
            "decision": {"reason": "pilot not finished"},
            "seed_note": "Seed variance is not measured: every trained row is one seed (0); "
            "the intervals cover prompts and documents only.",
            "seconds": 0.0,
        }

        def evaluate(name: str, model) -> None:
            row = evaluate_row(model, tokenizer, native, docs, args.prompts)
            row["summary"] = summarize_row(row)
            result["rows"][name] = row
            result["contrasts"] = contrasts(result["rows"])
            result["seconds"] = time.perf_counter() - start
            write(out, result)
            print(f"{name}: {json.dumps(row['summary'])}", file=sys.stderr)

        for name, pi in (("base-noPI", False), ("base-PI", True)):
            evaluate(name, load_model(base, pi, native))
        pk = result["rows"]["base-PI"]["summary"][f"passkey@{FACTOR * native}"]["all"]
        result["decision"] = pilot_decision(pk, args.train)
        go = result["decision"]["train"]
        write(out, result)
        if go:
            train_dir, result["training"] = train_rows(args, base, native, out)
            for spec in TRAIN_ROWS:
                adapter = run_folder(train_dir, spec["name"], 0) / "adapter"
                if not adapter.is_dir():
                    result["rows"][spec["name"]] = {"error": "training failed (see train/)"}
                    continue
                model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
                load_adapter(model, adapter)  # its PI and trained embed/norm come with it
                evaluate(spec["name"], model.to(DEVICE).eval())
        result["seconds"] = time.perf_counter() - start
        write(out, result)
    print(f"written: {out / 'gpu_longcontext.json'}, {out / 'gpu_longcontext.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
