"""The link model's formulas: exact values worked by hand, limits, monotonicity, the intra-node split, and the
errors for bad input."""
import math

import pytest

from lshmoe_pretrain.link_model import GB, LINKS, Link, LinkModel, fit_link, parse_link

NET_100 = LinkModel(LINKS["100gbps"])


def test_all_to_all_exact_values_worked_by_hand():
    # 24 MB at EP=2: half crosses, 12 MB at 12 GB/s = 1 ms, plus 20 us
    assert NET_100.all_to_all_s(24e6, 2) == pytest.approx(20e-6 + 1e-3, rel=1e-12)
    # EP=16, every peer remote: 15/16 of 16 MB = 15 MB at 48 GB/s = 0.3125 ms
    assert LinkModel(LINKS["400gbps"]).all_to_all_s(16e6, 16) == pytest.approx(20e-6 + 0.3125e-3, rel=1e-12)
    # a custom link: 3 GB/s, 100 us; EP=4: 3/4 of 4 MB = 3 MB at 3 GB/s = 1 ms
    assert LinkModel(parse_link("custom:3:100")).all_to_all_s(4e6, 4) == pytest.approx(1.1e-3, rel=1e-12)


def test_all_to_all_limits():
    assert NET_100.all_to_all_s(1e9, 1) == 0.0  # EP=1: nothing leaves the rank
    assert NET_100.all_to_all_s(0, 8) == pytest.approx(20e-6)  # no bytes: the fixed cost alone
    assert LinkModel(LINKS["infinite"]).all_to_all_s(1e12, 64) == 0.0
    # many ranks: (k-1)/k -> 1, every byte but a vanishing share crosses
    assert NET_100.all_to_all_s(12e9, 10**6) == pytest.approx(20e-6 + 1.0, rel=1e-5)
    huge = Link("huge", 1e30, 5e-6, "test")
    assert LinkModel(huge).all_to_all_s(1e9, 8) == pytest.approx(5e-6)  # bandwidth -> infinity: alpha


def test_all_to_all_grows_with_bytes_and_ranks_and_shrinks_with_bandwidth():
    sizes = [0, 1e3, 1e6, 1e8, 1e10]
    times = [NET_100.all_to_all_s(b, 8) for b in sizes]
    assert times == sorted(times) and len(set(times)) == len(times)
    by_ranks = [NET_100.all_to_all_s(1e8, k) for k in (1, 2, 4, 8, 16, 64, 256)]
    assert by_ranks == sorted(by_ranks) and len(set(by_ranks)) == len(by_ranks)
    by_link = [LinkModel(LINKS[n]).all_to_all_s(1e8, 16) for n in ("100gbps", "200gbps", "400gbps", "nvlink4")]
    assert by_link == sorted(by_link, reverse=True)
    for g in (1, 2, 8):  # with an NVLink share too
        model = LinkModel(LINKS["200gbps"], gpus_per_node=g)
        by_ranks = [model.all_to_all_s(1e8, k) for k in (1, 2, 4, 8, 16, 64)]
        assert by_ranks == sorted(by_ranks), (g, by_ranks)


def test_intra_node_split():
    model = LinkModel(LINKS["100gbps"], gpus_per_node=8)
    # EP=8 on an 8-GPU node: all 7 peers over NVLink
    assert model.all_to_all_s(16e6, 8) == pytest.approx(10e-6 + 16e6 * 7 / 8 / (370 * GB), rel=1e-12)
    # EP=16: 7 of 15 peers on the node, 8 remote; the network share (8/16 of 16 MB at 12 GB/s) is the slower one
    assert model.all_to_all_s(16e6, 16) == pytest.approx(20e-6 + 8e6 / (12 * GB), rel=1e-12)
    # fewer bytes cross the network than with every peer remote: (k-g)/k instead of (k-1)/k
    assert model.all_to_all_s(16e6, 16) < NET_100.all_to_all_s(16e6, 16)
    assert model.all_to_all_s(16e6, 16) / NET_100.all_to_all_s(16e6, 16) == pytest.approx(
        (20e-6 + 8e6 / 12e9) / (20e-6 + 15e6 / 12e9), rel=1e-12)
    # a network faster than NVLink: the NVLink share sets the time (the two move at once, the slower one counts)
    fast = LinkModel(Link("fast", 1000 * GB, 1e-6, "test"), gpus_per_node=8)
    assert fast.all_to_all_s(9e6, 9) == pytest.approx(1e-6 + 9e6 * 7 / 9 / (370 * GB), rel=1e-12)
    # NVLink as the network: the node split changes nothing but the latency used
    nvlink = LinkModel(LINKS["nvlink4"], gpus_per_node=8)
    assert nvlink.all_to_all_s(16e6, 64) == pytest.approx(10e-6 + 16e6 * 56 / 64 / (370 * GB), rel=1e-12)


def test_all_reduce_ring():
    model = LinkModel(LINKS["200gbps"], gpus_per_node=8)
    # 16 ranks span two nodes: the ring runs at the NIC's 24 GB/s; 2 * 15/16 * 1 GB / 24 GB/s
    assert model.all_reduce_s(1e9, 16) == pytest.approx(20e-6 + 2 * 15 / 16 / 24, rel=1e-12)
    # 4 ranks inside one node: NVLink
    assert model.all_reduce_s(1e9, 4) == pytest.approx(10e-6 + 1.5 / 370, rel=1e-12)
    assert model.all_reduce_s(1e9, 1) == 0.0
    # grows towards 2 x bytes / B
    assert LinkModel(LINKS["200gbps"]).all_reduce_s(24e9, 10**6) == pytest.approx(2.0, rel=1e-5)
    times = [LinkModel(LINKS["200gbps"]).all_reduce_s(1e8, n) for n in (1, 2, 4, 16, 64)]
    assert times == sorted(times)


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match="EP degree must be an integer >= 1, got 0"):
        NET_100.all_to_all_s(1e6, 0)
    with pytest.raises(ValueError, match="EP degree must be an integer >= 1, got 1.5"):
        NET_100.all_to_all_s(1e6, 1.5)
    with pytest.raises(ValueError, match="EP degree must be an integer >= 1, got True"):
        NET_100.all_to_all_s(1e6, True)
    with pytest.raises(ValueError, match="bytes must be >= 0"):
        NET_100.all_to_all_s(-1, 2)
    with pytest.raises(ValueError, match="data-parallel ranks must be an integer >= 1"):
        NET_100.all_reduce_s(1e6, 0)
    with pytest.raises(ValueError, match="gpus_per_node must be an integer >= 1"):
        LinkModel(LINKS["100gbps"], gpus_per_node=0)
    with pytest.raises(ValueError, match=r"unknown link '10gbps'; allowed: 100gbps, 200gbps, 400gbps, nvlink4, "
                                         r"infinite or custom:<GB/s>:<latency in us>"):
        parse_link("10gbps")
    for bad in ("custom:3", "custom:x:1", "custom:3:1:2"):
        with pytest.raises(ValueError, match="write custom:<GB/s>:<latency in us>"):
            parse_link(bad)
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        parse_link("custom:0:10")
    with pytest.raises(ValueError, match="latency must be >= 0"):
        parse_link("custom:1:-10")
    assert math.isinf(parse_link("infinite").bandwidth)


def test_fit_recovers_the_link_that_made_the_times():
    truth = LinkModel(parse_link("custom:2.5:80"))
    sizes = [2**k for k in range(14, 25, 2)]
    link = fit_link("fit", sizes, [truth.all_to_all_s(b, 2) for b in sizes], 2)
    assert link.bandwidth == pytest.approx(2.5 * GB, rel=1e-9)
    assert link.latency_s == pytest.approx(80e-6, rel=1e-6)
    with pytest.raises(ValueError, match="at least two sizes"):
        fit_link("fit", [1e6], [1e-3], 2)
    with pytest.raises(ValueError, match="do not grow with the bytes"):
        fit_link("fit", [1e6, 2e6], [2e-3, 1e-3], 2)
