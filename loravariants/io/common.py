"""What every adapter format shares: file names, strict JSON/safetensors readers, the checks a
file passes before anything is allocated, and the rollback that keeps a failed load from
changing the model.

The format modules (:mod:`.native`, :mod:`.peft`, :mod:`.mixlora`) import from here, never from
each other nor from the package's ``__init__``; each registers its format
(:class:`~loravariants.adapters.base.AdapterFormat`), and the package dispatches through that
registry (:data:`~loravariants.adapters.base.FORMATS`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .._version import __version__
from ..adapters.base import FORMATS, VARIANTS, AdapterConfig, variant_for_file_type
from ..inject import (
    _restore_trainable_modules,
    adapter_config,
    adapter_names,
    attach,
    detach,
    extra_trainable_modules,
    iter_adapters,
    mark_trainable,
)
from ..longlora.context import apply_extension, check_extension
from ..longlora.context import describe_extension as _context_of
from ..utils import ADAPTER_FILES, atomic_directory, check_replaceable, recover_directory

NATIVE_CONFIG = "loravariants_config.json"


PEFT_CONFIG = "adapter_config.json"


# the context extension an adapter was trained with, in adapter_config.json (peft ignores it)
PEFT_CONTEXT_KEY = "loravariants_context_extension"


WEIGHTS = "adapter_model.safetensors"


PEFT_PREFIX = "base_model.model."


# A config of any format is a few KiB (a 70B model's peft rank_pattern: about 50 KiB), a
# safetensors header of an adapter less than a MiB: anything bigger is refused unread (a
# sparse 8 GiB "config" would be read whole).
MAX_JSON_BYTES = 16 * 2**20


# No config of ours nests deeper than 5; Python's JSON parser raises RecursionError at ~1000.
MAX_JSON_DEPTH = 32


def _open_regular(file: Path) -> int:
    """A read-only descriptor of ``file``, which must be a regular file (``O_NONBLOCK``: a
    FIFO planted under an adapter file's name must not hang the open)."""
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(f"{file}: cannot be read ({e.strerror})") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{file}: not a regular file")
    return fd


def read_capped(file: Path, cap: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of ``file``, refused unread when it is larger than ``cap``."""
    fd = _open_regular(file)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if size > cap:
            raise ValueError(
                f"{file}: {size:,} bytes is larger than {cap:,}, the most a config file may be; "
                "refused unread"
            )
        return f.read(cap + 1)


def _json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, counted without recursion (stops past ``limit``)."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= limit:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = list(node.values())
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(raw: bytes, file: Path) -> dict[str, Any]:
    """A JSON object from ``raw`` (the bytes of ``file``), nested at most ``MAX_JSON_DEPTH``.

    Raises:
        ValueError: not UTF-8, not JSON, not an object, or nested too deep (file named).
    """
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a valid JSON file ({e})") from e
    except RecursionError:
        data = None  # nested past Python's recursion limit
    else:
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a JSON object")
    if data is None or _json_depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ValueError(f"{file}: JSON nested deeper than {MAX_JSON_DEPTH} levels; refused")
    return data


def read_json(file: Path) -> dict[str, Any]:
    """The JSON object in ``file``: the one reader of every adapter config (size-capped,
    depth-checked; see :func:`read_capped`, :func:`parse_json`).

    Raises:
        FileNotFoundError: ``file`` does not exist.
        ValueError: anything else wrong with it, the file named, in one line.
    """
    return parse_json(read_capped(file), file)


# what a weights file may hold: floating-point weights and integer buffers (COLA's link
# index); booleans and complex numbers are never adapter state. Each tensor must also be of
# the kind of the tensor it goes into (:func:`check_kinds`): no cast between kinds.
_SAFETENSORS_DTYPES = {
    "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8,
}  # fmt: skip


def dtype_kind(dtype: torch.dtype) -> str:
    if dtype is torch.bool:
        return "boolean"
    if dtype.is_complex:
        return "complex"
    return "floating-point" if dtype.is_floating_point else "integer"


def check_kinds(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], file: Path, prefix=""
) -> None:
    """Each tensor of ``state`` of the kind (floating point, integer) of the model's tensor
    of that name in ``expected``: an int64, bool or complex tensor is a broken file, not a
    weight to cast.

    Raises:
        ValueError: naming the file, the tensor and both dtypes.
    """
    for key, t in state.items():
        if key in expected and dtype_kind(t.dtype) != dtype_kind(expected[key].dtype):
            raise ValueError(
                f"{file}: tensor {prefix + key!r} is {t.dtype} ({dtype_kind(t.dtype)}), where "
                f"the model holds {expected[key].dtype} ({dtype_kind(expected[key].dtype)}): "
                "no cast between kinds; refused"
            )


# A file system may keep all-zero blocks as holes (ZFS with compression does), and an
# adapter's B factors start at zero: up to 4x the bytes on disk (plus 1 MiB) is honest.
_HOLE_FACTOR, _HOLE_SLACK = 4, 2**20


def bytes_present(fd: int) -> int:
    """Bytes of the open file ``fd`` actually stored: its data extents (``SEEK_DATA`` /
    ``SEEK_HOLE``), else its allocated blocks; a sparse file's holes do not count."""
    size = os.fstat(fd).st_size
    present = offset = 0
    try:
        for _ in range(4096):  # more extents than this: the rest is not counted
            start = os.lseek(fd, offset, os.SEEK_DATA)
            offset = os.lseek(fd, start, os.SEEK_HOLE)
            present += offset - start
            if offset >= size:
                break
        return present
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data after offset: the rest is a hole
            return present
    except AttributeError:  # no SEEK_DATA on this system
        pass
    blocks = getattr(os.fstat(fd), "st_blocks", None)
    return size if blocks is None else min(size, blocks * 512)


def check_present(file: Path, declared: int, present: int) -> None:
    """Refuse a file that declares far more tensor bytes than it holds on disk (sparse)."""
    if declared > _HOLE_FACTOR * present + _HOLE_SLACK:
        raise ValueError(
            f"{file}: declares {declared:,} bytes of tensors but holds {present:,} bytes on "
            "disk (a sparse file); refused before allocating"
        )


def _safetensors_header(file: Path) -> None:
    """Check a safetensors file's header before any tensor is read: every tensor floating
    point, its shape matching its byte range, the ranges inside the file, and their sum
    present on disk.

    Raises:
        ValueError: naming the file (and the tensor).
    """
    fd = _open_regular(file)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(MAX_JSON_BYTES, size - 8):
            raise ValueError(f"{file}: not a valid safetensors file (header length {n})")
        header = parse_json(os.pread(fd, n, 8), file)
        data_len, declared = size - 8 - n, 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = info.get("dtype") if isinstance(info, dict) else None
            if dtype not in _SAFETENSORS_DTYPES:
                raise ValueError(
                    f"{file}: tensor {name!r:.80} has dtype {dtype!r:.20}; adapter tensors are "
                    "floating point (or integer buffers), never boolean or complex"
                )
            shape, offsets = info.get("shape"), info.get("data_offsets")
            if not (
                _int_list(shape)
                and _int_list(offsets)
                and len(offsets) == 2
                and 0 <= offsets[0] <= offsets[1] <= data_len
                and offsets[1] - offsets[0] == math.prod(shape) * _SAFETENSORS_DTYPES[dtype]
            ):
                raise ValueError(
                    f"{file}: tensor {name!r}: shape {shape!r} and data_offsets {offsets!r} do "
                    f"not fit the file's {data_len:,} data bytes"
                )
            declared += offsets[1] - offsets[0]
        check_present(file, declared, bytes_present(fd))
    finally:
        os.close(fd)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def check_tensors(tensors: Mapping[str, torch.Tensor], file: Path) -> None:
    """Every tensor real (no boolean, no complex) and every floating-point one finite.

    Raises:
        ValueError: naming the file, the tensor and what is wrong.
    """
    for key, t in tensors.items():
        if dtype_kind(t.dtype) in ("boolean", "complex"):
            raise ValueError(
                f"{file}: tensor {key!r:.80} is {t.dtype}; adapter tensors are floating point "
                "(or integer buffers), never boolean or complex"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"{file}: tensor {key!r:.80} holds {bad:,} non-finite value(s) (NaN or inf); "
                "refused"
            )


def check_factors(
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], file: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRA factors read without a model (:func:`~loravariants.io.read_factors`) are
    floating point: an integer ``B`` or ``A`` is a broken file, not a factor to cast."""
    for module, pair in factors.items():
        for t in pair:
            if not t.is_floating_point():
                raise ValueError(
                    f"{file}: the factors of {module!r:.80} are {t.dtype}, not floating point"
                )
    return dict(factors)


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors read from an adapter's weights file: what its config may ask for."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter's safetensors file, checked before they are read (header:
    dtypes, shapes, sizes present on disk) and after (finite)."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: adapter weights not found")
    _safetensors_header(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{file}: not a valid safetensors file ({e})") from e
    check_tensors(tensors, file)
    return tensors


def safetensors_metadata(file: Path) -> dict[str, Any]:
    """The ``__metadata__`` of a safetensors file ({} when unreadable): our provenance."""
    try:
        fd = _open_regular(file)
    except (OSError, ValueError):
        return {}
    try:
        head = os.pread(fd, 8, 0)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 0 < n <= min(MAX_JSON_BYTES, os.fstat(fd).st_size - 8):
            return {}
        meta = parse_json(os.pread(fd, n, 8), file).get("__metadata__")
    except ValueError:
        return {}
    finally:
        os.close(fd)
    return meta if isinstance(meta, dict) else {}


def _written_by_us(directory: Path) -> bool:
    """The folder holds an adapter of ours: the mark each format's save writes (native: the
    config's ``"library"``; MixLoRA: the config's ``loravariants_version``; peft: the weights'
    metadata ``loravariants_version``)."""
    marks = (
        (NATIVE_CONFIG, lambda meta: meta.get("library") == "loravariants"),
        (PEFT_CONFIG, lambda meta: isinstance(meta.get("loravariants_version"), str)),
    )
    for file, ours in marks:
        try:
            if ours(read_json(directory / file)):
                return True
        except (OSError, ValueError):
            continue
    return isinstance(safetensors_metadata(directory / WEIGHTS).get("loravariants_version"), str)


def check_adapter_replaceable(path: str | os.PathLike) -> None:
    """Refuse a save into a folder that is not an adapter of ours: a save replaces the folder
    as a whole, and no file the library did not write is ever deleted.

    A missing or empty folder is fine; so is one holding only adapter files
    (:data:`~loravariants.utils.ADAPTER_FILES`, regular files, no links) with our mark in
    them. A user's ``README.md``, a peft-written adapter or anything else is refused.

    Raises:
        ValueError: naming the folder and what in it is not ours.
    """
    target = Path(path)
    check_replaceable(target, ADAPTER_FILES, "an adapter's")
    if not target.is_dir():
        return
    entries = sorted(target.iterdir())
    links = [p.name for p in entries if p.is_symlink() or not p.is_file()]
    if links:
        raise ValueError(
            f"{target} holds entries that are not plain files ({links[:5]}); it would be "
            "replaced as a whole: save into a new or empty folder"
        )
    if entries and not _written_by_us(target):
        raise ValueError(
            f"{target} holds an adapter loravariants did not write ({[p.name for p in entries]});"
            " it would be replaced as a whole: save into a new or empty folder"
        )


def json_str(meta: Mapping[str, Any], key: str, file: Path) -> str | None:
    value = meta.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{file}: {key} must be a string, got {value!r}")
    return value


def json_str_list(meta: Mapping[str, Any], key: str, file: Path) -> list[str]:
    value = meta.get(key)
    value = [] if value is None else value  # null: none; 0, false or "" is a broken file
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{file}: {key} must be a list of module names, got {value!r:.60}")
    return list(value)


def json_number(value: Any, field: str) -> float:
    """A JSON number (an int is fine) as float; strings, booleans and the rest are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a number, got {value!r}")
    return float(value)


def check_json_ints(meta: Mapping[str, Any], keys: tuple[str, ...], file: Path) -> None:
    """Fields of a JSON config that must be integers (``a.b``: key ``b`` of mapping ``a``),
    where present: ``4.7``, ``"4"`` or ``true`` is a broken file, not the integer 4.

    Raises:
        ValueError: naming the file, the field and the value.
    """
    for key in keys:
        node: Any = meta
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None and (isinstance(node, bool) or not isinstance(node, int)):
            raise ValueError(f"{file}: {key} must be an integer, got {node!r}")


def detect_format(path: str | os.PathLike) -> str:
    """The registered format (``"native"``, ``"peft"``, ...) an adapter directory is in.

    A save killed mid-replace is repaired first (:func:`~loravariants.utils.recover_directory`).

    Raises:
        FileNotFoundError: no such directory.
        ValueError: no registered format recognises it (a foreign ``peft_type`` is named).
    """
    directory = Path(path)
    recover_directory(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such adapter directory")
    for name, fmt in FORMATS.items():
        if fmt.detect(directory):
            return name
    if (directory / PEFT_CONFIG).is_file():
        peft_type = read_json(directory / PEFT_CONFIG).get("peft_type")
        known = sorted(t for t in (vars(c).get("file_type") for c in VARIANTS.values()) if t)
        raise ValueError(
            f"{directory / PEFT_CONFIG}: peft_type {peft_type!r} is not supported "
            f"({' and '.join(known)} are)"
        )
    raise ValueError(f"{directory}: neither {NATIVE_CONFIG} nor {PEFT_CONFIG} found")


def peft_type_of(directory: Path) -> Any:
    """The ``peft_type`` of a folder's ``adapter_config.json`` (None without one)."""
    file = directory / PEFT_CONFIG
    return read_json(file).get("peft_type") if file.is_file() else None


def reading_variant(file_type: str, file: Path) -> type[AdapterConfig]:
    """The registered variant a foreign file of ``peft_type`` ``file_type`` reads back as
    (:attr:`AdapterConfig.file_type`).

    Raises:
        ValueError: no registered variant reads it.
    """
    cls = variant_for_file_type(file_type)
    if cls is None:
        raise ValueError(f"{file}: no registered variant reads peft_type {file_type!r}")
    return cls


def extra_tensors(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for module_name in extra_trainable_modules(model):
        for key, t in model.get_submodule(module_name).state_dict().items():
            out[f"{prefix}{module_name}.{key}"] = t.detach().contiguous().cpu()
    return out


def base_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None) or None


def describe_extension(model: nn.Module) -> dict[str, Any] | None:
    """The model's context extension, as saved with an adapter (None: not extended)."""
    return _context_of(model)


def module_spec(module: nn.Module) -> dict[str, Any]:
    """Shape of a frozen module, enough to rebuild a stand-in for :func:`read_factors`."""
    if isinstance(module, nn.Linear):
        return {"type": "linear", "in": module.in_features, "out": module.out_features}
    children = {
        n: {"in": c.in_features, "out": c.out_features}
        for n, c in module.named_children()
        if isinstance(c, nn.Linear)
    }
    return {"type": type(module).__name__, "linears": children}


def check_spec(config: AdapterConfig, path: str, spec: Any, state) -> None:
    """The shapes a saved module spec implies, checked on meta tensors against the saved
    tensors before a real layer is built (a spec of 10^9 features would allocate)."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"module spec must be a mapping, got {spec!r}")
    dims = [spec.get("in"), spec.get("out")] if spec.get("type") == "linear" else []
    for shape in (spec.get("linears") or {}).values() if not dims else ():
        dims += [shape.get("in"), shape.get("out")] if isinstance(shape, Mapping) else [None]
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in dims):
        raise ValueError(f"module spec sizes must be positive integers, got {spec!r}")
    layer = config.create_layer(path, config.stand_in(spec))
    asked = sum(t.numel() for t in layer.adapter_state().values())
    held = sum(t.numel() for t in state.values())
    if asked > 2 * held + 2**20:
        raise ValueError(f"module spec {spec!r} asks for {asked:,} values, the file holds {held:,}")


def layer_from_state(config: AdapterConfig, path: str, spec: Mapping[str, Any], state, file):
    """Rebuild one adapter layer from saved tensors (read from ``file``) on a shape-only
    stand-in base module."""
    layer = config.create_layer(path, config.stand_in(spec))
    layer.to_empty(device="cpu")
    check_kinds(state, layer.adapter_state(), file, f"{path}.")
    layer.load_adapter_state(state)
    return layer


def saved_extension(model: nn.Module, meta: Mapping[str, Any], key: str, file: Path):
    """The saved context extension (``meta[key]``) to apply to ``model`` (None: nothing to do).

    Raises:
        ValueError: the model carries another extension than the adapter was trained with.
    """
    return check_extension(model, meta.get(key), str(file), recorded=key in meta)


def write_safetensors_adapter(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    config_file: str,
    config: AdapterConfig,
    base_model_name_or_path: str | None,
) -> Path:
    """``adapter_model.safetensors`` + the JSON config ``config_file``, written atomically into
    ``path`` (a folder that is missing, empty, or an adapter of ours)."""
    check_adapter_replaceable(path)
    if base_model_name_or_path is not None:
        meta["base_model_name_or_path"] = base_model_name_or_path
    # provenance goes into the weights' metadata: peft warns about unknown config keys
    provenance = {"format": "pt", "loravariants_version": __version__, "variant": config.variant}
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata=provenance)
        (tmp / config_file).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(path)


def load_safetensors_adapter(
    model: nn.Module,
    directory: Path,
    name: str,
    config: AdapterConfig,
    tensors: dict[str, torch.Tensor],
    extra_modules: list[str],
    prefixes: tuple[str, str],
    extension: dict[str, Any] | None,
    config_file: Path,
) -> nn.Module:
    """Attach (or fill) adapter ``name`` from tensors read out of ``directory``: the layers'
    under ``prefixes[0]``, whole saved modules' under ``prefixes[1]``, then the context
    extension. Any failure leaves the model as it was."""
    weights_file = directory / WEIGHTS
    prefix, extra_prefix = prefixes
    with rollback_on_error(model, name, extra_modules):
        attach_for_loading(model, name, config, tensor_bytes(tensors), directory, config_file)
        load_extra(model, tensors, extra_modules, extra_prefix, weights_file)
        load_layers(model, name, tensors, prefix, weights_file)
        if extension:  # last: a failure here also takes the adapter back out
            apply_extension(model, extension, str(config_file))
    return model


@contextlib.contextmanager
def rollback_on_error(model: nn.Module, name: str, extra_modules: list[str]):
    """A load that fails leaves the model as it was: no half-loaded adapter, no changed weights.

    Saves (cloned) the state and merge status of adapter ``name`` if already attached, and the
    state of the modules the file may overwrite; on any exception restores them (or detaches
    an adapter attached inside the block).
    """
    attached_before = name in adapter_names(model)
    layers_before = {}
    if attached_before:
        for path, _, layer in iter_adapters(model, name):
            state = {k: t.clone() for k, t in layer.adapter_state().items()}
            layers_before[path] = (state, layer.merged)
    extra_before = {
        m: {k: t.clone() for k, t in model.get_submodule(m).state_dict().items()}
        for m in extra_modules
    }
    marked_before = extra_trainable_modules(model)
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for m, state in extra_before.items():
                model.get_submodule(m).load_state_dict(state)
            if not attached_before and name in adapter_names(model):
                detach(model, name)
            for path, _, layer in iter_adapters(model, name) if attached_before else ():
                state, was_merged = layers_before[path]
                if layer.merged:
                    layer.unmerge()  # takes out the delta merged now, whatever it is
                layer.load_adapter_state(state)
                if was_merged:
                    layer.merge()
        _restore_trainable_modules(model, marked_before)
        raise


def attach_for_loading(
    model: nn.Module,
    name: str,
    config: AdapterConfig,
    held: int,
    directory: Path,
    config_file: Path,
) -> None:
    """Attach the saved config under ``name``, or check the attached one can take the file.

    ``held``: the bytes of the tensors read from the adapter's weights file
    (:func:`tensor_bytes`), the bound :func:`check_allocation` holds the config to.
    """
    if name in adapter_names(model):
        check_same_output_fields(model, name, config, config_file)
        return
    check_allocation(model, config, held, directory, config_file)
    try:
        attach(model, config, name=name)
    except ValueError as e:
        raise ValueError(f"{directory}: adapter does not fit this model ({e})") from e


# what a config may ask attach to allocate beyond what its adapter's files hold (bytes)
_ALLOCATION_SLACK = 64 * 2**20


def check_allocation(
    model: nn.Module, config: AdapterConfig, held: int, directory: Path, config_file: Path
) -> None:
    """Refuse a config whose sizes (r, rank_pattern, num_experts, expert r, ...) would make
    ``attach`` allocate far more than the adapter's weights hold, before anything is allocated.

    ``held`` is the bytes of the tensors actually read from the weights file (whose reader
    checked them against the bytes present on disk), not the folder's byte count: a sparse
    file or a link beside the weights adds nothing. The layers are built on shape-only (meta)
    copies of the modules they would wrap, so the count is exact and costs no memory. A real
    adapter's weights hold all its tensors: twice their size (plus 64 MiB) is an upper bound
    no honest file exceeds.

    Raises:
        ValueError: naming the file, the bytes asked for and the bytes the weights hold.
    """
    check_size_fields(config, held, config_file)
    asked = 0
    try:
        for path, module in config.select(model):
            layer = config.create_layer(path, config.stand_in(module_spec(module)))
            asked += sum(t.numel() * t.element_size() for t in layer.adapter_state().values())
            if asked > 2 * held + _ALLOCATION_SLACK:
                break
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"{config_file}: adapter does not fit this model ({e})") from e
    if asked > 2 * held + _ALLOCATION_SLACK:
        raise ValueError(
            f"{config_file}: its sizes (r, rank_pattern, num_experts, ...) ask for more than "
            f"{asked / 2**20:,.0f} MiB of adapter tensors on this model, but the weights in "
            f"{directory} hold {held / 2**20:,.1f} MiB; refused before allocating"
        )


# fields that set a rank (values per row) and fields that set a number of sub-modules
_RANK_FIELDS = ("r", "expert_r", "top_k")


_COUNT_FIELDS = ("num_experts", "num_branches")


_MAX_SUBMODULES = 65536


def check_size_fields(config: AdapterConfig, held: int, config_file: Path) -> None:
    """Each unit of a size field stands for at least one stored value (>= 2 bytes) of the
    file, and each expert/branch for a few: bigger sizes are refused before even the
    shape-only layers are built (a million experts are a million Python objects)."""
    sizes = {f: getattr(config, f, None) for f in _RANK_FIELDS + _COUNT_FIELDS}
    for key in ("rank_pattern",):
        for k, v in (getattr(config, key, None) or {}).items():
            sizes[f"{key}[{k}]"] = v
    for i, v in enumerate(getattr(config, "link_ranks", None) or []):
        sizes[f"link_ranks[{i}]"] = v
    for field, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        bound = min(held // 8, _MAX_SUBMODULES) if field in _COUNT_FIELDS else held // 2
        if value > bound:
            raise ValueError(
                f"{config_file}: {field}={value:,} is more than the adapter's files "
                f"({held:,} bytes) can hold (at most {bound:,}); refused before allocating"
            )


def check_same_output_fields(
    model: nn.Module, name: str, config: AdapterConfig, file: Path
) -> None:
    """Loading into an attached adapter: the settings no tensor shape shows must agree.

    ``alpha`` (or MixLoRA's ``top_k``) is not in the weights: a file trained with another
    value would load without a shape error and compute something else.

    Raises:
        ValueError: another variant, or a differing field (named, both values).
    """
    current = adapter_config(model, name)
    if type(current) is not type(config):
        raise ValueError(
            f"{file}: a {config.variant} adapter cannot load into {name!r}, a {current.variant}"
        )
    for field in type(current).output_fields:
        mine, saved = getattr(current, field), getattr(config, field)
        if mine != saved:
            raise ValueError(
                f"{file}: saved with {field}={saved!r}, but adapter {name!r} has {field}={mine!r}; "
                "load into a model without it (the saved config is used) or match the field"
            )


def extra_candidates(
    model: nn.Module, extra: list[str], file: Path, suffix_match: bool = False
) -> list[str]:
    """The model's modules a file's saved whole modules (embed/norm) may go into: the named
    ones, or with ``suffix_match`` (peft's rule) every module whose name ends with one."""
    names = {n for n, _ in model.named_modules() if n}
    out: list[str] = []
    for module_name in extra:
        if suffix_match:
            # peft's rule for modules_to_save: a plain suffix ("norm" also names
            # "input_layernorm"); only modules the file has weights for are taken
            out += [n for n in sorted(names) if n.endswith(module_name) and n not in out]
        elif module_name not in names:
            raise ValueError(
                f"{file}: saved module {module_name!r} does not exist in {type(model).__name__}"
            )
        elif module_name not in out:
            out.append(module_name)
    return out


def load_extra(model, tensors, candidates: list[str], prefix, file) -> None:
    state_by_module: dict[str, dict[str, torch.Tensor]] = {}
    for full in candidates:
        module = model.get_submodule(full)
        state = {
            k: tensors[f"{prefix}{full}.{k}"]
            for k in module.state_dict()
            if f"{prefix}{full}.{k}" in tensors
        }
        if state:
            state_by_module[full] = state
    for full, state in state_by_module.items():
        module = model.get_submodule(full)
        check_kinds(state, module.state_dict(), file, f"{prefix}{full}.")
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{file}: weights for {full} do not fit the model ({e})") from e
    if state_by_module:
        mark_trainable(model, list(state_by_module))


def load_layers(model, name, tensors, prefix, file) -> None:
    used: set[str] = set()
    for path, _, layer in iter_adapters(model, name):
        expected = layer.adapter_state()
        state = {}
        for key in expected:
            full = f"{prefix}{path}.{key}"
            if full not in tensors:
                raise ValueError(f"{file}: missing tensor {full!r} for adapter {name!r}")
            state[key] = tensors[full]
            used.add(full)
        check_kinds(state, expected, file, f"{prefix}{path}.")
        try:
            layer.load_adapter_state(state)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{file}: tensors for {path} do not fit ({e})") from e
    leftover = sorted(k for k in tensors if k.startswith(prefix) and k not in used)
    leftover = [k for k in leftover if not _is_extra_key(model, k, prefix)]
    if leftover:
        raise ValueError(
            f"{file}: {len(leftover)} tensor(s) match no adapter module of this model, "
            f"e.g. {leftover[0]!r}"
        )


def _is_extra_key(model, key: str, prefix: str) -> bool:
    """A tensor of a whole saved module (also a nested one: ``mlp.down_proj.weight``)."""
    rest = key[len(prefix) :]
    return any(rest.startswith(m + ".") for m in extra_trainable_modules(model))
