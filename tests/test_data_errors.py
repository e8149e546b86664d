"""Broken data fails at load time with an error naming the file: truncated or corrupt .bin/.idx pairs, a tokenizer
whose vocabulary does not cover the data's token ids, and an unreadable tokenizer file."""
import argparse
import os
import struct

import numpy as np
import pytest

from lshmoe_pretrain import training
from lshmoe_pretrain.data import (
    CorpusError,
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    check_vocabulary,
    load_tokenizer,
    train_tokenizer,
)
from lshmoe_pretrain.data.corpus import python_docs

HEADER = 34


def write_dataset(prefix, documents, dtype=np.uint16):
    writer = IndexedDatasetWriter(prefix, dtype)
    for doc in documents:
        writer.add_document([doc])
    writer.finalize()
    return prefix


@pytest.fixture
def dataset(tmp_path):
    # 3 documents of 4, 1 and 6 tokens: .idx = 34 + 3 * 12 + 4 * 8 = 102 bytes, .bin = 22 bytes
    return write_dataset(str(tmp_path / "ds"), [[1, 2, 3, 4], [5], [6, 7, 8, 9, 10, 11]])


def cut(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize("keep", [0, 5, HEADER - 1, HEADER + 7, 101], ids=lambda k: f"{k}_bytes")
def test_truncated_idx_names_the_file(dataset, keep):
    assert os.path.getsize(dataset + ".idx") == 102  # the fixture's layout, which the cut points assume
    IndexedDataset(dataset)  # whole, it opens
    cut(dataset + ".idx", keep)
    with pytest.raises(IndexedDatasetError, match=rf"{dataset}\.idx is truncated: {keep} bytes"):
        IndexedDataset(dataset)


def test_truncated_bin_names_the_file(dataset):
    cut(dataset + ".bin", 21)  # half a uint16 short
    with pytest.raises(IndexedDatasetError, match=rf"{dataset}\.bin has 21 bytes, but .*ds\.idx describes 22: "
                                                  r"the \.bin is truncated"):
        IndexedDataset(dataset)
    cut(dataset + ".bin", 0)
    with pytest.raises(IndexedDatasetError, match=r"ds\.bin has 0 bytes.*truncated"):
        IndexedDataset(dataset)


def test_bin_of_another_index_names_both_files(dataset):
    with open(dataset + ".bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(IndexedDatasetError, match=r"ds\.bin has 24 bytes.*ds\.idx describes 22: the pair does not "
                                                  r"belong together"):
        IndexedDataset(dataset)


@pytest.mark.parametrize("where,value,message", [
    (HEADER + 3 * 4 + 8, 7, "its sequence pointers are not the running sums"),  # pointer of sequence 1
    (HEADER + 3 * 12 + 3 * 8, 2, "its document index does not run from 0"),    # last document-index entry
], ids=["pointer", "document_index"])
def test_corrupt_idx_names_the_file(dataset, where, value, message):
    with open(dataset + ".idx", "r+b") as f:
        f.seek(where)
        f.write(struct.pack("<q", value))
    with pytest.raises(IndexedDatasetError, match=rf"ds\.idx is corrupt: {message}"):
        IndexedDataset(dataset)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_tokenizer(list(python_docs())[:5], vocab_size=400).save(path)
    return path


def pretrain_args(prefix, tokenizer):
    return argparse.Namespace(data_prefix=prefix, tokenizer=tokenizer, valid_fraction=0.25, preset="tiny",
                              model_kind="gpt", seed=0)


def test_token_ids_beyond_the_tokenizer_vocabulary_are_refused_at_load(tmp_path, tokenizer_file):
    vocab = load_tokenizer(tokenizer_file).get_vocab_size()
    ids = np.arange(2000) % (vocab + 50)  # mostly ids the tokenizer has, some it does not
    prefix = write_dataset(str(tmp_path / "foreign"), [ids.tolist()])
    with pytest.raises(IndexedDatasetError, match=rf"foreign\.bin holds token id {vocab + 49}, but the tokenizer "
                                                  rf"{tokenizer_file} has {vocab} tokens"):
        training.load_data(pretrain_args(prefix, tokenizer_file))


def test_data_made_with_the_tokenizer_loads(tmp_path, tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    ids = tokenizer.encode(" ".join(list(python_docs())[:3])).ids
    prefix = write_dataset(str(tmp_path / "own"), [ids])
    data = training.load_data(pretrain_args(prefix, tokenizer_file))
    assert data.vocab_size == tokenizer.get_vocab_size() and len(data.train) > 0
    assert max(ids) < data.vocab_size


def test_vocabulary_check_reads_the_data_only_when_the_dtype_can_exceed_it(tmp_path, monkeypatch):
    prefix = write_dataset(str(tmp_path / "small"), [[0, 255, 7]], dtype=np.uint8)
    with monkeypatch.context() as patched:
        def read_forbidden(self):
            raise AssertionError("read the .bin although a uint8 id is always < 256")
        patched.setattr(IndexedDataset, "token_range", read_forbidden)
        check_vocabulary(IndexedDataset(prefix), 256, "tok.json")  # a uint8 id is < 256: nothing to read
    with pytest.raises(IndexedDatasetError, match="token id 255, but the tokenizer tok.json has 255 tokens"):
        check_vocabulary(IndexedDataset(prefix), 255, "tok.json")
    signed = write_dataset(str(tmp_path / "signed"), [[3, -1, 2]], dtype=np.int32)
    with pytest.raises(IndexedDatasetError, match="token id -1"):
        check_vocabulary(IndexedDataset(signed), 10, "tok.json")
    empty = write_dataset(str(tmp_path / "empty"), [[]], dtype=np.int32)
    check_vocabulary(IndexedDataset(empty), 10, "tok.json")


def test_unreadable_tokenizer_file_names_the_file(tmp_path, tokenizer_file):
    truncated = tmp_path / "tokenizer.json"
    truncated.write_bytes(open(tokenizer_file, "rb").read()[:500])
    with pytest.raises(CorpusError, match=rf"tokenizer file '{truncated}' is not a readable tokenizers JSON file"):
        load_tokenizer(str(truncated))


def test_the_pinned_code_corpus_reads_only_the_stdlib_and_torch_and_refuses_other_versions(monkeypatch):
    import sys
    import sysconfig

    import torch

    from lshmoe_pretrain.data import corpus
    if corpus.pinned_versions_found() != corpus.PINNED_VERSIONS:
        pytest.skip(f"not the pinned versions: {corpus.pinned_versions_found()}")
    files = corpus.python_source_files(pinned=True)
    paths = [path for _, path in files]
    torch_root = os.path.dirname(torch.__file__)
    stdlib = sysconfig.get_paths()["stdlib"]
    assert all(p.startswith(torch_root + os.sep) or p.startswith(stdlib + os.sep) for p in paths)
    assert not any(f"{os.sep}site-packages{os.sep}" in p for p in paths if not p.startswith(torch_root + os.sep))
    assert any(p.startswith(torch_root + os.sep) for p in paths) and os.path.join(stdlib, "os.py") in paths
    assert [digest for digest, _ in files] == sorted(digest for digest, _ in files)
    # the unpinned corpus also reads every other installed package: this one is a strict part of it
    assert {digest for digest, _ in files} < {digest for digest, _ in corpus.python_source_files()}
    monkeypatch.setattr(sys, "version_info", (3, 12, 1, "final", 0))
    with pytest.raises(CorpusError, match="python-code-pinned is read from Python 3.11.7 and torch 2.13.0; "
                                          "found Python 3.12.1"):
        list(corpus.documents("python-code-pinned"))
