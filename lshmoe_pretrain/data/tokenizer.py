"""Byte-level BPE tokenizer trained on the corpus with the `tokenizers` library, or loaded from a file."""
from __future__ import annotations

import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .corpus import CorpusError

PAD = "<pad>"
EOS = "<|endoftext|>"
NUM_SENTINELS = 100  # T5's <extra_id_i> markers for span corruption; GPT never sees them


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


SPECIAL_TOKENS = [PAD, EOS] + [sentinel(i) for i in range(NUM_SENTINELS)]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style: no unknown tokens) with PAD=0, EOS=1 and the T5 sentinels as special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    """A `tokenizers` JSON file (e.g. a Hugging Face model's tokenizer.json); it must know EOS and PAD tokens."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as error:  # the tokenizers library raises a bare Exception that does not name the file
        raise CorpusError(f"tokenizer file {path!r} is not a readable tokenizers JSON file (truncated?): {error}; "
                          f"allowed: a tokenizer.json saved by the tokenizers library") from error
    missing = [t for t in (PAD, EOS) if tokenizer.token_to_id(t) is None]
    if missing:
        # A pretrained tokenizer brings its own special tokens; add ours at the end of its vocabulary.
        tokenizer.add_special_tokens(missing)
    return tokenizer


def special_ids(tokenizer: Tokenizer) -> dict:
    """PAD, EOS and the sentinel ids (sentinels are added to a pretrained tokenizer that lacks them)."""
    if tokenizer.token_to_id(sentinel(0)) is None:
        tokenizer.add_special_tokens([sentinel(i) for i in range(NUM_SENTINELS)])
    return {"pad": tokenizer.token_to_id(PAD), "eos": tokenizer.token_to_id(EOS),
            "sentinels": [tokenizer.token_to_id(sentinel(i)) for i in range(NUM_SENTINELS)]}
