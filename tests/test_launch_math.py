"""lshmoe_plugin/kernels/launch_math.py: the host-side grid arithmetic is ceil division and the next power of two
(checked against their definitions everywhere), and gives Triton's own results (triton.cdiv and
triton.next_power_of_2, which the kernels' launches called before) where Triton is installed."""
import pytest

from lshmoe_plugin.kernels.launch_math import cdiv, next_power_of_2

SIZES = list(range(0, 5000)) + [2**k + e for k in range(12, 40) for e in (-1, 0, 1)]
DIVISORS = (1, 2, 3, 7, 8, 32, 100, 128, 4096)


def test_cdiv_is_ceil_division_and_next_power_of_2_the_smallest_power_at_or_above():
    for n in SIZES[1:]:
        power = next_power_of_2(n)
        assert power >= n and power & (power - 1) == 0 and (power == 1 or power // 2 < n), n
    assert next_power_of_2(0) == 0  # Triton's bit trick gives 0 there; launches never ask
    for x in SIZES:
        for y in DIVISORS:
            assert cdiv(x, y) == -(-x // y), (x, y)


def test_the_same_results_as_tritons():
    triton = pytest.importorskip("triton")
    for n in SIZES:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    for x in SIZES[:600] + SIZES[-30:]:
        for y in DIVISORS:
            assert cdiv(x, y) == triton.cdiv(x, y), (x, y)
