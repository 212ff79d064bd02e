"""Text corpora: the Python standard library, local files and folders, Hugging Face datasets.

A corpus is a list of :class:`Document` (a stable id and its text). The train/validation split
is made per document by hashing its id, so a document keeps its side whatever else is in the
corpus, whatever ``max_documents`` cuts, and on every machine::

    id "stdlib/json/decoder.py" --sha256--> 0.731... >= fraction  -> train
    id "stdlib/abc.py"          --sha256--> 0.012... <  fraction  -> validation

Sources (the ``source`` string of :func:`load_documents`):

- ``stdlib``: the ``*.py`` files of the running Python's standard library (found through
  ``sysconfig``), sorted by relative path; test folders, ``site-packages``, ``__pycache__``
  and the generated codec tables of ``encodings/`` are skipped. Real long documents available
  offline on every machine; the corpus changes slightly with the Python version.
- a local file or folder: ``.jsonl`` (one JSON object per line, the text in ``text_field``),
  ``.json`` (a list of such objects, or of strings), anything else is read as UTF-8 text, one
  document per file. Folders are walked recursively in sorted order; hidden entries skipped.
- ``hf:<name>`` or ``hf:<name>:<config>``: ``datasets.load_dataset`` (downloads; streamed).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Document",
    "Corpus",
    "STDLIB_SKIP_DIRS",
    "stdlib_dir",
    "iter_stdlib_documents",
    "iter_local_documents",
    "iter_hf_documents",
    "load_documents",
    "is_selection",
    "is_validation",
    "split_documents",
    "load_corpus",
]

#: folder names skipped anywhere under the standard library
STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings"}
)
#: file suffixes read from a local folder (other files are ignored)
TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".py", ".json", ".jsonl"})


@dataclass(frozen=True)
class Document:
    """One document: a stable id (used for the split) and its text."""

    id: str
    text: str


@dataclass
class Corpus:
    """The sides of a split corpus: training, validation (the test documents) and, when asked
    for, the selection documents (learning-rate selection), all three disjoint."""

    train: list[Document]
    validation: list[Document]
    selection: list[Document] = field(default_factory=list)


def stdlib_dir() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_documents() -> Iterator[Document]:
    """The standard library's ``*.py`` files, sorted by relative path (ids ``stdlib/<path>``)."""
    root = stdlib_dir()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith(".")]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    for file in sorted(files, key=lambda f: f.relative_to(root).as_posix()):
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are Latin-1 test fixtures; not worth guessing
        if text.strip():
            yield Document(f"stdlib/{file.relative_to(root).as_posix()}", text)


def _records_text(record, text_field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object or string, got {type(record).__name__}")
    if text_field not in record:
        raise ValueError(
            f"{where}: no field {text_field!r} (fields: {sorted(record)}); set text_field"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _iter_file(file: Path, doc_id: str, text_field: str) -> Iterator[Document]:
    if file.suffix == ".jsonl":
        with file.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{file}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: invalid JSON ({e})") from e
                yield Document(f"{doc_id}:{lineno}", _records_text(record, text_field, where))
    elif file.suffix == ".json":
        try:
            records = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: invalid JSON ({e})") from e
        if not isinstance(records, list):
            records = [records]
        for i, record in enumerate(records):
            yield Document(f"{doc_id}:{i}", _records_text(record, text_field, f"{file}[{i}]"))
    else:
        try:
            yield Document(doc_id, file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{file}: not UTF-8 text ({e})") from e


def iter_local_documents(path: str | os.PathLike, text_field: str = "text") -> Iterator[Document]:
    """Documents from a local file or folder (see the module docstring for the formats).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a malformed JSON/JSONL record, a missing ``text_field``, a folder without
            readable files.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source {str(path)!r} does not exist")
    if path.is_file():
        yield from _iter_file(path, path.name, text_field)
        return
    files = sorted(
        f
        for f in path.rglob("*")
        if f.is_file()
        and f.suffix in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in f.relative_to(path).parts)
    )
    if not files:
        raise ValueError(
            f"data folder {str(path)!r} has no readable files ({', '.join(sorted(TEXT_SUFFIXES))})"
        )
    for file in files:
        yield from _iter_file(file, file.relative_to(path).as_posix(), text_field)


def iter_hf_documents(
    spec: str, text_field: str = "text", split: str = "train", streaming: bool = True
) -> Iterator[Document]:
    """Documents of a Hugging Face dataset, ``spec`` = ``<name>`` or ``<name>:<config>``.

    Downloads unless the dataset is in the local ``datasets`` cache; never used by the tests.
    """
    import datasets

    name, _, config = spec.partition(":")
    if not name:
        raise ValueError("data source 'hf:' needs a dataset name, e.g. hf:pg19")
    ds = datasets.load_dataset(name, config or None, split=split, streaming=streaming)
    for i, record in enumerate(ds):
        yield Document(f"hf:{spec}/{split}/{i}", _records_text(record, text_field, f"{spec}[{i}]"))


def load_documents(
    source: str = "stdlib",
    text_field: str = "text",
    max_documents: int | None = None,
    max_chars: int | None = None,
) -> list[Document]:
    """All documents of ``source`` in their deterministic order, optionally capped.

    Args:
        source: ``stdlib``, a local file or folder, or ``hf:<name>[:<config>]``.
        text_field: the JSON/JSONL/dataset field holding the text.
        max_documents: keep at most this many (the first ones); None: all.
        max_chars: stop once this many characters are read (the last document is kept
            whole); None: no cap.

    Raises:
        FileNotFoundError: a local source that does not exist.
        ValueError: bad caps, malformed records, or an empty corpus.
    """
    for name, cap in (("max_documents", max_documents), ("max_chars", max_chars)):
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {cap!r}")
    docs: Iterable[Document]
    if source == "stdlib":
        docs = iter_stdlib_documents()
    elif source.startswith("hf:"):
        docs = iter_hf_documents(source[3:], text_field)
    else:
        docs = iter_local_documents(source, text_field)
    out: list[Document] = []
    chars = 0
    for doc in docs:
        if max_documents is not None and len(out) >= max_documents:
            break
        if max_chars is not None and chars >= max_chars:
            break
        out.append(doc)
        chars += len(doc.text)
    if not out:
        raise ValueError(f"data source {source!r} has no documents")
    return out


def _unit(doc_id: str) -> float:
    """The first 8 bytes of the id's sha256 as a number in [0, 1)."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_validation(doc_id: str, fraction: float) -> bool:
    """Whether document ``doc_id`` is held out: the first 8 bytes of its sha256 as a number in
    [0, 1) below ``fraction``. Stable across runs, machines and corpus caps."""
    return _unit(doc_id) < fraction


def is_selection(doc_id: str, validation_fraction: float, selection_fraction: float) -> bool:
    """Whether ``doc_id`` is a selection document: its hash number (:func:`is_validation`'s)
    in ``[validation_fraction, validation_fraction + selection_fraction)``. Never a validation
    document, and the validation side is the same with or without a selection split."""
    return validation_fraction <= _unit(doc_id) < validation_fraction + selection_fraction


def split_documents(
    docs: Iterable[Document], validation_fraction: float = 0.05
) -> tuple[list[Document], list[Document]]:
    """``(train, validation)``, each keeping the corpus order; see :func:`is_validation`."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    train, val = [], []
    for doc in docs:
        (val if is_validation(doc.id, validation_fraction) else train).append(doc)
    return train, val


def load_corpus(
    source: str = "stdlib",
    text_field: str = "text",
    max_documents: int | None = None,
    validation_fraction: float = 0.05,
    max_chars: int | None = None,
    selection_fraction: float = 0.0,
) -> Corpus:
    """Load ``source`` and split it; a tiny corpus whose hash puts nothing on one side gets its
    last document moved there, so both sides are never empty (with two documents or more).

    ``selection_fraction > 0`` also moves the training documents of :func:`is_selection` to
    ``selection`` (the last training document if none is, given three documents or more).

    Raises:
        ValueError: fewer than two documents (three with a selection split), or the errors of
            :func:`load_documents`.
    """
    docs = load_documents(source, text_field, max_documents, max_chars)
    if len(docs) < 2:
        raise ValueError(f"data source {source!r} needs at least 2 documents, found {len(docs)}")
    if selection_fraction and len(docs) < 3:
        raise ValueError(
            f"data source {source!r} needs at least 3 documents for a selection split, found "
            f"{len(docs)}"
        )
    train, val = split_documents(docs, validation_fraction)
    if not val:
        val.append(train.pop())
    elif not train:
        train.append(val.pop())
    selection: list[Document] = []
    if selection_fraction:
        keep = [not is_selection(d.id, validation_fraction, selection_fraction) for d in train]
        selection = [d for d, k in zip(train, keep, strict=True) if not k]
        train = [d for d, k in zip(train, keep, strict=True) if k]
        if not selection:
            selection.append(train.pop())
        elif not train:
            train.append(selection.pop())
    return Corpus(train, val, selection)
