"""The chain's layout kept per network (earlyprop.chain_layout.ChainLayout in network.memo): made once per batch
size, and never stale: a replaced or moved parameter gets a new layout, an in-place update reaches the kernels."""

from __future__ import annotations

import copy

import torch

from earlyprop.chain import Chain
from earlyprop.chain_layout import ChainLayout
from earlyprop.dynamics import relax
from earlyprop.network import Network


def setup(seed=0):
    net = Network.layered((12, 9, 7, 4), "hard_sigmoid", dtype=torch.float64, seed=seed, bias_std=0.2, gain=1.5)
    x = torch.rand(5, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return net, x


def layout_of(net, x):
    state = net.init_state(x)
    return Chain.of(net, state, net.static_fields(state)).layout


def test_one_layout_per_batch_size():
    net, x = setup()
    assert layout_of(net, x) is layout_of(net, x)
    assert layout_of(net, x[:3]) is not layout_of(net, x)
    assert layout_of(net, x[:3]).batch == 3 and len(net.memo) == 2


def test_a_replaced_parameter_gets_a_new_layout_and_its_values():
    net, x = setup()
    first = layout_of(net, x)
    other, _ = setup(seed=1)
    with torch.no_grad():
        net.interactions[1].weight.data = other.interactions[1].weight.detach().clone()  # new storage
    assert layout_of(net, x) is not first
    fresh = copy.deepcopy(net)
    assert len(fresh.memo) == 0  # a copy starts empty: the entries hold views of the original's parameters
    a, _ = relax(net, net.init_state(x), steps=30, eps=0.5, project=True)
    b, _ = relax(fresh, fresh.init_state(x), steps=30, eps=0.5, project=True)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_an_in_place_update_reaches_the_compiled_kernels():
    """The kernels read the weights through views kept in the layout: an optimizer's in-place step must show."""
    net, x = setup()
    before, _ = relax(net, net.init_state(x), steps=30, eps=0.5, project=True)
    with torch.no_grad():
        net.interactions[1].weight.mul_(-1.0)
        net.interactions[2].weight.add_(0.3)
    after, _ = relax(net, net.init_state(x), steps=30, eps=0.5, project=True)
    twin = copy.deepcopy(net)  # an empty memo: a layout made from the updated weights
    expected, _ = relax(twin, twin.init_state(x), steps=30, eps=0.5, project=True)
    assert all(torch.equal(u, v) for u, v in zip(after, expected))
    assert not torch.equal(before[2], after[2])


def test_moving_the_network_empties_the_memo():
    net, x = setup()
    layout_of(net, x)
    net.float()
    assert len(net.memo) == 0
    state = net.init_state(x.float())
    assert Chain.of(net, state, net.static_fields(state)).layout.dtype == torch.float32


def test_the_memo_keeps_a_bounded_number_of_layouts():
    net, x = setup()
    for batch in range(1, ChainLayout.MAX_KEPT + 4):
        layout_of(net, x[:1].expand(batch, -1))
    assert len(net.memo) == ChainLayout.MAX_KEPT
