"""Grid and tile sizes for the host side of the kernel launches, in plain Python.

Since Triton 3.x, ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions. Called from host code,
each goes through a wrapper that unwraps every argument, which costs about 7 µs a call on a 2-core CPU. An encode
and a decode of one crossing made a dozen such calls, about 40% of the plugin's own host time around the two
launches. These are the same arithmetic, called as plain functions. Kernels keep Triton's own.
"""
from __future__ import annotations


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for positive y: ``triton.cdiv``'s (x + y - 1) // y."""
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 at or above n (n ≥ 1), by ``triton.next_power_of_2``'s bit trick (0 for n = 0)."""
    n -= 1
    n |= n >> 1
    n |= n >> 2
    n |= n >> 4
    n |= n >> 8
    n |= n >> 16
    n |= n >> 32
    return n + 1
