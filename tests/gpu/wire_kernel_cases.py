"""What the tests of the fused wire-format kernels share (tests/gpu/test_wire_triton.py, test_wire_fp4_triton.py,
test_wire_fp6_triton.py):
where they run, exact casts under Triton's interpreter, rows of edge values, and a bit-for-bit comparison of
decoded rows that lets NaN's payload differ (it carries nothing: the GPU's arithmetic makes canonical NaNs where the
CPU's keeps or flips the sign)."""
import os

import numpy as np
import pytest
import torch
from test_wire import heavy_tailed

triton_language = pytest.importorskip("triton.language")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu only under TRITON_INTERPRET=1
on_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


@pytest.fixture(autouse=True, scope="module")
def exact_interpreter_casts():
    """Under TRITON_INTERPRET=1, torch's casts between float32 and e4m3 or bf16 replace the
    interpreter's: it rounds to e4m3 half-up without a sticky bit, reads e4m3's NaN (0x7f) as 480, truncates to
    bf16 and widens bf16's subnormals to wrong values. On a GPU each is one instruction, exact or rounding to
    nearest even (cvt.rn), which these casts are; everything else the kernels do (scales, divisions, clamps,
    masks, layout) still runs as written. A test module uses it by importing it."""
    if not INTERPRETED:
        yield
        return
    from triton.runtime import interpreter
    tl, builder = triton_language, interpreter.InterpreterBuilder
    exact = {(tl.float32, tl.float8e4nv): lambda t: t.to(torch.float8_e4m3fn).view(torch.uint8),
             (tl.float8e4nv, tl.float32): lambda t: t.view(torch.float8_e4m3fn).float(),
             (tl.float32, tl.bfloat16): lambda t: t.to(torch.bfloat16).view(torch.int16),
             (tl.bfloat16, tl.float32): lambda t: t.view(torch.bfloat16).float()}
    fp_to_fp, cast_impl = builder.create_fp_to_fp, builder.cast_impl

    def cast(src, dst_type, fallback):
        convert = exact.get((src.dtype.scalar, dst_type.scalar))
        if convert is None:
            return fallback()
        out = convert(torch.from_numpy(np.ascontiguousarray(src.data))).numpy()
        return interpreter.TensorHandle(out.view(interpreter._get_np_dtype(dst_type)), dst_type.scalar)

    builder.create_fp_to_fp = lambda self, src, dst, mode: cast(src, dst, lambda: fp_to_fp(self, src, dst, mode))
    builder.cast_impl = lambda self, src, dst: cast(src, dst, lambda: cast_impl(self, src, dst))
    yield
    builder.create_fp_to_fp, builder.cast_impl = fp_to_fp, cast_impl


def edge_rows(d: int, dtype: torch.dtype) -> torch.Tensor:
    """37 rows (not a multiple of any tile) of heavy-tailed values and, in rows of their own: zeros, float32's
    subnormals and values whose scale clamps to its smallest value, the dtype's largest finite values, and one NaN,
    inf or -inf (which poison their block)."""
    info = torch.finfo(dtype)
    x = (heavy_tailed(37, d, seed=d) / 64).to(dtype)
    x[0] = 0
    x[1] = (torch.randn(d) * 1e-38 if dtype != torch.float16 else torch.randn(d) * 1e-6).to(dtype)
    x[2] = info.tiny if dtype != torch.float16 else info.tiny * 2**-10  # float16: its smallest subnormal
    x[2, ::2] *= -1
    x[3] = info.max * torch.sign(torch.randn(d)).to(dtype)
    x[4, d // 2] = float("nan")
    x[5, d - 1] = float("inf")
    x[6, 0] = -float("inf")
    return x.to(DEVICE)


FINITE = torch.ones(37, dtype=torch.bool)
FINITE[4:7] = False  # edge_rows' rows with NaN or inf
POISONED = ((4, lambda d: d // 2), (5, lambda d: d - 1), (6, lambda d: 0))  # (row, column) of each NaN or inf


def assert_same_rows(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.dtype == expected.dtype and out.shape == expected.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan)
    view = INT_VIEW[out.dtype]
    assert torch.equal(out.view(view)[~nan], expected.view(view)[~nan])


def assert_poisoned_blocks(decoded: torch.Tensor, d: int, block) -> None:
    """NaN and inf poison their block: nothing of it comes back finite."""
    size = d if block is None else block
    for row, column in POISONED:
        first = column(d) // size * size
        assert not torch.isfinite(decoded[row, first:first + size]).any()
