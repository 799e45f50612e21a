"""Bad input to the core: every mistake raises a ValueError (or DivergenceError) that names the problem,
and a relaxation never hands back a NaN state."""

from __future__ import annotations

import math

import pytest
import torch

from earlyprop import DivergenceError, Network, polish, relax, residual
from earlyprop.interactions import Dense, Lateral

F64 = torch.float64


@pytest.fixture
def net():
    return Network.layered([3, 4, 2], "tanh", init="gaussian", gain=0.6, seed=0, dtype=F64)


@pytest.fixture
def x():
    return torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)


@pytest.fixture
def state(net, x):
    return net.init_state(x)


@pytest.fixture
def target():
    return torch.zeros(5, 2, dtype=F64)


# ------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(5, 4), torch.zeros(5, 3, 1)])
def test_input_of_the_wrong_shape(net, bad):
    with pytest.raises(ValueError, match=r"input of layer 0 has shape .*expected \(batch, 3\)"):
        net.init_state(bad.to(F64))


def test_input_that_is_not_a_tensor(net):
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        net.init_state([[0.0, 0.0, 0.0]])  # a list of lists is one "tensor" per clamped layer: not a tensor


def test_state_with_a_missing_layer(net, state):
    with pytest.raises(ValueError, match="state has 2 layers, network has 3"):
        relax(net, state[:2], steps=1, eps=0.1)


def test_state_layer_of_the_wrong_width(net, state):
    bad = list(state)
    bad[1] = torch.zeros(5, 7, dtype=F64)
    with pytest.raises(ValueError, match=r"state of layer 1 has shape \(5, 7\), expected \(batch, 4\)"):
        relax(net, bad, steps=1, eps=0.1)


def test_state_layers_with_different_batch_sizes(net, state):
    bad = list(state)
    bad[2] = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="state layer 2 has batch size 4, layer 0 has 5"):
        relax(net, bad, steps=1, eps=0.1)


@pytest.mark.parametrize("shape", [(5, 3), (4, 2), (5, 1)])
def test_target_that_does_not_fit_the_driven_layer(net, state, shape):
    """(5, 1) used to broadcast silently over the two output units."""
    bad = torch.zeros(*shape, dtype=F64)
    with pytest.raises(ValueError, match=r"target has shape .* driven layer 2 of shape \(5, 2\)"):
        relax(net, state, steps=1, eps=0.1, beta=0.5, target=bad)
    with pytest.raises(ValueError, match="target has shape"):
        polish(net, state, beta=0.5, target=bad)
    with pytest.raises(ValueError, match="target has shape"):
        residual(net, state, beta=0.5, target=bad)


def test_per_example_beta_of_the_wrong_length(net, state, target):
    with pytest.raises(ValueError, match=r"per-example beta has shape \(4,\), expected \(5,\)"):
        relax(net, state, steps=1, eps=0.1, beta=torch.ones(4, dtype=F64), target=target)


def test_nudge_without_a_target(net, state):
    with pytest.raises(ValueError, match="needs a target"):
        relax(net, state, steps=1, eps=0.1, beta=0.5)


def test_dense_weight_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"weight of interaction 0->1 has shape \(3, 4\), expected \(4, 3\)"):
        Dense(0, 1, 3, 4, torch.zeros(3, 4))


def test_network_construction_errors():
    with pytest.raises(ValueError, match="at least two layers"):
        Network.layered([3], "tanh")
    with pytest.raises(ValueError, match="unknown nonlinearity"):
        Network.layered([3, 2], "relu6")
    with pytest.raises(ValueError, match="unknown init"):
        Network.layered([3, 2], "tanh", init="orthogonal")
    with pytest.raises(ValueError, match="cannot be clamped"):
        Network([3, 2], [Dense(0, 1, 3, 2)], ["tanh", "tanh"], clamped=(0, 1), driven=1)


# ------------------------------------------------------------------------------------- NaN and inf
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_input(net, value):
    x = torch.zeros(5, 3, dtype=F64)
    x[2, 1] = value
    with pytest.raises(ValueError, match="input of layer 0 contains NaN or inf"):
        net.init_state(x)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_state(net, state, value):
    bad = list(state)
    bad[1] = bad[1].clone()
    bad[1][0, 0] = value
    with pytest.raises(ValueError, match="state of layer 1 contains NaN or inf"):
        relax(net, bad, steps=1, eps=0.1)
    with pytest.raises(ValueError, match="contains NaN or inf"):
        polish(net, bad)


def test_non_finite_target(net, state, target):
    bad = target.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="target contains NaN or inf"):
        relax(net, state, steps=1, eps=0.1, beta=0.5, target=bad)


@pytest.mark.parametrize("beta", [math.nan, math.inf])
def test_non_finite_beta(net, state, target, beta):
    with pytest.raises(ValueError, match="beta must be finite"):
        relax(net, state, steps=1, eps=0.1, beta=beta, target=target)
    per_example = torch.full((5,), beta, dtype=F64)
    with pytest.raises(ValueError, match="beta contains NaN or inf"):
        relax(net, state, steps=1, eps=0.1, beta=per_example, target=target)


# --------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("eps", [0.0, -0.1, math.nan, math.inf])
def test_eps_must_be_positive_and_finite(net, state, eps):
    with pytest.raises(ValueError, match="eps must be a positive number"):
        relax(net, state, steps=1, eps=eps)


@pytest.mark.parametrize("temperature", [-1e-3, math.nan, math.inf])
def test_temperature_must_be_non_negative(net, state, temperature):
    with pytest.raises(ValueError, match="temperature T must be >= 0"):
        relax(net, state, steps=1, eps=0.1, temperature=temperature)


def test_noise_std_must_be_non_negative(net, state):
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        relax(net, state, steps=1, eps=0.1, noise_std=-0.1)


@pytest.mark.parametrize("steps", [-1, 2.5])
def test_steps_must_be_a_non_negative_integer(net, state, steps):
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        relax(net, state, steps=steps, eps=0.1)


@pytest.mark.parametrize("scale", ["epsilon", "EPS", "", None])
def test_unknown_nudge_scale(net, state, target, scale):
    with pytest.raises(ValueError, match="nudge_scale must be one of"):
        relax(net, state, steps=1, eps=0.1, beta=0.5, target=target, nudge_scale=scale)


# --------------------------------------------------------------------------------- lateral matrices
def test_non_symmetric_lateral_matrix():
    w = torch.tensor([[0.0, 0.3, 0.0], [0.1, 0.0, 0.2], [0.0, 0.2, 0.0]], dtype=F64)
    with pytest.raises(ValueError, match=r"lateral matrix of layer 1 is not symmetric \(W must equal W\^T\)"):
        Lateral(1, 3, w)


def test_lateral_matrix_with_a_non_zero_diagonal():
    w = torch.tensor([[0.5, 0.3], [0.3, 0.0]], dtype=F64)
    with pytest.raises(ValueError, match=r"lateral matrix of layer 2 has a non-zero diagonal"):
        Lateral(2, 2, w)


def test_lateral_matrix_of_the_wrong_shape_or_non_finite():
    with pytest.raises(ValueError, match=r"lateral matrix of layer 1 has shape \(2, 3\), expected \(3, 3\)"):
        Lateral(1, 3, torch.zeros(2, 3))
    w = torch.zeros(2, 2)
    w[0, 1] = w[1, 0] = math.nan
    with pytest.raises(ValueError, match="lateral matrix of layer 1 contains NaN or inf"):
        Lateral(1, 2, w)


def test_a_valid_lateral_matrix_is_accepted():
    w = torch.tensor([[0.0, 0.3], [0.3, 0.0]], dtype=F64)
    term = Lateral(1, 2, w)
    assert torch.equal(term.weight.detach(), w)


# -------------------------------------------------------------------------------------- divergence
@pytest.fixture
def strong():
    return Network.layered([3, 6, 6, 2], "tanh", init="gaussian", gain=3.0, seed=1, dtype=F64)


@pytest.mark.parametrize(("steps", "eps"), [(3, 1e200), (25, 1e20), (1000, 50.0)])
def test_divergence_raises_with_eps_beta_and_step_in_the_message(strong, x, target, steps, eps):
    """Overflow at the last step (3), between two checks (25, checked every 10 and at the end), or late."""
    beta = 0.25
    with pytest.raises(DivergenceError) as info:
        relax(strong, strong.init_state(x), steps=steps, eps=eps, beta=beta, target=target)
    message = str(info.value)
    assert f"eps={eps:g}" in message
    assert f"beta={beta:g}" in message
    assert "by step" in message
    step = int(message.split("by step ")[1].split()[0])
    assert 1 <= step <= steps


def test_divergence_with_per_example_beta(strong, x, target):
    with pytest.raises(DivergenceError, match=r"eps=50.*beta=per-example"):
        relax(strong, strong.init_state(x), steps=400, eps=50.0, beta=torch.full((5,), 0.5, dtype=F64),
              target=target)


@pytest.mark.parametrize("eps", [0.5, 1.5, 1.99, 2.5, 4.0, 10.0, 100.0])
@pytest.mark.parametrize("check_every", [1, 7, 10])
def test_relaxation_never_returns_nan(strong, x, target, eps, check_every):
    """Either a finite state comes back, or DivergenceError is raised: nothing in between."""
    try:
        final, diag = relax(strong, strong.init_state(x), steps=600, eps=eps, beta=0.5, target=target,
                            check_every=check_every, record_trajectory=True)
    except DivergenceError as err:
        assert f"eps={eps:g}" in str(err)
        return
    assert all(bool(torch.isfinite(s).all()) for s in final)
    assert all(bool(torch.isfinite(s).all()) for states in diag.trajectory for s in states)
    assert math.isfinite(diag.residual)


def test_large_eps_on_a_strong_net_does_diverge(strong, x):
    """Not vacuous: the sweep above contains eps values that really blow up."""
    with pytest.raises(DivergenceError):
        relax(strong, strong.init_state(x), steps=600, eps=10.0)


def test_broadcast_shape_agrees_with_torch():
    """The nudge's shape check runs every nudged phase without torch.broadcast_shapes: same answers, same error."""
    import itertools

    from earlyprop.nudge import broadcast_shape

    shapes = [s for rank in range(3) for s in itertools.product([0, 1, 2, 3], repeat=rank)]
    for a, b in itertools.product(shapes, shapes):
        try:
            expected = torch.broadcast_shapes(a, b)
        except RuntimeError:
            with pytest.raises(RuntimeError):
                broadcast_shape(a, b)
            continue
        assert broadcast_shape(a, b) == expected
