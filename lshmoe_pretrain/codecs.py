"""Codecs for the tokens an MoE layer dispatches to its experts, as pure tensor functions, for measuring what each
would cost on the wire and in accuracy (lshmoe_pretrain.compressibility) and for a wire format to reuse later.

Every codec takes one layer's dispatch, ``tokens (E, W, d)`` (the values the wire carries in bf16, as float32) and
``valid (E, W)`` bool (the slots that hold a real token), and returns ``(x_hat, nbytes)``: what the receiving
experts compute on, float32 (E, W, d), zero in padding slots, and the bytes the codec puts on the wire for this
dispatch, everything the receiver needs counted (values, scales, indices, per-expert counts). The return trip is
not counted here.

Two layouts, as in the plugin: the *fixed* one (DeepSpeed's layer) sends ``ceil(rate * W)`` centroid slots per
expert whatever the fill, empty ones too; the *variable* one sends only what exists, with a 4-byte count per
expert. Per-token codecs send the real tokens only (one row each) and need no count: the receiver knows the
routing of the tokens it gets from stock's exchange of split sizes, which every layout pays alike.
"""
from __future__ import annotations

import math
from typing import Callable, Tuple

import torch

from lshmoe_plugin.compressor import LSHCompressor, fixed_slots
from lshmoe_plugin.config import LSHMoEConfig
from lshmoe_plugin.telemetry import Telemetry
from lshmoe_plugin.wire import wire_format

BF16_BYTES = 2
SCALE_BYTES = 4          # every scale is one float32
COUNT_BYTES = 4          # a per-expert count of a variable layout (int32)
FP8_MAX = 448.0          # largest finite float8_e4m3fn
Codec = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, int]]


def wire_bf16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to what a bf16 wire carries, back in float32."""
    return x.to(torch.bfloat16).float()


def stock_bytes(valid: torch.Tensor, d_model: int) -> int:
    """Stock's bf16 bytes for the real tokens of a dispatch: 2 d bytes each (its padding slots not counted)."""
    return int(valid.sum()) * d_model * BF16_BYTES


# -- per-row quantisers on (N, d) rows; each returns (rows_hat (N, d), bytes) --------------------------------------
def int_rows(rows: torch.Tensor, bits: int) -> Tuple[torch.Tensor, int]:
    """Symmetric per-row integer quantisation: levels -q..q with q = 2**(bits-1) - 1 (127, 7, 1 for 8, 4, 2 bits),
    scale = max |x| / q in float32. rows (N, d) -> (N, d), N * (ceil(d * bits / 8) + 4) bytes. Every element is
    within scale / 2 of its value."""
    if bits < 2:
        raise ValueError(f"int_rows: bits must be >= 2 (symmetric levels), got {bits}")
    levels = 2 ** (bits - 1) - 1
    scale = _scale(rows.abs().amax(dim=1, keepdim=True), levels)
    hat = torch.round(rows / scale).clamp(-levels, levels) * scale
    return hat, rows.shape[0] * (math.ceil(rows.shape[1] * bits / 8) + SCALE_BYTES)


def fp8_rows(rows: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Per-row float8 e4m3 with one float32 scale, max |x| -> 448. rows (N, d) -> (N, d), N * (d + 4) bytes."""
    scale = _scale(rows.abs().amax(dim=1, keepdim=True), FP8_MAX)
    hat = (rows / scale).to(torch.float8_e4m3fn).float() * scale
    return hat, rows.shape[0] * (rows.shape[1] + SCALE_BYTES)


def fp8_blocks(rows: torch.Tensor, block: int = 128) -> Tuple[torch.Tensor, int]:
    """float8 e4m3 with one float32 scale per `block` consecutive elements of a row (the last block may be short).
    rows (N, d) -> (N, d), N * (d + 4 * ceil(d / block)) bytes."""
    n, d = rows.shape
    blocks = math.ceil(d / block)
    padded = torch.nn.functional.pad(rows, (0, blocks * block - d)).view(n, blocks, block)
    scale = _scale(padded.abs().amax(dim=2, keepdim=True), FP8_MAX)
    hat = ((padded / scale).to(torch.float8_e4m3fn).float() * scale).view(n, blocks * block)[:, :d]
    return hat, n * (d + SCALE_BYTES * blocks)


def wire_rows(rows: torch.Tensor, name: str, block: int, scale: str) -> Tuple[torch.Tensor, int]:
    """The plugin's own wire format (`lshmoe_plugin.wire`, its PyTorch reference), as training with
    ``dispatch_dtype: name`` sends a bf16 model's rows: encoded from bf16, decoded back to bf16. rows (N, d) -> (N, d)
    and the format's bytes, scales included."""
    fmt = wire_format(name, block, scale, kernel="torch")
    model_rows = rows.to(torch.bfloat16)
    hat = fmt.decode(fmt.encode(model_rows), rows.shape[1], torch.bfloat16).float()
    return hat, fmt.bytes(rows.shape[0], rows.shape[1], torch.bfloat16)


def _scale(amax: torch.Tensor, top: float) -> torch.Tensor:
    # An all-zero row (or block) has nothing to scale; any non-zero scale maps it to zeros.
    return torch.where(amax > 0, amax / top, torch.ones_like(amax)).float()


ROW_QUANTISERS = {"fp8": fp8_rows, "fp8_block128": fp8_blocks, "int8": lambda r: int_rows(r, 8),
                  "int6": lambda r: int_rows(r, 6), "int4": lambda r: int_rows(r, 4), "int2": lambda r: int_rows(r, 2),
                  # the plugin's wire formats as the study's candidates train with them (fp8_both_e8m0, fp4_both,
                  # fp4_both_b16, fp6_both); the _sr candidates send fp4_both's and fp8_fwd_fp4_grad's rows (only their
                  # gradients round otherwise)
                  "fp8_e8m0": lambda r: wire_rows(r, "fp8_e4m3", 128, "e8m0"),
                  "fp4": lambda r: wire_rows(r, "fp4_e2m1", 32, "e8m0"),
                  "fp4_b16": lambda r: wire_rows(r, "fp4_e2m1", 16, "e8m0"),
                  "fp6": lambda r: wire_rows(r, "fp6_e2m3", 32, "e8m0")}


def per_token(tokens: torch.Tensor, valid: torch.Tensor, quantiser: str) -> Tuple[torch.Tensor, int]:
    """Every real token through a row quantiser of `ROW_QUANTISERS`. tokens (E, W, d), valid (E, W)."""
    hat, nbytes = ROW_QUANTISERS[quantiser](tokens[valid])
    return _scatter(tokens, valid, hat), nbytes


def _scatter(tokens: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(tokens)
    out[valid] = rows
    return out


# -- cluster codecs: x_hat is each token's centroid, so E(c) + (x - c) is the paper's compensated output ------------
def lsh_centroids(tokens: torch.Tensor, valid: torch.Tensor, rate: float, num_hashes: int = 6, hash_dim: int = 8,
                  seed: int = 1234, layer_index: int = 0) -> Tuple[torch.Tensor, int]:
    """LSH-MoE as shipped on DeepSpeed's fixed layout: the plugin's own compressor (`LSHCompressor.compress_fixed`,
    reference kernels), W as the capacity. tokens (E, W, d), valid (E, W) -> each token's bf16 centroid
    (E, W, d); E * ceil(rate * W) * d * 2 bytes. At rate 1.0 every token is its own centroid: exact."""
    config = LSHMoEConfig(enabled=True, method="paper", compression_rate=rate, num_hashes=num_hashes,
                          hash_dim=hash_dim, seed=seed, kernel="torch", cuda_graphs=False, telemetry_interval=0)
    compressor = LSHCompressor(config, layer_index, telemetry=Telemetry())
    experts, width, d_model = tokens.shape
    _, state = compressor.compress_fixed(tokens.to(torch.bfloat16), valid, record=False)
    centroids = compressor.per_token(state.centroids, state).view(experts, width, d_model).float()
    return torch.where(valid.unsqueeze(-1), centroids, torch.zeros_like(centroids)), \
        experts * fixed_slots(width, rate) * d_model * BF16_BYTES


def kmeans_centroids(tokens: torch.Tensor, valid: torch.Tensor, rate: float, iterations: int = 20,
                     seed: int = 0) -> Tuple[torch.Tensor, int]:
    """k-means (k-means++ seeding, then Lloyd) per expert at LSH's fixed budget k = ceil(rate * W): the best a
    clustering of that budget does, for comparison. tokens (E, W, d), valid (E, W) -> each token's bf16 centroid
    (E, W, d); E * k * d * 2 bytes (the fixed layout, as LSH). An expert with at most k tokens sends them as
    they are."""
    experts, width, d_model = tokens.shape
    k = fixed_slots(width, rate)
    generator = torch.Generator().manual_seed(seed)
    out = torch.zeros_like(tokens)
    for e in range(experts):
        points = tokens[e][valid[e]]
        if points.shape[0] <= k:
            out[e][valid[e]] = points
            continue
        centers, assign = kmeans(points, k, iterations, generator)
        out[e][valid[e]] = wire_bf16(centers)[assign]
    return out, experts * k * d_model * BF16_BYTES


def kmeans(points: torch.Tensor, k: int, iterations: int, generator: torch.Generator):
    """Lloyd's k-means of points (n, d), k <= n, from k-means++ seeds -> (centers (k, d), assignment (n,)).
    A center that loses all its points keeps its place."""
    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    nearest = (points - points[first]).square().sum(1)
    for _ in range(1, k):
        # D^2 sampling; once every point sits on a center (duplicates), any unchosen point will do.
        weights = nearest if float(nearest.sum()) > 0 else torch.ones(n).index_fill_(0, torch.tensor(chosen), 0)
        pick = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(pick)
        nearest = torch.minimum(nearest, (points - points[pick]).square().sum(1))
    centers = points[chosen].clone()
    assign = torch.cdist(points, centers).argmin(1)
    for _ in range(iterations):
        sums = torch.zeros_like(centers).index_add_(0, assign, points)
        counts = torch.zeros(k).index_add_(0, assign, torch.ones(n))
        centers = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp(min=1).unsqueeze(1), centers)
        new = torch.cdist(points, centers).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return centers, assign


def merge_within_tolerance(tokens: torch.Tensor, valid: torch.Tensor, tau: float,
                           candidates: int = 4) -> Tuple[torch.Tensor, int]:
    """Merge near-duplicate tokens of each expert, but only where every member of the merged cluster keeps
    ||x - c|| <= tau ||x||, c the bf16 mean it is sent as. Greedy, in slot order: a token joins the first of its
    `candidates` nearest clusters that stays within the tolerance, else starts its own. The number of clusters is
    the data's. tokens (E, W, d), valid (E, W) -> each token's centroid (E, W, d); variable layout:
    (clusters * d * 2 + 4 * E) bytes. tau = 0 merges exact duplicates only (lossless)."""
    experts, _, d_model = tokens.shape
    out = torch.zeros_like(tokens)
    clusters = 0
    for e in range(experts):
        points = tokens[e][valid[e]]
        centers, assign = _greedy_merge(points, tau, candidates)
        out[e][valid[e]] = centers[assign]
        clusters += centers.shape[0]
    return out, clusters * d_model * BF16_BYTES + experts * COUNT_BYTES


def _greedy_merge(points: torch.Tensor, tau: float, candidates: int):
    n, d = points.shape
    norms = points.norm(dim=1)
    sums = torch.zeros(n, d)
    counts = torch.zeros(n)
    centers = torch.zeros(n, d)
    assign = torch.full((n,), -1, dtype=torch.long)
    k = 0
    for i in range(n):
        x = points[i]
        joined = False
        if k:
            distance = (centers[:k] - x).norm(dim=1)
            for j in distance.topk(min(candidates, k), largest=False).indices.tolist():
                members = torch.cat([(assign[:i] == j).nonzero().squeeze(1), torch.tensor([i])])
                merged = wire_bf16((sums[j] + x) / (counts[j] + 1))
                if bool(((points[members] - merged).norm(dim=1) <= tau * norms[members]).all()):
                    sums[j] += x
                    counts[j] += 1
                    centers[j], assign[i], joined = merged, j, True
                    break
        if not joined:
            sums[k], counts[k], centers[k], assign[i] = x, 1, x, k
            k += 1
    return centers[:k], assign


# -- two levels: the expert sees every token, as its LSH centroid plus a quantised residual -----------------------
def centroid_plus_residual(tokens: torch.Tensor, valid: torch.Tensor, rate: float, quantiser: str,
                           layer_index: int = 0) -> Tuple[torch.Tensor, int]:
    """x_hat = c + Q(x - c): c the token's LSH centroid (`lsh_centroids`, fixed layout), Q a row quantiser of
    `ROW_QUANTISERS` with its per-row scale. tokens (E, W, d), valid (E, W) -> (E, W, d); bytes: the centroids,
    each real token's quantised residual row, and its centroid's index within its expert (ceil(log2(slots))
    bits, packed)."""
    centroids, centroid_bytes = lsh_centroids(tokens, valid, rate, layer_index=layer_index)
    residual_hat, residual_bytes = ROW_QUANTISERS[quantiser]((tokens - centroids)[valid])
    slots = fixed_slots(tokens.shape[1], rate)
    index_bytes = math.ceil(int(valid.sum()) * max(1, math.ceil(math.log2(slots))) / 8)
    return _scatter(tokens, valid, centroids[valid] + residual_hat), centroid_bytes + residual_bytes + index_bytes
