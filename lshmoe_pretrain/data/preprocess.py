"""Text -> tokenizer + Megatron indexed dataset, the work of scripts/preprocess_data.py, with a cache."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

from .corpus import DEFAULT_CORPUS, CorpusError, documents
from .indexed import IndexedDatasetWriter, token_dtype
from .tokenizer import EOS, load_tokenizer, train_tokenizer

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "lshmoe_plugin", "data")


@dataclass(frozen=True)
class PreparedData:
    prefix: str          # prefix.bin / prefix.idx
    tokenizer_path: str  # tokenizers JSON
    vocab_size: int


def preprocess(source: str, output_prefix: str, vocab_size: int = 4096, tokenizer_path: Optional[str] = None,
               text_key: str = "text") -> PreparedData:
    """Tokenize every document of `source` (see `corpus.documents`), append EOS, write prefix.bin/.idx.

    Without `tokenizer_path` a byte-level BPE of `vocab_size` is trained on the same documents and saved as
    ``prefix.tokenizer.json``.
    """
    texts = list(documents(source, text_key))
    if not texts:
        raise CorpusError(f"data source {source!r} holds no documents")
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        tokenizer = train_tokenizer(texts, vocab_size)
        tokenizer_path = output_prefix + ".tokenizer.json"
        os.makedirs(os.path.dirname(os.path.abspath(tokenizer_path)), exist_ok=True)
        tokenizer.save(tokenizer_path)
    eos = tokenizer.token_to_id(EOS)
    writer = IndexedDatasetWriter(output_prefix, token_dtype(tokenizer.get_vocab_size()))
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        writer.add_document([encoding.ids + [eos]])
    writer.finalize()
    return PreparedData(output_prefix, tokenizer_path, tokenizer.get_vocab_size())


def cached_preprocess(source: str = DEFAULT_CORPUS, vocab_size: int = 4096, tokenizer_path: Optional[str] = None,
                      cache_dir: str = DEFAULT_CACHE) -> PreparedData:
    """`preprocess` into `cache_dir`, keyed by the arguments; a second call only reads the JSON beside it."""
    key = json.dumps([source, vocab_size, tokenizer_path and os.path.abspath(tokenizer_path)])
    prefix = os.path.join(cache_dir, f"{_slug(source)}-{vocab_size}-{hashlib.sha1(key.encode()).hexdigest()[:10]}")
    done = prefix + ".json"
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
