"""What the wire tests on the three frameworks (DeepSpeed, AutoEP, Megatron-core) share: the cases (lsh_moe keys and
what each crossing carries), the bytes of a row in each format, the reference rounding of a crossing with its
straight-through gradient, and a recorder of the row buffers handed to the real all-to-all."""
import math
from typing import Dict

import torch
from test_wire import grid_neighbours, reference_round_trip

from lshmoe_plugin.rounding import uniforms
from lshmoe_plugin.wire import FORMAT_KEYS

BLOCK = 8
# The formats the cases send, as (wire dtype, scale coding); every one with BLOCK elements per scale. A kind ending
# in "_sr" rounds stochastically (a gradient's only: grad_rounding "stochastic"); its bytes are its format's.
KINDS = {"fp8": ("fp8_e4m3", "float32"), "fp8_e8m0": ("fp8_e4m3", "e8m0"), "fp4": ("fp4_e2m1", "e8m0"),
         "fp6": ("fp6_e2m3", "e8m0"), "fp8_sr": ("fp8_e4m3", "float32"), "fp4_sr": ("fp4_e2m1", "e8m0")}

# lsh_moe keys, and what each of the four crossings (dispatch, combine, combine's grad, dispatch's grad) carries:
# a kind of KINDS, or None for the model's dtype.
CASES = {"fp8_dispatch": ({"dispatch_dtype": "fp8_e4m3"}, ("fp8", None, None, "fp8")),
         "fp8_both": ({"dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3"}, ("fp8",) * 4),
         "fp8_to_experts": ({"dispatch_dtype": "fp8_e4m3", "dispatch_grad_dtype": "model",
                             "combine_grad_dtype": "fp8_e4m3"}, ("fp8", None, "fp8", None)),
         "fp8_e8m0_both": ({"dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3", "fp8_scale": "e8m0"},
                           ("fp8_e8m0",) * 4),
         "fp4_dispatch": ({"dispatch_dtype": "fp4_e2m1"}, ("fp4", None, None, "fp4")),
         "fp4_both": ({"dispatch_dtype": "fp4_e2m1", "combine_dtype": "fp4_e2m1"}, ("fp4",) * 4),
         "fp8_forward_fp4_grads": ({"dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3",
                                    "dispatch_grad_dtype": "fp4_e2m1", "combine_grad_dtype": "fp4_e2m1"},
                                   ("fp8", "fp8", "fp4", "fp4")),
         "fp6_both": ({"dispatch_dtype": "fp6_e2m3", "combine_dtype": "fp6_e2m3"}, ("fp6",) * 4),
         "fp6_forward_fp4_grads": ({"dispatch_dtype": "fp6_e2m3", "combine_dtype": "fp6_e2m3",
                                    "dispatch_grad_dtype": "fp4_e2m1", "combine_grad_dtype": "fp4_e2m1"},
                                   ("fp6", "fp6", "fp4", "fp4"))}

# The dispatch alone in a format (forward, backward): what the identity-expert layers check, values and gradients.
DISPATCH_CASES = {"fp8": ({"dispatch_dtype": "fp8_e4m3"}, ("fp8", "fp8")),
                  "fp8_e8m0": ({"dispatch_dtype": "fp8_e4m3", "fp8_scale": "e8m0"}, ("fp8_e8m0", "fp8_e8m0")),
                  "fp4": ({"dispatch_dtype": "fp4_e2m1"}, ("fp4", "fp4")),
                  "fp8_fp4_grad": ({"dispatch_dtype": "fp8_e4m3", "dispatch_grad_dtype": "fp4_e2m1"},
                                   ("fp8", "fp4"))}


def with_blocks(keys: dict) -> dict:
    """`keys` with BLOCK elements per scale for each scaled format they use (a format's block key is refused while
    no crossing uses the format)."""
    used = set(keys.values())
    return {**keys, **{block_key: BLOCK for fmt, (block_key, _) in FORMAT_KEYS.items() if fmt in used}}


def row_bytes(kind, hidden: int) -> int:
    """Bytes of one row `hidden` wide in `kind`, values and scales (None: the model's float32)."""
    if kind is None:
        return 4 * hidden
    fmt, scale = KINDS[kind]
    values = {"fp8_e4m3": hidden, "fp4_e2m1": math.ceil(hidden / 2), "fp6_e2m3": 3 * math.ceil(hidden / 4)}[fmt]
    return values + {"float32": 4, "e8m0": 1}[scale] * math.ceil(hidden / BLOCK)


def crossing(kind, rows: int, hidden: int):
    """(dtype name, bytes) of a buffer of `rows` rows in `kind`: uint8 in a wire format, else the model's float32."""
    return ("torch.float32" if kind is None else "torch.uint8"), rows * row_bytes(kind, hidden)


def rounded(rows: torch.Tensor, kind, draws=None) -> torch.Tensor:
    """The reference rounding of rows (..., d) in `kind` (None: unchanged), in their dtype; a stochastic kind takes
    its draw's counter from `draws` (a `Draws`)."""
    if kind is not None and kind.endswith("_sr"):
        if draws is None:
            raise ValueError(f"kind {kind!r} rounds stochastically: its rounding needs the draws (a Draws)")
        return stochastically_rounded(rows, kind, draws.take(kind))
    return rows if kind is None else reference_round_trip(rows, BLOCK, *KINDS[kind]).to(rows.dtype)


def stochastically_rounded(rows: torch.Tensor, kind: str, counter: int) -> torch.Tensor:
    """rows (..., d) rounded stochastically in `kind` by draw `counter`: each element's scaled magnitude |x / s| (s
    its block's scale, nearest's) goes to its upper grid neighbour when its uniform is below (|x / s| - lo) /
    (hi - lo), else to the lower (test_wire.grid_neighbours, a search over the grid); the uniform is the one
    lshmoe_plugin.rounding hashes from the element's flat index in `rows` and the counter, as the plugin's encode of
    this buffer draws it."""
    fmt, scale = KINDS[kind]
    lo, hi, s = grid_neighbours(rows, BLOCK, fmt, scale)
    magnitude = (rows.float() / s).abs().double()
    u = uniforms(rows.shape, torch.tensor(counter, dtype=torch.int64, device=rows.device)).double()
    up = (hi > lo) & (u < (magnitude - lo) / (hi - lo))  # hi == lo: on the grid; hi infinite: past the largest
    return (torch.where(up, hi, lo).float() * s * torch.where(rows < 0, -1.0, 1.0)).to(rows.dtype)


class Draws:
    """The draw counters of the stochastic kinds, each advanced by one per rounding, as the plugin keeps one counter
    per format (and device), advanced by one per encode: started at the plugin's counters' values, the reference
    draws the bits that the plugin's next encodes draw, in the same order."""

    def __init__(self, start: Dict[str, int]):
        self.next = dict(start)

    def take(self, kind: str) -> int:
        if kind not in self.next:
            raise AssertionError(f"the reference rounds a gradient in {kind!r}, but the plugin's format for it keeps "
                                 f"no draw counter (it does not round stochastically); counters: {self.next}")
        counter = self.next[kind]
        self.next[kind] += 1
        return counter


class RoundTrip(torch.autograd.Function):
    """The reference of one crossing's coding: the forward rounded in `forward_kind`, the gradient in
    `backward_kind` (straight-through). Rounding to nearest per row commutes with the all-to-all, which only moves
    rows; a stochastic gradient's uniforms are those of the buffer it is encoded in (`GradRound`)."""

    @staticmethod
    def forward(ctx, rows, forward_kind, backward_kind):
        ctx.backward_kind = backward_kind
        return rounded(rows, forward_kind)

    @staticmethod
    def backward(ctx, grad):
        return rounded(grad, ctx.backward_kind), None, None


class GradRound(torch.autograd.Function):
    """The identity forward; the gradient rounded in `kind` (None: unchanged) on its way back. Placed after a
    crossing's all-to-all, it rounds the gradient on the rank and in the buffer that sends it back, where the plugin
    encodes it: what a stochastic rounding's uniforms (per rank, per element of the buffer) need."""

    @staticmethod
    def forward(ctx, rows, kind, draws=None):
        ctx.kind, ctx.draws = kind, draws
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad):
        return rounded(grad, ctx.kind, ctx.draws), None, None


class TokenCrossings:
    """(dtype, rows, bytes) of the row buffers handed to `module.all_to_all_single` (1-D exchanges, the counts or
    the probabilities, skipped). `module`: deepspeed.comm for AutoEP, torch.distributed for Megatron-core."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.original, self.calls = self.module.all_to_all_single, []

        def counting(output, tensor, *args, **kwargs):
            if tensor.dim() == 2:
                self.calls.append((str(tensor.dtype), tensor.shape[0], tensor.numel() * tensor.element_size()))
            return self.original(output, tensor, *args, **kwargs)
        self.module.all_to_all_single = counting
        return self

    def __exit__(self, *exc):
        self.module.all_to_all_single = self.original
