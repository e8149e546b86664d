"""Megatron-LM's memory-mapped indexed dataset (``prefix.bin`` + ``prefix.idx``), written from the format.

``.idx`` layout (little endian), as Megatron's preprocess_data.py writes it:
    magic b"MMIDIDX\\x00\\x00" | version u64 = 1 | dtype code u8 | sequence count u64 | document count u64
    | sizes int32[sequences] (tokens per sequence) | pointers int64[sequences] (byte offset in .bin)
    | document index int64[documents] (first sequence of each document, then the sequence count).
``.bin`` holds the token ids of all sequences back to back in that dtype.
"""
from __future__ import annotations

import os
import struct
from typing import Iterable, List

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
_CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


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
    """Read-only view of ``prefix.bin``/``prefix.idx``; `dataset[i]` is sequence i, `tokens` the whole .bin."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        for suffix in (".idx", ".bin"):
            if not os.path.isfile(prefix + suffix):
                raise IndexedDatasetError(f"indexed dataset file {prefix + suffix!r} does not exist; build it with "
                                          f"scripts/preprocess_data.py --output_prefix {prefix}")
        index = np.memmap(prefix + ".idx", mode="r", dtype=np.uint8)
        header = bytes(index[:34])
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
        offset = 34
        self.sizes = np.frombuffer(index, dtype=np.int32, count=count, offset=offset)
        offset += self.sizes.nbytes
        self.pointers = np.frombuffer(index, dtype=np.int64, count=count, offset=offset)
        offset += self.pointers.nbytes
        self.document_index = np.frombuffer(index, dtype=np.int64, count=documents, offset=offset)
        expected = int(self.sizes.sum(dtype=np.int64)) * self.dtype.itemsize
        if os.path.getsize(prefix + ".bin") != expected:
            raise IndexedDatasetError(f"{prefix}.bin has {os.path.getsize(prefix + '.bin')} bytes, the index "
                                      f"describes {expected}: the pair does not belong together")
        self.tokens = np.memmap(prefix + ".bin", mode="r", dtype=self.dtype) if expected else \
            np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start:start + int(self.sizes[i])])

    @property
    def num_documents(self) -> int:
        return len(self.document_index) - 1
