"""The wire format of one all-to-all crossing: what a tensor of rows (..., d) becomes on the network, and back.

- ``model``: the rows as they are, in the model's dtype. Nothing runs: the patches keep the framework's own
  all-to-all for a crossing whose both directions are ``model``.
- ``fp8_e4m3``: every row in float8 e4m3 (``torch.float8_e4m3fn``) with one float32 scale per row or per block of
  `block` elements, packed into one uint8 buffer (E, ..., d + 4 * blocks) whose first dimension splits over the
  ranks as the rows would: one all-to-all moves values and scales together, and its bytes are what is counted.

Rounding error of ``fp8_e4m3`` (derived in `FP8E4M3`, asserted in tests/test_wire.py): every element comes back
within max(2^-4 |x|, 2^-10 s) of itself, s = amax / 448 the scale of its block (plus the rounding of the result
to the model's dtype): at most 2^-4 of the block's largest magnitude. NaN and inf poison their block (a loss
scaler still sees the overflow).

Gradients (`cross`): straight-through for the rounding; the backward crossing carries the gradient in its own
format with scales of its own. Shape-static, no host synchronisation (CUDA-graph capturable). ``fp8_e4m3`` encodes
and decodes on CUDA with the fused kernels of kernels/wire_triton.py (one pass each, the reference's bits), unless
``lsh_moe.kernel`` is ``torch``; PyTorch's reference runs elsewhere.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Tuple, Union

import torch

from . import ops

WIRE_DTYPES = ("model", "fp8_e4m3")
CROSSINGS = ("dispatch", "combine")
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
_SCALE_BYTES = 4  # float32
FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what kernels/wire_triton.py reads and writes

Exchange = Callable[[torch.Tensor], torch.Tensor]  # a plain all-to-all of one buffer along dim 0 (no autograd)


class ModelDtype:
    """The rows as they are: what the frameworks send today."""

    name = "model"

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.contiguous()

    def decode(self, buffer: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
        return buffer

    def bytes(self, rows: int, d: int, dtype: torch.dtype) -> int:
        return rows * d * dtype.itemsize


class FP8E4M3:
    """float8 e4m3 values, one float32 scale per block of `block` elements of a row (None: per row).

    Scale s = amax / 448 per block, so the block's largest magnitude lands on e4m3's largest finite value. Error
    bound: e4m3 keeps 3 mantissa bits, so round-to-nearest moves a normal value y = x / s (|y| >= 2^-6) by at most
    half a unit in the last place, 2^-4 |y|, and a subnormal one by at most half the subnormal spacing 2^-9;
    scaled back, |x_hat - x| <= max(2^-4 |x|, 2^-10 s) <= 2^-4 amax, up to float32's rounding of x / s and q * s.
    """

    name = "fp8_e4m3"
    kernel = "auto"  # lsh_moe.kernel, set by wire_format: where encode and decode run the fused kernels (ops)

    def __init__(self, block: Optional[int] = None) -> None:
        self.block = block

    def blocks(self, d: int) -> int:
        return 1 if self.block is None else math.ceil(d / self.block)

    def quantize(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """rows (..., d) -> values float8_e4m3fn (..., d), scales float32 (..., blocks)."""
        blocked, d = self._blocked(rows.float())
        amax = blocked.abs().amax(-1)
        # A zero block gets the smallest normal scale instead of 0, so that 0 / s stays 0 without a branch. 448 as
        # a tensor: CUDA turns a division by a Python number into a product with its float32 reciprocal, one ulp
        # off for about half the blocks, and the scales must have the same bits on every device and kernel.
        scales = (amax / amax.new_full((), E4M3_MAX)).clamp(min=torch.finfo(torch.float32).tiny)
        scaled = (blocked / scales.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX)
        values = scaled.flatten(-2)[..., :d].to(torch.float8_e4m3fn)
        return values, scales

    def dequantize(self, values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """values (..., d), scales (..., blocks) -> rows (..., d) in `dtype`."""
        blocked, d = self._blocked(values.float())
        return (blocked * scales.unsqueeze(-1)).flatten(-2)[..., :d].to(dtype)

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        if self._fused(rows, rows.dtype):
            return ops.fused_module("wire_triton", self.kernel).encode(rows, self.block)
        values, scales = self.quantize(rows)
        return torch.cat([values.view(torch.uint8), scales.view(torch.uint8)], dim=-1)

    def decode(self, buffer: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
        if self._fused(buffer, dtype):
            return ops.fused_module("wire_triton", self.kernel).decode(buffer, d, self.block, dtype)
        values = buffer[..., :d].view(torch.float8_e4m3fn)
        scales = buffer[..., d:].contiguous().view(torch.float32)
        return self.dequantize(values, scales, dtype)

    def bytes(self, rows: int, d: int, dtype: torch.dtype) -> int:
        return rows * (d + _SCALE_BYTES * self.blocks(d))

    def _fused(self, tensor: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether the fused kernels encode or decode `tensor` (model dtype `dtype`): on CUDA unless the kernel is
        'torch', for the dtypes they read and write (the reference takes any other, and empty tensors), on GPUs
        that cast to e4m3 (`wire_triton.runs_on`)."""
        return (ops.runs_fused(self.kernel, tensor.device) and tensor.numel() > 0 and dtype in FUSED_DTYPES
                and ops.fused_module("wire_triton", self.kernel).runs_on(tensor.device, self.kernel))

    def _blocked(self, rows: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """(..., d) -> (..., blocks, block), the last block zero-padded: padding changes no block's amax."""
        d = rows.shape[-1]
        size = d if self.block is None else self.block
        pad = self.blocks(d) * size - d
        if pad:
            rows = torch.nn.functional.pad(rows, (0, pad))
        return rows.unflatten(-1, (self.blocks(d), size)), d


WireFormat = Union[ModelDtype, FP8E4M3]
MODEL = ModelDtype()


@functools.lru_cache(maxsize=None)
def wire_format(name: str, block: Union[str, int] = "row", kernel: str = "auto") -> WireFormat:
    """The format called `name` (one of WIRE_DTYPES); `block` is ``lsh_moe.fp8_block_size``, `kernel`
    ``lsh_moe.kernel`` (``torch``: the PyTorch reference on every device)."""
    if name == "model":
        return MODEL
    if name == "fp8_e4m3":
        fmt = FP8E4M3(None if block == "row" else block)
        fmt.kernel = kernel
        return fmt
    raise ValueError(f"wire dtype {name!r}: allowed {list(WIRE_DTYPES)}")


def formats(config, crossing: str) -> Tuple[WireFormat, WireFormat]:
    """(forward, backward) formats of `crossing` ("dispatch" or "combine") under an LSHMoEConfig: the backward
    follows the forward unless ``<crossing>_grad_dtype`` is set."""
    forward = getattr(config, f"{crossing}_dtype")
    backward = getattr(config, f"{crossing}_grad_dtype") or forward
    block, kernel = config.fp8_block_size, config.kernel
    return wire_format(forward, block, kernel), wire_format(backward, block, kernel)


def changes_crossing(config, crossing: str) -> bool:
    """Whether `crossing` sends anything but the model's rows in either direction (else the framework's own
    all-to-all runs, unchanged)."""
    return any(f is not MODEL for f in formats(config, crossing))


def bytes_per_crossing(config, rows: int, d: int, dtype: torch.dtype) -> Union[int, float]:
    """Bytes of one buffer of `rows` rows (d wide, `dtype` in the model) per crossing, the mean of the four a
    training step makes (dispatch and combine, forward and backward): with one format everywhere, each one's."""
    total = sum(f.bytes(rows, d, dtype) for crossing in CROSSINGS for f in formats(config, crossing))
    return total // 4 if total % 4 == 0 else total / 4


def send(fmt: WireFormat, rows: torch.Tensor, exchange: Exchange) -> torch.Tensor:
    """rows (N, ..., d) encoded, exchanged and decoded (as many rows as the exchange brings); no autograd."""
    return fmt.decode(exchange(fmt.encode(rows)), rows.shape[-1], rows.dtype)


def split_exchanges(all_to_all_single, group, input_splits, output_splits) -> Tuple[Exchange, Exchange]:
    """A variable-size all-to-all (rows out per rank `input_splits`, in `output_splits`) through the framework's
    `all_to_all_single`, and its transpose (the splits swapped), which carries the gradient back."""
    def exchange(send_splits, receive_splits) -> Exchange:
        def run(buffer: torch.Tensor) -> torch.Tensor:
            rows = buffer.shape[0] if receive_splits is None else int(sum(receive_splits))  # None: equal splits
            received = buffer.new_empty((rows,) + tuple(buffer.shape[1:]))
            all_to_all_single(received, buffer.contiguous(), output_split_sizes=receive_splits,
                              input_split_sizes=send_splits, group=group)
            return received
        return run
    return exchange(input_splits, output_splits), exchange(output_splits, input_splits)


class _Crossing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, forward: WireFormat, backward: WireFormat, exchange: Exchange,
                exchange_back: Exchange):
        ctx.backward, ctx.exchange_back = backward, exchange_back
        return send(forward, rows, exchange)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Straight-through: the rounding's derivative is taken as the identity; the gradient is rounded in its
        # own format on its way back, through the all-to-all's transpose.
        return send(ctx.backward, grad, ctx.exchange_back), None, None, None, None


def cross(rows: torch.Tensor, forward: WireFormat, backward: WireFormat, exchange: Exchange,
          exchange_back: Optional[Exchange] = None) -> torch.Tensor:
    """rows (N, ..., d) through `exchange` in `forward`'s format; their gradient back in `backward`'s, through
    `exchange_back` (default `exchange`: an all-to-all of equal splits is its own transpose)."""
    return _Crossing.apply(rows, forward, backward, exchange, exchange_back or exchange)
