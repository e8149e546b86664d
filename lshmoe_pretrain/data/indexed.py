"""Megatron-LM's memory-mapped indexed dataset (``prefix.bin`` + ``prefix.idx``), written from the format.

``.idx`` layout (little endian), as Megatron's preprocess_data.py writes it:
    magic b"MMIDIDX\\x00\\x00" | version u64 = 1 | dtype code u8 | sequence count u64 | document count u64
    | sizes int32[sequences] (tokens per sequence) | pointers int64[sequences] (byte offset in .bin)
    | document index int64[documents] (first sequence of each document, then the sequence count).
``.bin`` holds the token ids of all sequences back to back in that dtype.
"""
from __future__ import annotations

import hashlib
import os
import struct
from typing import Iterable, List, Tuple

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
_CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_HEADER_BYTES = 34  # magic 9, version 8, dtype code 1, sequence count 8, document count 8


class IndexedDatasetError(ValueError):
    """A missing or malformed .bin/.idx pair; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype Megatron would pick for token ids of this vocabulary."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


class IndexedDatasetWriter:
    """Appends sequences to ``prefix.bin``; `finalize` writes ``prefix.idx``. One document per `add_document`."""

    def __init__(self, prefix: str, dtype: np.dtype) -> None:
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise IndexedDatasetError(f"dtype {self.dtype} has no Megatron code; allowed: {sorted(map(str, _CODE_OF))}")
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = open(prefix + ".bin", "wb")
        self.sizes: List[int] = []
        self.document_index: List[int] = [0]

    def add_document(self, sequences: Iterable[Iterable[int]]) -> None:
        for sequence in sequences:
            array = np.asarray(sequence, dtype=self.dtype)
            self._bin.write(array.tobytes(order="C"))
            self.sizes.append(array.size)
        self.document_index.append(len(self.sizes))

    def finalize(self) -> None:
        self._bin.close()
        sizes = np.asarray(self.sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            pointers[1:] = np.cumsum(sizes[:-1], dtype=np.int64) * self.dtype.itemsize
        with open(self.prefix + ".idx", "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", _CODE_OF[self.dtype]))
            f.write(struct.pack("<Q", len(sizes)))
            f.write(struct.pack("<Q", len(self.document_index)))
            f.write(sizes.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.asarray(self.document_index, dtype=np.int64).tobytes(order="C"))


class IndexedDataset:
    """Read-only view of ``prefix.bin``/``prefix.idx``; `dataset[i]` is sequence i, `tokens` the whole .bin.

    Opening checks that the pair is whole and consistent (a truncated or foreign file is an `IndexedDatasetError`
    naming it), so that no later read runs past a file's end or into another sequence.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"indexed dataset file {path!r} does not exist; build it with "
                                          f"scripts/preprocess_data.py --output_prefix {prefix}")
        idx_bytes = os.path.getsize(idx_path)
        if idx_bytes < _HEADER_BYTES:  # np.memmap refuses an empty file, and a short header unpacks to garbage
            raise IndexedDatasetError(f"{idx_path} is truncated: {idx_bytes} bytes, shorter than the "
                                      f"{_HEADER_BYTES}-byte header of a Megatron MMIDIDX index")
        index = np.memmap(idx_path, mode="r", dtype=np.uint8)
        header = bytes(index[:_HEADER_BYTES])
        if header[:9] != MAGIC:
            raise IndexedDatasetError(f"{prefix}.idx is not a Megatron MMIDIDX index (bad magic {header[:9]!r})")
        version, = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise IndexedDatasetError(f"{prefix}.idx has index version {version}; supported: {VERSION}")
        code = header[17]
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{prefix}.idx has unknown dtype code {code}; known: {sorted(DTYPE_CODES)}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        count, documents = struct.unpack("<QQ", header[18:34])
        needed = _HEADER_BYTES + count * (4 + 8) + documents * 8
        if idx_bytes < needed:
            raise IndexedDatasetError(f"{idx_path} is truncated: {idx_bytes} bytes, but its header describes "
                                      f"{count} sequences and {documents} document-index entries, which need "
                                      f"{needed} bytes")
        offset = _HEADER_BYTES
        self.sizes = np.frombuffer(index, dtype=np.int32, count=count, offset=offset)
        offset += self.sizes.nbytes
        self.pointers = np.frombuffer(index, dtype=np.int64, count=count, offset=offset)
        offset += self.pointers.nbytes
        self.document_index = np.frombuffer(index, dtype=np.int64, count=documents, offset=offset)
        self._check_index(idx_path, count)
        expected = int(self.sizes.sum(dtype=np.int64)) * self.dtype.itemsize
        bin_bytes = os.path.getsize(bin_path)
        if bin_bytes != expected:
            why = "the .bin is truncated" if bin_bytes < expected else "the pair does not belong together"
            raise IndexedDatasetError(f"{bin_path} has {bin_bytes} bytes, but {idx_path} describes {expected}: "
                                      f"{why}")
        self.tokens = np.memmap(bin_path, mode="r", dtype=self.dtype) if expected else \
            np.zeros(0, dtype=self.dtype)

    def _check_index(self, idx_path: str, count: int) -> None:
        """Sizes, pointers and document index must describe sequences laid back to back, as Megatron writes them."""
        if count and int(self.sizes.min()) < 0:
            raise IndexedDatasetError(f"{idx_path} is corrupt: a negative sequence size")
        starts = np.zeros(count, dtype=np.int64)
        if count > 1:
            starts[1:] = np.cumsum(self.sizes[:-1], dtype=np.int64) * self.dtype.itemsize
        if not np.array_equal(self.pointers, starts):
            raise IndexedDatasetError(f"{idx_path} is corrupt: its sequence pointers are not the running sums of "
                                      f"its sizes")
        docs = self.document_index
        if len(docs) and (docs[0] != 0 or docs[-1] != count or (np.diff(docs) < 0).any()):
            raise IndexedDatasetError(f"{idx_path} is corrupt: its document index does not run from 0 to the "
                                      f"{count} sequences in order")

    def token_range(self, chunk: int = 1 << 24) -> Tuple[int, int]:
        """(smallest, largest) token id in the .bin, read in chunks so memory stays bounded; (0, -1) if empty."""
        lows, highs = [], []
        for start in range(0, len(self.tokens), chunk):
            part = self.tokens[start:start + chunk]
            lows.append(int(part.min()))
            highs.append(int(part.max()))
        return (min(lows), max(highs)) if lows else (0, -1)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start:start + int(self.sizes[i])])

    @property
    def num_documents(self) -> int:
        return len(self.document_index) - 1


def check_vocabulary(dataset: IndexedDataset, vocab_size: int, tokenizer_path: str) -> None:
    """Every token id of `dataset` must be a row of the embedding (0 <= id < vocab_size of the tokenizer).

    An id past the vocabulary means the tokenizer is not the one the data was made with; unchecked, it would
    surface as an index error inside the embedding (a device-side assert on CUDA) long after loading. Skipped
    without reading the .bin when the dtype cannot hold such an id (uint16 data, vocabulary over 65535).
    """
    info = np.iinfo(dataset.dtype) if dataset.dtype.kind in "iu" else None
    if info is not None and info.min >= 0 and info.max < vocab_size:
        return
    low, high = dataset.token_range()
    if high >= vocab_size or low < 0:
        bad = high if high >= vocab_size else low
        raise IndexedDatasetError(
            f"{dataset.prefix}.bin holds token id {bad}, but the tokenizer {tokenizer_path} has {vocab_size} "
            f"tokens (ids 0..{vocab_size - 1}): the data was not made with this tokenizer. Pass the tokenizer it "
            f"was built with (--tokenizer), or rebuild the data with scripts/preprocess_data.py --tokenizer "
            f"{tokenizer_path}")


def corpus_digest(prefix: str, tokenizer_path: str) -> str:
    """sha256 over PREFIX.bin, PREFIX.idx and the tokenizer, in that order: which corpus a run trained on, so that
    runs of two corpora are never compared (their losses are not comparable), whatever the files were called."""
    digest = hashlib.sha256()
    for path in (prefix + ".bin", prefix + ".idx", tokenizer_path):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()
