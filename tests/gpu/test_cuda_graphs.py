"""The fixed layout replayed as CUDA graphs (`lsh_moe.cuda_graphs`) against the same fused kernels run eagerly.

Same kernels, so values and gradients must match exactly, step after step, including when forwards overlap
(two forwards before their backwards), when autograd drops a forward without a backward, and through DeepSpeed's
real MoE layer and engine.
"""
import pytest
import torch
from lsh_blocks import paper_block

from lshmoe_plugin.compressor import LSHCompressor
from lshmoe_plugin.config import LSHMoEConfig
from lshmoe_plugin.kernels.graphed import GraphReuseError
from lshmoe_plugin.telemetry import Telemetry

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

E, C, D = 8, 512, 256


def compressors(**settings):
    base = paper_block(dict(enabled=True, compression_rate=0.2, telemetry_interval=1, **settings))
    # Own telemetry each: the graphed compressor's stats must come from its own buffers.
    graphed = LSHCompressor(LSHMoEConfig(cuda_graphs=True, **base), layer_index=3, telemetry=Telemetry())
    eager = LSHCompressor(LSHMoEConfig(cuda_graphs=False, **base), layer_index=3, telemetry=Telemetry())
    return graphed, eager


def batch(seed: int, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(40, D, generator=gen)
    pick = torch.randint(0, 40, (E * C,), generator=gen)
    tokens = (centres[pick] + 0.3 * torch.randn(E * C, D, generator=gen)).view(E, C, D)
    valid = torch.rand(E, C, generator=gen) < 0.8
    tokens[~valid] = 0
    weight = torch.randn(D, D, generator=gen) / D ** 0.5
    grad = torch.randn(E, C, D, generator=gen)
    return (tokens.cuda().to(dtype), valid.cuda(), weight.cuda().to(dtype), grad.cuda().to(dtype))


def forward(compressor, tokens, valid, weight):
    """compress -> a linear 'expert' -> expand; the expert sees the centroids like the real layer's experts."""
    leaf = tokens.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    centroids, state = compressor.compress_fixed(leaf, valid)
    out = compressor.decompress_fixed(centroids @ w, state)
    return leaf, w, out, state


def run_step(compressor, data):
    tokens, valid, weight, grad = data
    leaf, w, out, state = forward(compressor, tokens, valid, weight)
    out.backward(grad)
    return out.detach().clone(), leaf.grad, w.grad, state.slot.clone()


@pytest.mark.parametrize("error_compensation", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_graphed_steps_match_eager_steps(dtype, error_compensation):
    graphed, eager = compressors(error_compensation=error_compensation)
    for step in range(3):  # step 0 captures, later steps replay the same graphs on new data
        data = batch(step, dtype)
        got, want = run_step(graphed, data), run_step(eager, data)
        for a, b, name in zip(got, want, ("output", "token grad", "expert grad", "slots")):
            assert torch.equal(a, b), f"step {step}: {name} differs"
    assert len(graphed._graphs) == 1  # one instance, reused
    stats, eager_stats = graphed.telemetry.latest[3], eager.telemetry.latest[3]
    assert float(stats.clusters) == float(eager_stats.clusters) > 0
    assert float(stats.relative_residual) == float(eager_stats.relative_residual)


def test_a_new_shape_gets_its_own_graphs_and_the_old_ones_stay():
    """Another capacity (micro-batch) for the same layer: captured once more; going back replays the first."""
    global C
    graphed, eager = compressors()
    original = C
    try:
        for capacity in (original, original // 2, original):
            C = capacity
            data = batch(61 + capacity)
            got, want = run_step(graphed, data), run_step(eager, data)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), f"capacity {capacity}"
    finally:
        C = original
    assert len(graphed._graphs) == 2  # one instance per shape, the first reused when it came back


def test_identity_expert_with_error_compensation_gives_the_tokens_back():
    graphed, _ = compressors(error_compensation=True)
    tokens, valid, _, _ = batch(5, torch.float32)
    for _ in range(2):
        centroids, state = graphed.compress_fixed(tokens, valid)
        out = graphed.decompress_fixed(centroids, state)
        expected = torch.where(valid[..., None], tokens, torch.zeros_like(tokens))
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_overlapping_forwards_get_their_own_buffers():
    """Two forwards before either backward (a pipeline schedule): the second must not overwrite the first."""
    graphed, eager = compressors()
    first, second = batch(11), batch(12)
    leaf1, w1, out1, _ = forward(graphed, *first[:3])
    leaf2, w2, out2, _ = forward(graphed, *second[:3])
    assert len(graphed._graphs) == 2
    out1.backward(first[3])
    out2.backward(second[3])
    for (leaf, w, out), data in (((leaf1, w1, out1), first), ((leaf2, w2, out2), second)):
        want = run_step(eager, data)
        assert torch.equal(out.detach(), want[0]) and torch.equal(leaf.grad, want[1]) and torch.equal(w.grad, want[2])
    forward(graphed, *batch(13)[:3])[2].backward(batch(13)[3])
    assert len(graphed._graphs) == 2  # both free again: no third instance


def test_a_forward_dropped_without_backward_frees_its_instance():
    graphed, _ = compressors()
    data = batch(21)
    out = forward(graphed, *data[:3])[2]
    del out  # autograd drops that forward's graph: its instance is free again
    forward(graphed, *data[:3])[2].backward(data[3])
    assert len(graphed._graphs) == 1


def test_no_grad_forward_holds_no_instance():
    graphed, eager = compressors()
    data = batch(31)
    with torch.no_grad():
        centroids, state = graphed.compress_fixed(data[0], data[1])
        out = graphed.decompress_fixed(centroids @ data[2], state).clone()
        centroids_e, state_e = eager.compress_fixed(data[0], data[1])
        want = eager.decompress_fixed(centroids_e @ data[2], state_e)
    assert torch.equal(out, want)
    forward(graphed, *data[:3])[2].backward(data[3])
    assert len(graphed._graphs) == 1


def test_a_second_backward_after_another_forward_raises():
    graphed, _ = compressors()
    data = batch(41)
    out = forward(graphed, *data[:3])[2]
    out.backward(data[3], retain_graph=True)
    forward(graphed, *batch(42)[:3])  # reuses the instance the retained graph points at
    with pytest.raises(GraphReuseError, match="cuda_graphs=false"):
        out.backward(data[3])


def test_inside_an_outer_capture_the_eager_kernels_are_recorded():
    """A user capturing a whole step: our own capture cannot nest, so the fused kernels are recorded eagerly."""
    graphed, eager = compressors()
    tokens, valid, weight, _ = batch(51)
    static_in = tokens.clone()
    with torch.no_grad():
        centroids, state = eager.compress_fixed(tokens, valid)
        eager_out = eager.decompress_fixed(centroids @ weight, state)
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):  # warm up outside the capture (Triton compiles here)
            centroids, state = graphed.compress_fixed(static_in, valid)
            graphed.decompress_fixed(centroids @ weight, state)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            centroids, in_capture = graphed.compress_fixed(static_in, valid)
            static_out = graphed.decompress_fixed(centroids @ weight, in_capture)
        graph.replay()
    assert state.graphed is not None and in_capture.graphed is None  # our graphs outside, eager kernels inside
    assert torch.equal(static_out, eager_out)


# -- through DeepSpeed's real MoE layer and engine --------------------------------------------------------------------
def _train_both_ways(rank, world_size):
    """4 steps of GPT-MoE tiny through DeepSpeed's engine with cuda_graphs on, then off, from the same seeds."""
    import deepspeed

    import lshmoe_plugin
    from lshmoe_plugin.patches.lifecycle import COMPRESSOR_ATTRIBUTE
    from lshmoe_pretrain.models import build_gpt_moe
    results = {}
    for graphs in (True, False):
        config = {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
                  "lsh_moe": {"enabled": True, "method": "paper", "cuda_graphs": graphs, "telemetry_interval": 2}}
        torch.manual_seed(0)
        model = build_gpt_moe("tiny", ep_size=world_size, num_experts=4 * world_size)
        lshmoe_plugin.enable(config, model)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        gen = torch.Generator().manual_seed(100 + rank)
        losses = []
        for step in range(4):
            tokens = torch.randint(0, model.config.vocab_size, (4, model.config.seq_len + 1), generator=gen).cuda()
            torch.manual_seed(7 * step + rank)  # same gate draws in both runs
            loss = engine(tokens[:, :-1], tokens[:, 1:])
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        compressors = [getattr(m, COMPRESSOR_ATTRIBUTE) for m in model.modules() if hasattr(m, COMPRESSOR_ATTRIBUTE)]
        results[graphs] = dict(losses=losses, params=[p.detach().float().cpu() for p in model.parameters()],
                               graphed=sum(len(c._graphs or ()) for c in compressors))
        lshmoe_plugin.disable()
    return results


def test_deepspeed_training_with_graphs_matches_eager_training():
    from distributed import run_deepspeed_nccl
    world_size = min(2, torch.cuda.device_count())
    for rank, results in enumerate(run_deepspeed_nccl(_train_both_ways, world_size)):
        graphed, eager = results[True], results[False]
        assert graphed["losses"] == eager["losses"], rank
        assert all(torch.equal(a, b) for a, b in zip(graphed["params"], eager["params"])), rank
        assert graphed["graphed"] == 2 and eager["graphed"] == 0, rank  # the tiny preset's two MoE layers, one each


def test_auto_replays_small_layers_and_runs_large_ones_eagerly():
    from lshmoe_plugin.compressor import AUTO_MAX_TOKEN_BYTES
    auto = LSHCompressor(LSHMoEConfig(enabled=True, method="paper", cuda_graphs="auto"), layer_index=0,
                         telemetry=Telemetry())
    forced = LSHCompressor(LSHMoEConfig(enabled=True, method="paper", cuda_graphs=True), layer_index=0,
                           telemetry=Telemetry())
    small = torch.randn(E, C, D, device="cuda", dtype=torch.bfloat16)
    large = torch.randn(8, 5120, 4096, device="cuda", dtype=torch.bfloat16)  # 336 MB of token rows
    assert small.numel() * 2 <= AUTO_MAX_TOKEN_BYTES < large.numel() * 2
    for tokens, auto_graphs in ((small, True), (large, False)):
        valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device="cuda")
        assert (auto.compress_fixed(tokens, valid)[1].graphed is not None) is auto_graphs
        assert forced.compress_fixed(tokens, valid)[1].graphed is not None  # true replays at any size
