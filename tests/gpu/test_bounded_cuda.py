"""Error-bounded merging on a GPU, with the PyTorch reference and the fused kernels: the first step sends every
token as itself, the next one S slots from the last step's need without a host synchronisation, identity experts
come back exactly, and every merged token is within the tolerance or counted."""
import pytest
import torch
from test_bounded_merging import make_compressor, near_copies

from lshmoe_plugin.schedule import set_training_step
from lshmoe_plugin.telemetry import relative_residuals


@pytest.fixture(autouse=True)
def clock_from_zero():
    set_training_step(0)
    yield
    set_training_step(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_bounded_merging_on_cuda(kernel, dtype):
    comp = make_compressor(kernel=kernel, telemetry_interval=1)
    x, valid = near_copies(capacity=256, fill=(256, 200, 31, 0), copies=8, noise=0.01)
    x, valid = x.to("cuda", dtype), valid.cuda()
    centroids, state = comp.compress_fixed(x, valid)
    assert torch.equal(centroids, x)  # the first step: a slot per capacity row, every token its own
    set_training_step(1)
    slots = comp.slot_budget.slots(256, step=1)  # takes the last step's need: the step's one wait, on an event
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host synchronisation raises
    try:
        centroids, state = comp.compress_fixed(x, valid)
        out = comp.decompress_fixed(centroids.clone(), state)  # identity experts
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert centroids.shape == (4, slots, 16) and slots < 256
    assert torch.equal(out, x)
    stats = comp.telemetry.latest[0]
    members = torch.cat([state.counts, state.counts.new_zeros(1)])[state.slot]
    merged = valid.reshape(-1) & (members > 1)
    residual = relative_residuals(x.reshape(-1, 16), comp.per_token(centroids, state))
    assert int(stats.merged_tokens) == int(merged.sum()) > 100
    assert int(stats.merged_over_tolerance) == int((merged & (residual > 0.1)).sum()) <= 0.1 * int(merged.sum())
    assert int(stats.over_budget_tokens) == 0 and stats.as_floats()["bytes_ratio"] < 0.5
