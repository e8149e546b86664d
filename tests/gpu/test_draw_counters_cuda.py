"""Stochastic rounding's draw counters on a GPU (rounding.DrawCounters): a restored count continues a CUDA counter's
draws, and a restore writes the counter in place, so a CUDA graph captured before it draws from the restored count.

The CPU tests (tests/test_plugin_state.py) cover the bookkeeping; what only a GPU shows is the in-place `fill_` on a
device counter and a captured graph that reads it.
"""
import pytest
import torch

from lshmoe_plugin.rounding import DrawCounters

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPE = torch.Size((64, 32))


def draws(counters: DrawCounters, n: int):
    return [counters.draw(SHAPE, torch.device("cuda")) for _ in range(n)]


def test_a_restored_cuda_counter_draws_what_the_uninterrupted_one_draws_next():
    uninterrupted = DrawCounters()
    first = draws(uninterrupted, 5)
    saved = DrawCounters()
    draws(saved, 3)
    state = saved.state_dict()
    assert state == {f"cuda:{torch.cuda.current_device()}": 3}
    resumed = DrawCounters()  # a new process's counters: made at the first draw, from the restored count
    resumed.load_state_dict(state)
    later = draws(resumed, 2)
    assert torch.equal(later[0], first[3]) and torch.equal(later[1], first[4])
    assert not torch.equal(first[3], first[4])  # a draw that did not advance would pass the line above by luck


def test_a_restore_writes_the_counter_a_captured_graph_reads_in_place():
    counters = DrawCounters()
    draws(counters, 1)  # the warm-up draw makes the counter before the capture
    reference = DrawCounters()
    expected = draws(reference, 11)
    out = torch.empty(SHAPE, device="cuda")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out.copy_(counters.draw(SHAPE, torch.device("cuda")))
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()  # counter was 1: the second draw
    assert torch.equal(out, expected[1])
    counters.load_state_dict({f"cuda:{torch.cuda.current_device()}": 9})
    graph.replay()  # the restore rewrote the tensor the graph reads: draw 9, then 10
    assert torch.equal(out, expected[9])
    graph.replay()
    assert torch.equal(out, expected[10])
    assert counters.state_dict() == {f"cuda:{torch.cuda.current_device()}": 11}
