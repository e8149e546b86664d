"""Text -> tokenizer + Megatron indexed dataset, the work of scripts/preprocess_data.py, with a cache."""
from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional

from .corpus import CODE_CORPUS, DEFAULT_CORPUS, CorpusError, documents, python_sources_fingerprint
from .indexed import IndexedDatasetWriter, token_dtype
from .tokenizer import EOS, load_tokenizer, train_tokenizer

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "lshmoe_plugin", "data")
TOKENIZER_SAMPLE_CHARS = 64 << 20
ENCODE_BATCH_DOCUMENTS = 2048


@dataclass(frozen=True)
class PreparedData:
    prefix: str          # prefix.bin / prefix.idx
    tokenizer_path: str  # tokenizers JSON
    vocab_size: int


def preprocess(source: str, output_prefix: str, vocab_size: int = 4096, tokenizer_path: Optional[str] = None,
               text_key: str = "text", max_tokens: Optional[int] = None) -> PreparedData:
    """Tokenize every document of `source` (see `corpus.documents`), append EOS, write prefix.bin/.idx.

    Without `tokenizer_path` a byte-level BPE of `vocab_size` is trained on the first documents (up to
    TOKENIZER_SAMPLE_CHARS: plenty for a vocabulary of this size, and the code corpus is in random file order)
    and saved as ``prefix.tokenizer.json``. Documents are encoded in batches, so memory stays bounded.
    `max_tokens` stops after the first document that reaches that many tokens (whole documents only), e.g. to
    write a slice of the code corpus small enough to copy to another machine.
    """
    texts = documents(source, text_key)
    first = list(itertools.islice(texts, 1))
    if not first:
        raise CorpusError(f"data source {source!r} holds no documents")
    texts = itertools.chain(first, texts)
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        sample = list(_take_chars(texts, TOKENIZER_SAMPLE_CHARS))
        texts = itertools.chain(sample, texts)
        tokenizer = train_tokenizer(sample, vocab_size)
        tokenizer_path = output_prefix + ".tokenizer.json"
        os.makedirs(os.path.dirname(os.path.abspath(tokenizer_path)), exist_ok=True)
        tokenizer.save(tokenizer_path)
    eos = tokenizer.token_to_id(EOS)
    writer = IndexedDatasetWriter(output_prefix, token_dtype(tokenizer.get_vocab_size()))
    written = 0
    while max_tokens is None or written < max_tokens:
        batch = list(itertools.islice(texts, ENCODE_BATCH_DOCUMENTS))
        if not batch:
            break
        for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
            writer.add_document([encoding.ids + [eos]])
            written += len(encoding.ids) + 1
            if max_tokens is not None and written >= max_tokens:
                break
    writer.finalize()
    return PreparedData(output_prefix, tokenizer_path, tokenizer.get_vocab_size())


def _take_chars(texts: Iterator[str], limit: int) -> Iterator[str]:
    """Documents from `texts` until `limit` characters are taken (at least one document)."""
    taken = 0
    for text in texts:
        yield text
        taken += len(text)
        if taken >= limit:
            return


def cached_preprocess(source: str = DEFAULT_CORPUS, vocab_size: int = 4096, tokenizer_path: Optional[str] = None,
                      cache_dir: str = DEFAULT_CACHE) -> PreparedData:
    """`preprocess` into `cache_dir`, keyed by the arguments; a second call only reads the JSON beside it."""
    # The code corpus depends on the installed packages: their fingerprint keys the cache too.
    content = python_sources_fingerprint() if source == CODE_CORPUS else None
    key = json.dumps([source, vocab_size, tokenizer_path and os.path.abspath(tokenizer_path), content])
    prefix = os.path.join(cache_dir, f"{_slug(source)}-{vocab_size}-{hashlib.sha1(key.encode()).hexdigest()[:10]}")
    done = prefix + ".json"
    os.makedirs(cache_dir, exist_ok=True)
    # Separate jobs (a study's concurrent runs) may ask for the same entry at once: one builds, the others wait.
    with open(prefix + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(done):
            with open(done) as f:
                return PreparedData(**json.load(f))
        prepared = preprocess(source, prefix, vocab_size, tokenizer_path)
        with open(done + ".tmp", "w") as f:
            json.dump(prepared.__dict__, f)
        os.replace(done + ".tmp", done)  # atomic: a crash never leaves a cache entry without its files
        return prepared


def _slug(source: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(source.rstrip("/")))[:40]
