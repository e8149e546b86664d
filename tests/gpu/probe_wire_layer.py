"""Where DeepSpeed's layer with FP8 crossings departs from the hand-built reference on CUDA (not a test: a probe).

On the H200 (2026-12-05) `test_deepspeed_layer_with_fp8_crossings_over_nccl[check_wire_formats]` failed for the
cases with float32 FP8 scales (fp8_dispatch, fp8_both, fp8_to_experts, ...) while e8m0 and FP4 passed, and the
codec tests (fused against reference, CUDA against CPU) all passed. This prints, per top-k and case, the largest
difference of the output, the input gradient and the parameter gradients from the reference, with the fused
kernels (`kernel: auto`) and with the PyTorch reference codec (`kernel: torch`), and whether two identical
forward+backward passes of the patched layer agree (nondeterminism rather than a wrong value). The suspected
cause, fixed since in tests/test_wire.py `reference_scales`: the test's reference divided amax by the Python float
448, which CUDA computes as a product with its reciprocal (one ulp off for some blocks) while the plugin divides
correctly rounded; e8m0 and FP4's default e8m0 scales never divide. This probe confirms it on the next GPU call:


    PYTHONPATH=tests:tests/gpu python3 tests/gpu/probe_wire_layer.py
"""
import torch
from distributed import run_deepspeed_nccl
from test_deepspeed_patch import build_moe, fwd_bwd
from test_deepspeed_wire import D_MODEL, DS_CASES, reference_fwd_bwd
from wire_helpers import with_blocks

import lshmoe_plugin


def _largest_difference(a, b) -> float:
    pairs = [(a[0], b[0]), (a[1], b[1])] + [(p, q) for p, q in zip(a[2], b[2]) if p is not None]
    return max(float((p.float() - q.float()).abs().max()) for p, q in pairs)


def probe(rank, world_size, device="cuda"):
    torch.manual_seed(100 + rank)
    x = (torch.randn(2, 24, D_MODEL) * torch.exp(torch.randn(2, 24, 1))).to(device)
    rows = []
    for k in (1, 2):
        moe = build_moe(world_size, k).to(device)
        for name, (keys, kinds) in DS_CASES.items():
            expected, _, _ = reference_fwd_bwd(moe, x, (kinds[0], kinds[3]), (kinds[1], kinds[2]))
            row = [f"top{k} {name}"]
            for kernel in ("auto", "torch"):
                lshmoe_plugin.enable({"lsh_moe": {"enabled": True, "clustering": "none", "kernel": kernel,
                                                  **with_blocks(keys)}}, moe)
                first, second = fwd_bwd(moe, x), fwd_bwd(moe, x)
                lshmoe_plugin.disable()
                row += [f"{_largest_difference(expected, first):.3g}", f"{_largest_difference(first, second):.3g}"]
            rows.append(" | ".join(row))
    return rows


if __name__ == "__main__":
    print("case | auto vs reference | auto run to run | torch vs reference | torch run to run")
    for line in run_deepspeed_nccl(probe, 1)[0]:
        print(line)
