"""Pretraining data: corpora, tokenizer, Megatron indexed datasets, packed samples and their batches."""
from .corpus import DEFAULT_CORPUS, CorpusError, documents
from .indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter, check_vocabulary, corpus_digest
from .preprocess import PreparedData, cached_preprocess, preprocess
from .samples import Batches, EvalBatches, GPTSamples, T5Samples, span_corruption, train_valid_split
from .tokenizer import load_tokenizer, special_ids, train_tokenizer

__all__ = ["Batches", "EvalBatches", "CorpusError", "DEFAULT_CORPUS", "GPTSamples", "IndexedDataset",
           "IndexedDatasetError", "IndexedDatasetWriter", "PreparedData", "T5Samples", "cached_preprocess",
           "check_vocabulary", "corpus_digest", "documents", "load_tokenizer", "preprocess", "special_ids",
           "span_corruption", "train_tokenizer", "train_valid_split"]
