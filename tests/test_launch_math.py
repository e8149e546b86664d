"""lshmoe_plugin/kernels/launch_math.py: the host-side grid arithmetic gives Triton's own results (triton.cdiv and
triton.next_power_of_2, which the kernels' launches called before) for every size a launch meets."""
import pytest

from lshmoe_plugin.kernels.launch_math import cdiv, next_power_of_2

triton = pytest.importorskip("triton")


def test_cdiv_and_next_power_of_2_match_tritons():
    sizes = list(range(0, 5000)) + [2**k + e for k in range(12, 40) for e in (-1, 0, 1)]
    for n in sizes:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    for x in sizes[:600] + sizes[-30:]:
        for y in (1, 2, 3, 7, 8, 32, 100, 128, 4096):
            assert cdiv(x, y) == triton.cdiv(x, y), (x, y)
