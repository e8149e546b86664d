"""Where pretraining text comes from: the offline corpora, local .txt/.jsonl files, or a HF dataset.

Every source yields documents (strings). Two corpora need nothing beyond the Python installation itself:
- ``python-docs`` (default, small): the Python Language Reference topics that ship in the stdlib for ``help()``
  (``pydoc_data.topics``, ~800 KB of English prose and code), optionally followed by stdlib module docstrings;
- ``python-code`` (large): the source files of the running interpreter's stdlib and site-packages, code with its
  docstrings and comments, deduplicated by content (see `python_sources`). What it holds drifts with every package
  installed or upgraded, so a corpus built from it cannot be built again later;
- ``python-code-pinned`` (large, for quality studies): the same kind of text from sources fixed by version: the
  interpreter's own standard library (no site-packages) and torch's Python sources, refused unless both are the
  versions in `PINNED_VERSIONS`. Built again on another day it is the same corpus, byte for byte, so studies of
  several sessions share one (docs/records/corpus_*.sha256 hold its hashes).
"""
from __future__ import annotations

import glob
import hashlib
import importlib
import json
import os
import sys
import sysconfig
from typing import Iterator, List, Sequence, Tuple

DEFAULT_CORPUS = "python-docs"
CODE_CORPUS = "python-code"
PINNED_CODE_CORPUS = "python-code-pinned"
# The versions the pinned corpus is read from: the CPU machine's interpreter and the README's torch pin.
PINNED_VERSIONS = {"python": "3.11.7", "torch": "2.13.0"}
HF_PREFIX = "hf:"
# The code corpus takes files in content-hash order up to this many bytes: a fixed size on every machine (a GPU
# image holds far more packages than a plugin install) that tokenizes in minutes and gives ~60M+ tokens.
CODE_CORPUS_BYTES = 256 << 20
CODE_FILE_MAX_BYTES = 1 << 20  # larger .py files are generated tables and data, not code


class CorpusError(ValueError):
    """A data source that cannot be read; the message says what was looked for and what is allowed."""


def python_docs(with_module_docstrings: bool = False) -> Iterator[str]:
    """The stdlib's Language Reference topics, in a fixed order, then optionally stdlib module docstrings."""
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield topics[name]
    if with_module_docstrings:
        yield from _stdlib_docstrings()


def _stdlib_docstrings() -> Iterator[str]:
    # Import only pure, side-effect-free stdlib modules by name; skip anything private or platform specific.
    for name in sorted(getattr(sys, "stdlib_module_names", ())):
        if name.startswith("_") or name in ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"):
            continue
        try:
            doc = importlib.import_module(name).__doc__
        except Exception:  # noqa: BLE001 - a module that cannot import here simply adds no text
            continue
        if doc and len(doc) > 200:
            yield doc


def python_source_files(max_file_bytes: int = CODE_FILE_MAX_BYTES, pinned: bool = False) -> List[Tuple[str, str]]:
    """(sha256, path) of every distinct .py file under the stdlib and site-packages (`pinned`: under the stdlib
    without its site-packages, and torch), sorted by hash.

    Identical files (vendored copies, the same package in two places) count once. Sorting by content hash gives a
    fixed pseudo-random order that mixes packages, so any prefix of it, and the validation tail, is a sample of all
    of them rather than a few packages.
    """
    by_hash = {}
    skipped = {"__pycache__", "site-packages", "dist-packages"} if pinned else {"__pycache__"}
    for root in (_pinned_source_roots() if pinned else _source_roots()):
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d not in skipped)
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                try:
                    if os.path.getsize(path) > max_file_bytes:
                        continue
                    with open(path, "rb") as f:
                        digest = hashlib.sha256(f.read()).hexdigest()
                except OSError:
                    continue
                by_hash.setdefault(digest, path)
    return sorted(by_hash.items())


def _source_roots() -> List[str]:
    return sorted({sysconfig.get_paths()[key] for key in ("stdlib", "purelib", "platlib")})


def pinned_versions_found() -> dict:
    """The versions of what the pinned corpus reads, as `PINNED_VERSIONS` names them (torch without its local
    build tag: the CPU and CUDA builds ship the same Python sources)."""
    import torch
    return {"python": ".".join(str(part) for part in sys.version_info[:3]),
            "torch": torch.__version__.split("+")[0]}


def _pinned_source_roots() -> List[str]:
    found = pinned_versions_found()
    if found != PINNED_VERSIONS:
        raise CorpusError(f"{PINNED_CODE_CORPUS} is read from Python {PINNED_VERSIONS['python']} and torch "
                          f"{PINNED_VERSIONS['torch']}; found Python {found['python']} and torch {found['torch']}, "
                          f"whose sources would make another corpus (use {CODE_CORPUS}, or those versions)")
    import torch
    return [sysconfig.get_paths()["stdlib"], os.path.dirname(torch.__file__)]


def python_sources(max_bytes: int = CODE_CORPUS_BYTES, pinned: bool = False) -> Iterator[str]:
    """The ``python-code`` corpus (`pinned`: ``python-code-pinned``): distinct .py files, one document each, up to
    `max_bytes`.

    Files that are not valid UTF-8 or are empty are skipped. Unpinned, the result depends on the installed
    packages: a run prints its size, and docs/quality.md gives the size on the machines it was measured on.
    """
    total = 0
    for _, path in python_source_files(pinned=pinned):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not text.strip():
            continue
        if total + len(raw) > max_bytes:
            return
        total += len(raw)
        yield text


def python_sources_fingerprint() -> str:
    """Identifies the package set the code corpus is drawn from (interpreter + installed distributions), so a
    cached tokenization is rebuilt when the packages change; cheap, unlike hashing every file."""
    import importlib.metadata
    # Only the folders the corpus is read from: `distributions()` would also follow sys.path, which differs
    # between `python -c` (the current folder first) and a launched script, and would key the cache differently.
    names = sorted(f"{d.metadata['Name']}=={d.version}"
                   for d in importlib.metadata.distributions(path=_source_roots()))
    return hashlib.sha1("\n".join([sys.version, str(CODE_CORPUS_BYTES)] + names).encode()).hexdigest()[:10]


def local_files(paths: Sequence[str], text_key: str = "text") -> Iterator[str]:
    """Documents from .txt files (one document each) and .jsonl files (one per line, under `text_key`)."""
    for path in expand_paths(paths):
        if path.endswith(".jsonl") or path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)[text_key]
                    except (json.JSONDecodeError, KeyError, TypeError) as error:
                        raise CorpusError(f"{path}:{number}: expected a JSON object with a {text_key!r} string "
                                          f"({error.__class__.__name__}: {error})") from None
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()


def expand_paths(paths: Sequence[str]) -> List[str]:
    """Files named directly, by glob, or as directories (their .txt/.jsonl files); missing paths are an error."""
    files: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(p for ext in ("txt", "jsonl", "json") for p in
                           glob.glob(os.path.join(path, "**", f"*.{ext}"), recursive=True))
        elif os.path.isfile(path):
            found = [path]
        else:
            found = sorted(glob.glob(path))
        if not found:
            raise CorpusError(f"data path {path!r} does not exist or holds no .txt/.jsonl files")
        files.extend(found)
    return files


def huggingface(name: str, split: str = "train", text_key: str = "text") -> Iterator[str]:
    """Documents of a Hugging Face dataset named ``"NAME"`` or ``"NAME:CONFIG"`` (``"wikitext:wikitext-2-raw-v1"``)."""
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"hf dataset {name!r} needs the `datasets` package (pip install datasets) and network "
                          f"access; offline, use the default corpus or local .txt/.jsonl files") from None
    path, _, config = name.partition(":")
    try:
        data = datasets.load_dataset(path, config or None, split=split)
    except Exception as error:  # noqa: BLE001 - network, auth and name errors all end here
        raise CorpusError(f"could not load hf dataset {name!r} split {split!r}: {error}") from error
    for row in data:
        text = row.get(text_key)
        if text and text.strip():
            yield text


def documents(source: str, text_key: str = "text") -> Iterator[str]:
    """Documents of `source`: ``python-docs`` (default), ``python-docs+modules``, ``python-code``,
    ``python-code-pinned``, ``hf:NAME[:CONFIG]``, or comma-separated local paths."""
    if source in (DEFAULT_CORPUS, DEFAULT_CORPUS + "+modules"):
        return python_docs(with_module_docstrings=source.endswith("+modules"))
    if source == CODE_CORPUS:
        return python_sources()
    if source == PINNED_CODE_CORPUS:
        return python_sources(pinned=True)
    if source.startswith(HF_PREFIX):
        return huggingface(source[len(HF_PREFIX):], text_key=text_key)
    return local_files([p for p in source.split(",") if p], text_key=text_key)
