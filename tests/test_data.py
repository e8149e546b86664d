"""Data pipeline: the Megatron .bin/.idx format, the default corpus, tokenizer, packing, span corruption, batches."""
import struct

import numpy as np
import pytest

from lshmoe_pretrain.data import (
    Batches,
    CorpusError,
    GPTSamples,
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    T5Samples,
    documents,
    span_corruption,
    train_tokenizer,
)
from lshmoe_pretrain.data.corpus import python_docs


def test_idx_file_has_megatron_layout(tmp_path):
    prefix = str(tmp_path / "ds")
    writer = IndexedDatasetWriter(prefix, np.uint16)
    writer.add_document([[5, 6, 7]])
    writer.add_document([[8], [9, 10]])  # one document of two sequences
    writer.finalize()
    raw = open(prefix + ".idx", "rb").read()
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<QQ", 3, 3)
                + np.array([3, 1, 2], np.int32).tobytes() + np.array([0, 6, 8], np.int64).tobytes()
                + np.array([0, 1, 3], np.int64).tobytes())
    assert raw == expected
    assert open(prefix + ".bin", "rb").read() == np.arange(5, 11, dtype=np.uint16).tobytes()


def test_indexed_dataset_round_trip(tmp_path):
    prefix = str(tmp_path / "ds")
    docs = [list(range(n, 2 * n)) for n in (1, 5, 70000 % 977, 3)]
    writer = IndexedDatasetWriter(prefix, np.int32)
    for doc in docs:
        writer.add_document([doc])
    writer.finalize()
    dataset = IndexedDataset(prefix)
    assert len(dataset) == dataset.num_documents == len(docs)
    assert dataset.dtype == np.int32
    for i, doc in enumerate(docs):
        assert dataset[i].tolist() == doc
    assert dataset.tokens.tolist() == sum(docs, [])


def test_missing_or_foreign_files_fail_clearly(tmp_path):
    with pytest.raises(IndexedDatasetError, match="does not exist.*preprocess_data.py"):
        IndexedDataset(str(tmp_path / "nope"))
    (tmp_path / "bad.idx").write_bytes(b"NOTANIDX" + bytes(40))
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(IndexedDatasetError, match="bad magic"):
        IndexedDataset(str(tmp_path / "bad"))


def test_default_corpus_is_real_english_text():
    texts = list(python_docs())
    assert len(texts) > 50 and sum(map(len, texts)) > 300_000
    joined = " ".join(texts)
    assert "assignment statement" in joined and " the " in joined


def test_bad_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        list(documents(str(tmp_path / "missing.txt")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2"):
        list(documents(str(bad)))


def test_bpe_tokenizer_round_trips_text():
    texts = list(python_docs())[:20]
    tokenizer = train_tokenizer(texts, vocab_size=1000)
    sample = texts[3][:2000]
    assert tokenizer.decode(tokenizer.encode(sample).ids) == sample
    assert tokenizer.token_to_id("<pad>") == 0 and tokenizer.token_to_id("<|endoftext|>") == 1


def test_gpt_samples_are_shifted_windows():
    stream = np.arange(100)
    samples = GPTSamples(stream, seq_len=9)
    assert len(samples) == 10
    inputs, labels = samples[2]
    assert inputs.tolist() == list(range(20, 29)) and labels.tolist() == list(range(21, 30))


def test_span_corruption_can_be_undone():
    tokens = np.arange(1000, 1064)
    sentinels = np.arange(10, 20)
    inputs, targets = span_corruption(tokens, np.random.default_rng(0), num_noise=10, num_spans=3,
                                      sentinels=sentinels, eos=1)
    assert len(inputs) == 64 - 10 + 3 + 1 and len(targets) == 10 + 3 + 1
    spans = {}
    current = None
    for t in targets[:-1].tolist():
        if t in sentinels:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    rebuilt = sum((spans[t] if t in spans else [t] for t in inputs[:-1].tolist()), [])
    assert rebuilt == tokens.tolist()


def test_t5_samples_fit_seq_len_and_are_deterministic():
    stream = np.arange(1000, 6000)  # ids above the sentinels, so every kept or masked token can be told apart
    samples = T5Samples(stream, seq_len=64, sentinels=range(10, 110), eos=1, seed=3)
    inputs, targets = samples[7]
    assert len(inputs) <= 64 and inputs[-1] == targets[-1] == 1
    # Kept and masked tokens together are the sample's whole window, each once.
    original = sorted(t for t in inputs.tolist() + targets.tolist() if t >= 1000)
    assert original == samples.window(7).tolist()
    # inputs: kept tokens, one sentinel per span, EOS; targets: each span's sentinel and masked tokens, EOS.
    spans = int(((inputs >= 10) & (inputs < 110)).sum())
    kept = len(inputs) - spans - 1
    assert spans >= 1 and len(targets) == (len(samples.window(7)) - kept) + spans + 1
    again = T5Samples(stream, seq_len=64, sentinels=range(10, 110), eos=1, seed=3)[7]
    assert inputs.tolist() == again[0].tolist() and targets.tolist() == again[1].tolist()
    other_seed = T5Samples(stream, seq_len=64, sentinels=range(10, 110), eos=1, seed=4)[7]
    assert other_seed[0].tolist() != inputs.tolist()  # another seed masks other spans of the same window


def test_batches_are_disjoint_across_ranks_and_reproducible():
    samples = GPTSamples(np.arange(10_000), seq_len=7)
    ranks = [Batches(samples, micro_batch=4, grad_accum=2, dp_rank=r, dp_size=2, seed=1) for r in range(2)]
    seen = [tuple(row) for r in ranks for m in range(2) for row in r.get(5, m)["input_ids"].tolist()]
    assert len(set(seen)) == len(seen) == 16
    fresh = Batches(samples, micro_batch=4, grad_accum=2, dp_rank=1, dp_size=2, seed=1)
    assert fresh.get(5, 1)["labels"].equal(ranks[1].get(5, 1)["labels"])


def test_eval_batches_spread_over_the_whole_split_and_give_every_rank_as_many():
    import torch

    from lshmoe_pretrain.data import EvalBatches
    samples = list(zip(np.arange(100), np.arange(100) + 1000))  # sample i is (i, 1000 + i)
    ranks = [EvalBatches(samples, num_samples=21, micro_batch=4, dp_rank=r, dp_size=2) for r in range(2)]
    assert ranks[0].num_samples == 20 and [len(r) for r in ranks] == [3, 3]  # 21 rounded down to the 2 ranks
    seen = sorted(int(v) for r in ranks for i in range(len(r)) for v in r.get(i)["input_ids"])
    assert seen == list(range(0, 100, 5))  # every 5th sample: the first and the last files are both in
    # rank 1 takes every other one (5, 15, ..., 95); its last batch is the short rest, labels from each pair
    assert ranks[1].get(2)["input_ids"].tolist() == [85, 95]
    assert torch.equal(ranks[1].get(2)["labels"], torch.tensor([1085, 1095]))
    whole = EvalBatches(samples, num_samples=10**6, micro_batch=8, dp_rank=0, dp_size=1)
    assert whole.num_samples == 100 and sorted(int(v) for i in range(len(whole)) for v in whole.get(i)["input_ids"]) \
        == list(range(100))
