"""Prediction of a relaxed network: argmax of the driven layer, ties at a bounded rate's bound broken
by the driven layer's field (its input before the projection), never by the lowest index."""

import torch

from earlyprop.cost import CrossEntropyReadout, SquaredError
from earlyprop.network import Network
from earlyprop.rules import Backprop, EquilibriumProp, Relaxation


def test_squared_error_predict_breaks_ties_by_field_and_keeps_unique_argmax():
    cost = SquaredError()
    y = torch.tensor([[1.0, 0.2, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.3, 0.9, 0.1, 0.0]])
    field = torch.tensor([[1.3, 0.2, 2.5, -1.0], [-0.7, -0.2, -3.0, -0.4], [0.3, 0.9, 0.1, 5.0]])
    assert cost.predict(y).tolist() == [0, 0, 1]  # bare argmax: the lowest index among ties
    # ties at 1 and all at 0 go to the largest field; a unique maximum is kept even when a unit
    # below it has a larger field (row 3: the field only breaks ties)
    assert cost.predict(y, field).tolist() == [2, 1, 1]


def test_readout_predict_ignores_the_field():
    cost = CrossEntropyReadout(3, 3).double()
    y = torch.rand(4, 3, dtype=torch.float64)
    assert torch.equal(cost.predict(y, torch.randn(4, 3, dtype=torch.float64)), cost.predict(y))


def _saturating_net():
    """4-8-3 hard-sigmoid net whose outputs 0 and 2 saturate at 1 (2 harder) and output 1 sits below 0."""
    net = Network.layered([4, 8, 3], "hard_sigmoid", input_rho="linear", seed=0, dtype=torch.float64)
    with torch.no_grad():
        for term in net.layered_pairs():
            term.weight.zero_()
        net.bias(1).fill_(0.5)
        net.bias(2).copy_(torch.tensor([1.5, -2.0, 3.0]))
    return net


def test_relaxed_prediction_uses_the_field_at_saturation():
    net = _saturating_net()
    rule = EquilibriumProp(1.0, "centered", Relaxation(eps=0.5, free_steps=40, project=True))
    x = torch.rand(5, 4, dtype=torch.float64)
    y, prediction = rule.answer(net, x)
    assert torch.equal(y, torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64).expand(5, 3))
    assert prediction.tolist() == [2] * 5
    assert rule.predict(net, x).tolist() == [2] * 5
    # the training step's prediction agrees
    step = rule.compute_grads(net, x, torch.eye(3, dtype=torch.float64)[[2, 2, 2, 2, 2]])
    assert step.prediction.tolist() == [2] * 5


def test_backprop_prediction_is_the_argmax_of_its_linear_output():
    net = _saturating_net()
    x = torch.rand(5, 4, dtype=torch.float64)
    y, prediction = Backprop().answer(net, x)
    assert torch.equal(prediction, y.argmax(-1))
