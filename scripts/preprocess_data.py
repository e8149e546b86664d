"""Tokenize a corpus into a Megatron indexed dataset (PREFIX.bin/.idx) and its tokenizer (PREFIX.tokenizer.json).

    python scripts/preprocess_data.py --output_prefix data/python_docs                 # stdlib docs, offline
    python scripts/preprocess_data.py --input python-code --output_prefix data/python_code --vocab_size 16384
    python scripts/preprocess_data.py --input my_corpus.jsonl --output_prefix data/mine --vocab_size 16384
    python scripts/preprocess_data.py --input hf:wikitext:wikitext-2-raw-v1 --output_prefix data/wikitext2
"""
import argparse

from lshmoe_pretrain.data import DEFAULT_CORPUS, IndexedDataset, preprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=DEFAULT_CORPUS,
                        help="python-docs (default), python-docs+modules, python-code (~256 MB of the installed "
                             "Python source), hf:NAME[:CONFIG], or comma-separated .txt/.jsonl files or directories")
    parser.add_argument("--output_prefix", required=True)
    parser.add_argument("--vocab_size", type=int, default=4096, help="of the BPE trained when --tokenizer is absent")
    parser.add_argument("--tokenizer", default=None, help="an existing tokenizers JSON file to use instead")
    parser.add_argument("--json_key", default="text", help="text field of .jsonl lines and HF rows")
    parser.add_argument("--max_tokens", type=float, default=None,
                        help="stop after this many tokens (whole documents), e.g. 26e6 for a copyable slice")
    args = parser.parse_args()
    max_tokens = int(args.max_tokens) if args.max_tokens else None
    prepared = preprocess(args.input, args.output_prefix, args.vocab_size, args.tokenizer, args.json_key, max_tokens)
    dataset = IndexedDataset(prepared.prefix)
    print(f"wrote {prepared.prefix}.bin/.idx: {dataset.num_documents} documents, {len(dataset.tokens)} tokens "
          f"({dataset.dtype}); tokenizer {prepared.tokenizer_path} (vocab {prepared.vocab_size})")


if __name__ == "__main__":
    main()
