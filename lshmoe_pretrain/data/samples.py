"""Fixed-length training samples packed from the token stream of an indexed dataset, and their batches.

The .bin of a dataset written with EOS after every document already *is* the packed stream: sample i is a
window of it. Validation is the tail of the stream, so train and validation never share a token.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from .indexed import IndexedDataset


class PackedSamples:
    """Consecutive, non-overlapping windows of `length` tokens of `stream`."""

    def __init__(self, stream: np.ndarray, length: int) -> None:
        self.stream, self.length = stream, length

    def __len__(self) -> int:
        return len(self.stream) // self.length

    def window(self, i: int) -> np.ndarray:
        return np.asarray(self.stream[i * self.length:(i + 1) * self.length], dtype=np.int64)


class GPTSamples(PackedSamples):
    """Causal LM samples: seq_len inputs and the seq_len next tokens (windows of seq_len + 1)."""

    def __init__(self, stream: np.ndarray, seq_len: int) -> None:
        super().__init__(stream, seq_len + 1)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        window = self.window(i)
        return window[:-1], window[1:]


class T5Samples(PackedSamples):
    """Span-corruption samples: windows of `raw_length` tokens turned into (inputs <= seq_len, targets).

    The corruption of sample i is drawn from a generator seeded by (seed, i), so a sample is the same in every
    epoch, on every rank and after a resume.
    """

    def __init__(self, stream: np.ndarray, seq_len: int, sentinels: Sequence[int], eos: int, seed: int = 0,
                 noise_density: float = 0.15, mean_span_length: float = 3.0) -> None:
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        super().__init__(stream, self._raw_length(seq_len))
        self.sentinels, self.eos, self.seed = np.asarray(sentinels, dtype=np.int64), eos, seed

    def _spans(self, raw_length: int) -> Tuple[int, int]:
        noise = max(1, round(raw_length * self.noise_density))
        return noise, max(1, round(noise / self.mean_span_length))

    def _raw_length(self, seq_len: int) -> int:
        # The longest window whose corrupted input (kept tokens + one sentinel per span + EOS) fits seq_len.
        raw = seq_len
        while raw - self._spans(raw)[0] + self._spans(raw)[1] + 1 > seq_len:
            raw -= 1
        return raw

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        return span_corruption(self.window(i), np.random.default_rng((self.seed, i)), *self._spans(self.length),
                               self.sentinels, self.eos)


def span_corruption(tokens: np.ndarray, rng: np.random.Generator, num_noise: int, num_spans: int,
                    sentinels: np.ndarray, eos: int) -> Tuple[np.ndarray, np.ndarray]:
    """T5's objective: drop `num_spans` random spans covering `num_noise` tokens; the input keeps the rest with a
    sentinel where each span was, the target lists each sentinel followed by its span. Lengths depend only on
    the arguments: inputs ``len - num_noise + num_spans + 1``, targets ``num_noise + num_spans + 1``."""
    noise_lengths = _random_partition(num_noise, num_spans, rng)
    kept_lengths = _random_partition(len(tokens) - num_noise, num_spans, rng)
    inputs: List[np.ndarray] = []
    targets: List[np.ndarray] = []
    start = 0
    for span, (kept, noise) in enumerate(zip(kept_lengths, noise_lengths)):
        marker = sentinels[span:span + 1]
        inputs += [tokens[start:start + kept], marker]
        targets += [marker, tokens[start + kept:start + kept + noise]]
        start += kept + noise
    end = np.array([eos], dtype=np.int64)
    return np.concatenate(inputs + [end]), np.concatenate(targets + [end])


def _random_partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`parts` positive integers summing to `total`, uniformly over compositions."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else []
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def train_valid_split(dataset: IndexedDataset, valid_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    """The token stream cut in two: the first (1 - valid_fraction) for training, the tail for validation.

    The cut falls on the document boundary nearest to that fraction, so no document (a file, for the code
    corpus) is in both; only a corpus of a single document is cut inside it.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    total = len(dataset.tokens)
    target = int(total * (1.0 - valid_fraction))
    # Token offsets of the document starts (each document here is one sequence: preprocess writes them so).
    starts = np.cumsum(np.concatenate([[0], dataset.sizes.astype(np.int64)]))[dataset.document_index]
    inner = starts[(starts > 0) & (starts < total)]
    cut = int(inner[np.argmin(np.abs(inner - target))]) if len(inner) else target
    return dataset.tokens[:cut], dataset.tokens[cut:]


class Batches:
    """Micro-batches of `samples` for each (step, micro step, data-parallel rank), from a seeded order per epoch.

    The order depends only on (seed, epoch), so any rank can compute its batch of any step: a resumed run
    continues exactly where the interrupted one stopped.
    """

    def __init__(self, samples, micro_batch: int, grad_accum: int, dp_rank: int, dp_size: int, seed: int,
                 shuffle: bool = True) -> None:
        if len(samples) < micro_batch * dp_size:
            raise ValueError(f"{len(samples)} samples cannot fill one micro-batch of {micro_batch} on {dp_size} "
                             f"ranks: use more data, a shorter sequence or a smaller batch")
        self.samples, self.micro_batch, self.grad_accum = samples, micro_batch, grad_accum
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self._orders: Dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.samples)
            self._orders = {epoch: np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle
                            else np.arange(n)}
        return self._orders[epoch]

    def get(self, step: int, micro_step: int = 0) -> Dict[str, torch.Tensor]:
        first = ((step * self.grad_accum + micro_step) * self.dp_size + self.dp_rank) * self.micro_batch
        n = len(self.samples)
        pairs = [self.samples[int(self._order(p // n)[p % n])] for p in range(first, first + self.micro_batch)]
        return {"input_ids": torch.from_numpy(np.stack([a for a, _ in pairs])),
                "labels": torch.from_numpy(np.stack([b for _, b in pairs]))}


class EvalBatches:
    """Validation micro-batches of samples spread evenly over the whole split, the same ones at every evaluation.

    A validation tail is not a random sample: the code corpus keeps whole files in hash order, so its first
    batches are a few files. Taking every k-th sample spreads the point over all of them. Every rank gets the same
    number of batches of the same sizes (an expert-parallel forward is a collective), so the count is rounded
    down to a multiple of the ranks.
    """

    def __init__(self, samples, num_samples: int, micro_batch: int, dp_rank: int, dp_size: int) -> None:
        total = len(samples)
        if total < dp_size or micro_batch < 1:
            raise ValueError(f"{total} validation samples cannot give each of {dp_size} ranks a batch")
        count = max(dp_size, min(num_samples, total) // dp_size * dp_size)
        spread = (np.arange(count, dtype=np.int64) * total) // count  # evenly spaced, first sample first
        self.samples, self.micro_batch = samples, micro_batch
        self.indices = spread[dp_rank::dp_size]
        self.num_samples = count

    def __len__(self) -> int:
        return -(-len(self.indices) // self.micro_batch)

    def get(self, i: int) -> Dict[str, torch.Tensor]:
        chosen = self.indices[i * self.micro_batch:(i + 1) * self.micro_batch]
        pairs = [self.samples[int(j)] for j in chosen]
        return {"input_ids": torch.from_numpy(np.stack([a for a, _ in pairs])),
                "labels": torch.from_numpy(np.stack([b for _, b in pairs]))}
