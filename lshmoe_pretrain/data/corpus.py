"""Where pretraining text comes from: the default offline corpus, local .txt/.jsonl files, or a HF dataset.

Every source yields documents (strings). The default needs nothing beyond CPython itself: the Python Language
Reference topics that ship in the stdlib for ``help()`` (``pydoc_data.topics``, ~800 KB of English prose and code),
optionally followed by the docstrings of stdlib modules.
"""
from __future__ import annotations

import glob
import importlib
import json
import os
import pkgutil
import sys
from typing import Iterator, List, Sequence

DEFAULT_CORPUS = "python-docs"
HF_PREFIX = "hf:"


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
    """Documents of `source`: ``python-docs`` (default), ``python-docs+modules``, ``hf:NAME[:CONFIG]``,
    or comma-separated local paths."""
    if source in (DEFAULT_CORPUS, DEFAULT_CORPUS + "+modules"):
        return python_docs(with_module_docstrings=source.endswith("+modules"))
    if source.startswith(HF_PREFIX):
        return huggingface(source[len(HF_PREFIX):], text_key=text_key)
    return local_files([p for p in source.split(",") if p], text_key=text_key)
