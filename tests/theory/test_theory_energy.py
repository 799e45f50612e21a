"""Energy, drive and Hessian (THEORY §1.4–1.7): checks T1, T1b, T2, T3 and the closed-form dE/dtheta."""

from __future__ import annotations

import torch

from earlyprop.dynamics import internal_force, relax
from earlyprop.newton import polish


def random_state(net, x, seed=1):
    """x clamped, every free layer ~ N(0, 1) (THEORY T1 setup)."""
    gen = torch.Generator().manual_seed(seed)
    state = net.init_state(x)
    for m in net.free:
        state[m] = torch.randn(state[m].shape, generator=gen, dtype=torch.float64)
    return state


def amax(t):
    """max |t| as a float (detached: closed-form drives carry the parameters' autograd graph)."""
    return float(t.detach().abs().max())


def drive_minus_state(net, state, rho_prime_factor=True):
    """R(s) - s flattened over the free layers (the loop's internal force)."""
    force = internal_force(net, state, rho_prime_factor)
    return torch.cat([force[m] for m in net.free], dim=-1)


# ------------------------------------------------------------------------------------------------ T1
def test_t1_drive_is_minus_energy_gradient_autograd(rc, th):
    state = random_state(rc.net, rc.x)
    grad = th.autograd_energy_gradient(rc.net, state)
    closed = torch.cat([g.detach() for m, g in enumerate(rc.net.grad_energy(state)) if m in rc.net.free], dim=-1)
    assert amax(grad - closed) <= 1e-12
    assert amax(grad + drive_minus_state(rc.net, state)) <= 1e-12


def test_t1_drive_is_minus_energy_gradient_finite_differences(rc, th):
    net = rc.net
    state = random_state(net, rc.x)
    with torch.no_grad():
        err = amax(th.fd_energy_gradient(net, state, h=1e-6) + drive_minus_state(net, state))
    assert err <= 1e-8


def test_t1b_identity_fails_for_an_asymmetric_coupling(rc, th):
    """Negative control: a lateral matrix forced non-symmetric after construction (bypassing the check).
    The energy only sees (L + L^T)/2 while the drive is built from L, so BF-3 must fail."""
    net = th.rc_network(lateral=[2])
    lateral = [t for t in net.interactions if type(t).__name__ == "Lateral"][0]
    gen = torch.Generator().manual_seed(3)
    asym = torch.randn(5, 5, generator=gen, dtype=torch.float64) * 0.5
    asym.fill_diagonal_(0.0)
    with torch.no_grad():
        lateral.weight.copy_(asym)
    state = random_state(net, rc.x)
    err = amax(th.autograd_energy_gradient(net, state) + drive_minus_state(net, state))
    assert err > 1e-3  # >> 1e-6
    # control: the same coupling made symmetric satisfies the identity again
    with torch.no_grad():
        lateral.weight.copy_(0.5 * (asym + asym.T))
    err_sym = amax(th.autograd_energy_gradient(net, state) + drive_minus_state(net, state))
    assert err_sym <= 1e-12


def test_t1b_identity_fails_without_the_rho_prime_factor(rc, th):
    """Negative control (THEORY A6): the textbook leaky integrator b + W rho(s) - s is not -dE/ds."""
    state = random_state(rc.net, rc.x)
    grad = th.autograd_energy_gradient(rc.net, state)
    err = amax(grad + drive_minus_state(rc.net, state, rho_prime_factor=False))
    assert err > 1e-3  # >> 1e-6


# ------------------------------------------------------------------------------------------------ T2
def test_t2_jacobian_of_the_drive_is_symmetric_and_equals_identity_minus_hessian(rc, th):
    net = rc.net
    state = random_state(net, rc.x)

    def drive(flat):
        return drive_minus_state(net, th.with_free(net, state, flat)) + flat

    jac = th.batched_jacobian(drive, th.flat_free(net, state))
    asym = (jac - jac.transpose(1, 2)).flatten(1).norm(dim=-1) / jac.flatten(1).norm(dim=-1)
    assert float(asym.max()) <= 1e-12
    hess = th.energy_hessian(net, state)
    eye = torch.eye(jac.shape[1], dtype=torch.float64)
    assert amax(hess - (eye - jac)) <= 1e-12


def test_t2b_jacobian_is_not_symmetric_without_the_rho_prime_factor(rc, th):
    net = rc.net
    state = random_state(net, rc.x)

    def drive_std(flat):
        return drive_minus_state(net, th.with_free(net, state, flat), rho_prime_factor=False) + flat

    jac = th.batched_jacobian(drive_std, th.flat_free(net, state))
    asym = (jac - jac.transpose(1, 2)).flatten(1).norm(dim=-1) / jac.flatten(1).norm(dim=-1)
    assert float(asym.min()) > 1e-3


# ------------------------------------------------------------------------------------------------ T3
def test_t3_energy_decreases_along_euler_with_eps_below_one_over_lambda_max(rc, th):
    net = rc.net

    def lam_max(states):
        return max(float(torch.linalg.eigvalsh(th.energy_hessian(net, s)).max()) for s in states)

    # Lip(grad E) on the region the relaxation visits: s* and a preliminary path from rest, 1% margin
    _, scout = relax(net, net.init_state(rc.x), steps=200, eps=0.2, record_trajectory=True)
    eps = 1.0 / (1.01 * lam_max([rc.state, *scout.trajectory[::10]]))
    _, diag = relax(net, net.init_state(rc.x), steps=400, eps=eps, record_trajectory=True)
    with torch.no_grad():
        energies = torch.stack([net.energy(s) for s in diag.trajectory])  # (steps + 1, batch)
    assert float((energies[1:] - energies[:-1]).max()) <= 1e-12
    assert float((energies[0] - energies[-1]).min()) > 0.01  # it did descend, not just stand still
    # precondition of the descent lemma on the actual path: eps * lambda_max(H(s_t)) <= 1
    assert eps * lam_max(diag.trajectory[::20]) <= 1.0


def test_t3_fixed_point_is_a_stationary_point_of_the_energy(rc, th):
    assert rc.residual <= 1e-12  # max |R(s*) - s*| after Newton
    assert float(th.autograd_energy_gradient(rc.net, rc.state).abs().max()) <= 1e-12
    # and a strict local minimum (H > 0), where Euler converges for eps < 2 / lambda_max
    assert float(torch.linalg.eigvalsh(th.energy_hessian(rc.net, rc.state)).min()) > 0
    # Newton polishing returns plain data, not tensors tied to the parameters' autograd graph
    polished, _ = polish(rc.net, rc.state)
    assert not any(s.requires_grad for s in polished)


# ----------------------------------------------------------------------------------- dE/dtheta
def test_closed_form_energy_param_grads_match_autograd(rc, th):
    """Dense, Lateral and bias gradients of mean_batch E against autograd, on a net with a skip and a lateral
    term. The Lateral parameter stores the full symmetric L with E = -1/2 r^T L r: its closed-form gradient
    is autograd's with the diagonal set to zero (W_ii = 0 is a constraint, THEORY A10)."""
    net = th.rc_network(skip=[(0, 2)], lateral=[2])
    lateral = [t for t in net.interactions if type(t).__name__ == "Lateral"][0]
    gen = torch.Generator().manual_seed(4)
    m = torch.randn(5, 5, generator=gen, dtype=torch.float64) * 0.3
    with torch.no_grad():
        lateral.weight.copy_((m + m.T).fill_diagonal_(0.0))
    state = random_state(net, rc.x)
    closed = net.energy_param_grads(state)
    params = list(net.parameters())
    with torch.enable_grad():
        auto = torch.autograd.grad(net.energy(state).mean(), params)
    assert len(closed) == len(params) == 5 + 1 + 4  # dense (4 chain + 1 skip), lateral, free biases
    for p, c, a in zip(params, closed, auto):
        if p is lateral.weight:
            a = a * (1 - torch.eye(5, dtype=torch.float64))
        assert c.shape == p.shape
        assert amax(c - a) <= 1e-12



def test_projected_fixed_point_has_zero_projected_residual():
    """A hard-sigmoid net relaxed with projection rests with some units on a bound and an outward force:
    there |dF/ds| stays large, while the projected residual (EP17 eq. 43) vanishes, free and nudged."""
    from earlyprop.dynamics import residual
    from earlyprop.network import Network

    net = Network.layered([12, 9, 4], "hard_sigmoid", dtype=torch.float64, gain=2.0, seed=2)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 12, generator=gen, dtype=torch.float64)
    d = torch.nn.functional.one_hot(torch.arange(6) % 4, 4).double()
    for beta in (0.0, 0.5):
        kw = dict(beta=beta, target=d) if beta else {}
        state, diag = relax(net, net.init_state(x), steps=5000, eps=0.5, project=True, tol=1e-12, check_every=1,
                            **kw)
        assert diag.converged
        on_bound = sum(int(((s == 0) | (s == 1)).sum()) for s in state[1:])
        assert on_bound > 0  # the case that matters
        assert residual(net, state, project=True, **kw) <= 1e-11
        assert residual(net, state, **kw) > 1e-3
