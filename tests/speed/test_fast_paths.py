"""The fast paths change speed, never results (issue 4).

The lean chain loop (chain.Chain) runs for plain layered nets; adding a zero-weight term (a lateral
matrix, or a skip connection for the bipartite solver) forces the general loop on the same energy, so
the two can be compared in float64 to round-off: fixed points, gradients, and twenty-step training curves on
digits. The fused EP difference is compared with the textbook two-call estimator, and the stacked centered
phases with two separate relaxations.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import earlyprop.chain as chain_module
import earlyprop.chain_layout as chain_layout
import earlyprop.native as native
import earlyprop.native_chain as native_chain
import earlyprop.small_gemm as small_gemm
from earlyprop.chain import Chain
from earlyprop.dynamics import relax
from earlyprop.interactions import Dense, Lateral
from earlyprop.network import Network
from earlyprop.nonlinearity import Sigmoid
from earlyprop.rules import STDP, EquilibriumProp, Relaxation

TOL = 1e-12
SRC = Path(__file__).resolve().parents[2] / "src"
MNIST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"


def twin(sizes, rho, seed=1, skip=False):
    """A lean (plain chain) network and its general twin: same weights plus one zero-weight term."""
    net = Network.layered(sizes, rho, dtype=torch.float64, bias_std=0.2, gain=1.5, seed=seed)
    extra = Dense(0, 3, sizes[0], sizes[3]) if skip else Lateral(1, sizes[1])
    terms = [*net.interactions, extra.to(torch.float64)]
    general = Network(sizes, terms, net.rhos).to(torch.float64)
    with torch.no_grad():
        for a, b in zip(general.biases, net.biases):
            a.copy_(b)
    with torch.no_grad():
        for network, lean in ((net, True), (general, False)):  # the comparison means something
            state = network.init_state(torch.zeros(1, sizes[0], dtype=torch.float64))
            assert (Chain.of(network, state, network.static_fields(state)) is not None) == lean
    return net, general


def data(sizes, batch=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, sizes[0], generator=gen, dtype=torch.float64)
    d = torch.nn.functional.one_hot(torch.randint(0, sizes[-1], (batch,), generator=gen), sizes[-1]).double()
    return x, d


def assert_same(a, b, tol=TOL):
    for u, v in zip(a, b):
        assert u.shape == v.shape
        assert float((u - v).abs().max()) <= tol


SMALL, DEEP = (12, 9, 4), (12, 9, 7, 5, 4)
PER_EXAMPLE = torch.tensor([0.5, -0.5, 0.5, 0.5, -0.5, 0.5], dtype=torch.float64)
MIXED = torch.tensor([0.5, -2.0, 0.5, 0.5, -2.0, 0.5], dtype=torch.float64)  # per example, some beta' <= -1
RHOS = [("hard_sigmoid", True), ("hard_sigmoid", False), (Sigmoid(4.0, 0.5), False), ("tanh", False)]
NUDGES = [dict(), dict(beta=0.7), dict(beta=PER_EXAMPLE), dict(beta=-1.0), dict(beta=0.5, nudge_scale="none")]


@pytest.fixture(params=["compiled", "fused-update", "narrow-unit-major", "all-row-major", "all-unit-major"])
def layout(request, monkeypatch):
    """The lean chain's loops: the compiled kernels (earlyprop.native, where numba is installed and the chain
    fits them); the torch loops with their update in one compiled pass (numba installed, the chain's products
    past the kernels); and the torch loops alone in their memory layouts: narrow layers unit-major (the CPU
    default), every layer row-major (as on a GPU), every layer unit-major."""
    if request.param in ("compiled", "fused-update"):
        if not native.available():
            pytest.skip("numba is not installed: the compiled kernels do not exist here (pip install numba)")
        if request.param == "fused-update":
            monkeypatch.setattr(native_chain, "MAX_STEP_MACS", 0)  # no chain fits the kernels: the torch loops run
            monkeypatch.setattr(chain_layout, "UNIT_MAJOR_WIDTH", 6)
        return request.param
    monkeypatch.setattr(native, "numba", None)  # as on a machine without numba
    width = {"narrow-unit-major": 6, "all-row-major": 0, "all-unit-major": 10**6}[request.param]
    monkeypatch.setattr(chain_layout, "UNIT_MAJOR_WIDTH", width)
    return request.param


@pytest.mark.parametrize("sizes", [SMALL, DEEP])
@pytest.mark.parametrize("rho,project", RHOS)
@pytest.mark.parametrize("nudge", NUDGES)
def test_euler_chain_matches_general_loop(sizes, rho, project, nudge, layout):
    net, general = twin(sizes, rho)
    x, d = data(sizes)
    kw = dict(steps=25, eps=0.5 if "nudge_scale" not in nudge else 0.2, project=project, **nudge)
    if "beta" in nudge:
        kw["target"] = d
    fast, fd = relax(net, net.init_state(x), **kw)
    slow, sd = relax(general, general.init_state(x), **kw)
    assert_same(fast, slow)
    assert fd.steps == sd.steps and abs(fd.residual - sd.residual) <= TOL


@pytest.mark.parametrize("sizes", [SMALL, DEEP])
def test_euler_chain_tolerance_and_trajectory(sizes, layout):
    net, general = twin(sizes, "hard_sigmoid")
    x, d = data(sizes)
    kw = dict(steps=400, eps=0.5, project=True, tol=1e-4, check_every=3, beta=0.3, target=d, record_trajectory=True)
    fast, fd = relax(net, net.init_state(x), **kw)
    slow, sd = relax(general, general.init_state(x), **kw)
    assert fd.converged and sd.converged and fd.steps == sd.steps < 400
    assert_same(fast, slow)
    for a, b in zip(fd.trajectory, sd.trajectory):
        assert_same(a, b)


@pytest.mark.parametrize("nudge", [dict(), dict(beta=0.5), dict(beta=PER_EXAMPLE), dict(beta=-2.0), dict(beta=MIXED)])
def test_block_solver_chain_matches_general_loop(nudge, layout):
    net, general = twin(DEEP, "hard_sigmoid", skip=True)  # a zero skip 0-3 keeps the energy bipartite
    x, d = data(DEEP)
    kw = dict(steps=12, eps=0.5, method="async", **nudge)
    if "beta" in nudge:
        kw["target"] = d
    fast, fd = relax(net, net.init_state(x), **kw)
    slow, sd = relax(general, general.init_state(x), **kw)
    assert_same(fast, slow)
    assert abs(fd.residual - sd.residual) <= TOL


def test_a_long_phase_multiplies_by_contiguous_copies_of_w_transposed(monkeypatch):
    """On CPU a phase of LONG_PHASE steps or more multiplies by contiguous copies of W^T (faster in MKL), a short one
    by views of W; the results are the general loop's either way."""
    monkeypatch.setattr(native, "numba", None)  # the torch loops
    monkeypatch.setattr(small_gemm, "available", lambda: False)  # MKL's products (the packed ones: below)
    monkeypatch.setattr(chain_layout, "UNIT_MAJOR_WIDTH", 6)  # DEEP's 9 and 7 units row-major, 5 and 4 unit-major
    net, general = twin(DEEP, "hard_sigmoid")
    x, d = data(DEEP)
    for steps in (chain_module.LONG_PHASE - 1, chain_module.LONG_PHASE):
        state = net.init_state(x)
        chain = Chain.of(net, state, net.static_fields(state), steps=steps)
        chain.prepare_torch_loops()
        for k in range(2, len(DEEP)):
            w_t = chain.operand(k, transposed=True)
            assert torch.equal(w_t, chain.w[k].t())
            copied = steps >= chain_module.LONG_PHASE and k == 2  # layers 1 and 2 both row-major
            assert (w_t.data_ptr() != chain.w[k].data_ptr()) == copied and w_t.is_contiguous() == copied
        kw = dict(steps=steps, eps=0.5, project=True, beta=0.4, target=d)
        assert_same(relax(net, net.init_state(x), **kw)[0], relax(general, general.init_state(x), **kw)[0])


WIDE = (24, 40, 36, 33, 6)  # hidden layers wide enough for packed float64 products (16 columns or more)


@pytest.mark.skipif(not small_gemm.installed(), reason="llvmlite is not installed: no packed products (numba has it)")
@pytest.mark.parametrize("rho, method, loop", [
    ("hard_sigmoid", "euler", "fused"),  # the products, then the compiled update (native.move_toward_fields)
    ("hard_sigmoid", "euler", "torch"),  # no numba: the torch step, the static fields copied, the products added
    ("tanh", "euler", "fused"),  # rates in buffers (alpha 1)
    (Sigmoid(4.0, 0.5), "euler", "fused"),  # alpha = 4: torch multiplies
    ("hard_sigmoid", "async", "fused"),  # block sweeps
    ("hard_sigmoid", "euler", "native=False"),  # no compiled code at all: torch multiplies
])
@pytest.mark.parametrize("nudge", [dict(), dict(beta=0.7), dict(beta=PER_EXAMPLE)])
def test_a_long_phase_multiplies_by_packed_weights_where_they_run(rho, method, loop, nudge, monkeypatch):
    """In a long CPU phase where earlyprop.small_gemm runs, the torch loops multiply by W and W^T packed once per
    phase (every product of a step whose scale is 1; none with native=False), and the states are the general
    loop's."""
    monkeypatch.setattr(small_gemm, "available", lambda: True)  # on any CPU: its speed is AVX-512's, not its sums
    monkeypatch.setattr(native_chain, "MAX_STEP_MACS", 0)  # the torch loops: the kernels would run this chain
    if loop == "torch":
        monkeypatch.setattr(native, "numba", None)
    called = []
    product = small_gemm.Product.__call__
    monkeypatch.setattr(small_gemm.Product, "__call__", lambda self: (called.append(self), product(self)))
    net, general = twin(WIDE, rho, skip=method == "async")
    x, d = data(WIDE)
    steps = chain_module.LONG_PHASE + 6
    kw = dict(steps=steps, eps=0.5, project=rho == "hard_sigmoid", method=method, **nudge)
    if "beta" in nudge:
        kw["target"] = d
    fast, fd = relax(net, net.init_state(x), native=loop != "native=False", **kw)
    slow, sd = relax(general, general.init_state(x), **kw)
    assert_same(fast, slow)
    assert abs(fd.residual - sd.residual) <= TOL
    packed = {id(call.tensors[0]) for call in called}
    if isinstance(rho, Sigmoid) or loop == "native=False":
        assert not called
    else:  # both products of each of the two 40 x 36 and 36 x 33 matrices, every step
        assert len(packed) == 4 and len(called) >= 4 * steps


@pytest.mark.skipif(not small_gemm.installed(), reason="llvmlite is not installed: no packed products (numba has it)")
@pytest.mark.parametrize("variant", ["positive", "centered"])
def test_a_training_steps_phases_share_their_packed_weights(variant, monkeypatch):
    """A rule's step packs each matrix once, in its long free phase, and its short nudged phases multiply by the
    same packs (chain.StepFields); the gradients are the general path's. The next step packs again (the weights
    moved)."""
    monkeypatch.setattr(small_gemm, "available", lambda: True)
    monkeypatch.setattr(native_chain, "MAX_STEP_MACS", 0)
    packs, pack = [], small_gemm.PackedMatrix.__init__
    monkeypatch.setattr(small_gemm.PackedMatrix, "__init__", lambda self, *a: (packs.append(self), pack(self, *a))[1])
    called = []
    product = small_gemm.Product.__call__
    monkeypatch.setattr(small_gemm.Product, "__call__", lambda self: (called.append(self), product(self)))
    net, general = twin(WIDE, "hard_sigmoid")
    x, d = data(WIDE)
    rule = EquilibriumProp(0.5, variant, Relaxation(eps=0.5, free_steps=chain_module.LONG_PHASE + 2, nudge_steps=5))
    grads = []
    for network in (net, general):
        network.zero_grad(set_to_none=True)
        rule.compute_grads(network, x, d)
        grads.append([p.grad.clone() for p in network.parameters() if p.grad is not None])
    assert_same(grads[0][:3] + grads[0][4:], grads[1][:3] + grads[1][5:])  # the twin's extra zero term: its grad
    phases = 1 + (2 if variant == "centered" else 1)
    assert len(packs) == 4  # W_2 and W_3 both ways (the 6-unit output is stored unit-major): once for the step
    steps = chain_module.LONG_PHASE + 2 + 5 * (phases - 1)
    assert len(called) >= 4 * (steps - 2 * phases)  # the nudged phases' steps use them too (but measured ones)
    rule.compute_grads(net, x, d)
    assert len(packs) == 8


@pytest.mark.skipif(not native.available(), reason="numba is not installed: no compiled update (pip install numba)")
@pytest.mark.parametrize("nudge", [dict(), dict(beta=0.7), dict(beta=PER_EXAMPLE)])
def test_torch_loops_update_in_one_compiled_pass_where_the_kernels_do_not_fit(nudge, monkeypatch):
    """Past the kernels' products (MAX_STEP_MACS), the torch loops still move the state in one compiled pass that
    adds the static fields (native.move_toward_fields): every unmeasured step once the layers are plain, never with
    native=False; the states are the general loop's."""
    monkeypatch.setattr(native_chain, "MAX_STEP_MACS", 0)
    moves = []
    move = native.move_toward_fields
    monkeypatch.setattr(native, "move_toward_fields", lambda *args: (moves.append(args[0].shape), move(*args)))
    net, general = twin(DEEP, "hard_sigmoid")
    x, d = data(DEEP)
    kw = dict(steps=40, eps=0.5, project=True, tol=1e-9, check_every=10, **nudge)
    if "beta" in nudge:
        kw["target"] = d
    fast, fd = relax(net, net.init_state(x), **kw)
    slow, sd = relax(general, general.init_state(x), **kw)
    assert_same(fast, slow)
    assert fd.steps == sd.steps == 40 and abs(fd.residual - sd.residual) <= TOL
    assert len(moves) == 36 and set(moves) == {(x.shape[0] * sum(DEEP[1:]),)}  # 4 checks measure their step
    moves.clear()
    relax(net, net.init_state(x), native=False, **kw)
    assert not moves


def test_nudged_phase_from_a_state_outside_the_box():
    """A start outside [0, 1] (no projection yet) takes the generic rho/rho' until the first clip."""
    net, general = twin(SMALL, "hard_sigmoid")
    x, d = data(SMALL)
    start = net.init_state(x)
    start[1] = torch.linspace(-1.5, 2.0, start[1].numel(), dtype=torch.float64).view_as(start[1])
    fast, _ = relax(net, start, steps=6, eps=0.5, project=True, beta=0.5, target=d)
    slow, _ = relax(general, [t.clone() for t in start], steps=6, eps=0.5, project=True, beta=0.5, target=d)
    assert_same(fast, slow)


def grads_of(rule, network, x, d, seed=3):
    for p in network.parameters():
        p.grad = None
    rule.compute_grads(network, x, d, generator=torch.Generator().manual_seed(seed))
    return [p.grad.clone() for p in network.parameters()]


def common(general_grads, net):
    """The twin's gradients without its zero extra term (the last interaction's weight)."""
    n = len(list(net.interactions))
    return general_grads[:n] + general_grads[n + 1:]


@pytest.mark.parametrize("variant", ["positive", "negative", "centered", "random_sign"])
@pytest.mark.parametrize("method", ["euler", "async"])
def test_ep_gradients_match_general_loop_and_textbook_estimator(variant, method):
    net, general = twin(DEEP, "hard_sigmoid", skip=True)
    x, d = data(DEEP)
    rule = EquilibriumProp(0.5, variant, Relaxation(eps=0.5, free_steps=15, nudge_steps=6, method=method))
    fast = grads_of(rule, net, x, d)
    assert_same(fast, common(grads_of(rule, general, x, d), net))
    # textbook: separate phases, two energy_param_grads calls, their difference
    nu1, nu2 = rule.nudges(x.shape[0], torch.Generator().manual_seed(3), torch.float64, "cpu")
    free, _ = relax(net, net.init_state(x), steps=15, eps=0.5, project=True, method=method)
    phases = [free if not isinstance(nu, torch.Tensor) and nu == 0 else
              relax(net, free, steps=6, eps=0.5, beta=nu, target=d, project=True, method=method)[0]
              for nu in (nu1, nu2)]
    w = 1.0 / (nu2 - nu1)
    w = w if isinstance(w, torch.Tensor) else torch.full((x.shape[0],), w, dtype=torch.float64)
    textbook = [a - b for a, b in zip(net.energy_param_grads(phases[1], w), net.energy_param_grads(phases[0], w))]
    assert_same(fast, textbook)


def test_ep_gradients_accumulate_into_existing_grads():
    net, _ = twin(SMALL, "hard_sigmoid")
    x, d = data(SMALL)
    rule = EquilibriumProp(0.5, "centered", Relaxation(free_steps=10, nudge_steps=4))
    once = grads_of(rule, net, x, d)
    rule.compute_grads(net, x, d)
    assert_same([p.grad for p in net.parameters()], [2 * g for g in once])


@pytest.mark.parametrize("form", ["plain", "xie_seung", "tied"])
def test_stdp_gradients_match_general_loop(form):
    net, general = twin(SMALL, "hard_sigmoid")
    x, d = data(SMALL)
    rule = STDP(0.5, form, "centered", Relaxation(eps=0.5, free_steps=12, nudge_steps=5))
    assert_same(grads_of(rule, net, x, d), common(grads_of(rule, general, x, d), net))


def test_smooth_rate_training_step_matches_general_loop():
    """ER19-style: logistic rates, eps 0.2, unscaled nudge (the bench's config C)."""
    net, general = twin(SMALL, Sigmoid(4.0, 0.5))
    x, d = data(SMALL)
    rule = EquilibriumProp(0.1, "positive", Relaxation(eps=0.2, free_steps=30, nudge_steps=6, project=False,
                                                       nudge_scale="none"))
    assert_same(grads_of(rule, net, x, d), common(grads_of(rule, general, x, d), net))


def mnist_like_batch(batch: int = 20) -> torch.Tensor:
    """20 MNIST training images when ../shared/data has them, else sparse synthetic 28x28 images."""
    if (MNIST_DIR / "mnist").is_dir():
        from earlyprop.data import load_dataset, to_tensors

        return to_tensors(load_dataset("mnist", data_dir=MNIST_DIR), dtype=torch.float64).x_train[:batch]
    gen = torch.Generator().manual_seed(0)
    ink = torch.rand(batch, 784, generator=gen, dtype=torch.float64) < 0.2
    return torch.where(ink, torch.rand(batch, 784, generator=gen, dtype=torch.float64), 0.0)


def test_async_solver_reaches_the_euler_fixed_point_in_fewer_steps():
    net = Network.layered([784, 500, 10], "hard_sigmoid", seed=0, dtype=torch.float64)
    x = mnist_like_batch()
    euler, diag = relax(net, net.init_state(x), steps=5000, eps=0.5, project=True, tol=1e-4, check_every=1)
    assert diag.converged
    state, sweeps = net.init_state(x), 0
    while True:  # one sweep at a time, scored by the same projected Euler residual
        state, _ = relax(net, state, steps=1, eps=0.5, method="async")
        sweeps += 1
        _, check = relax(net, state, steps=0, eps=0.5, project=True)
        if check.residual <= 1e-4 or sweeps >= diag.steps:
            break
    assert check.residual <= 1e-4
    assert sweeps <= diag.steps / 2, (sweeps, diag.steps)  # seen: 100 vs 388 (MNIST), 194 vs 720 (synthetic)
    # the same fixed point: both within a 1e-4 residual of it (slow directions leave ~1e-3 in the states)
    assert_same(state, euler, tol=1e-2)
    with torch.no_grad():
        e_async, e_euler = float(net.energy(state).mean()), float(net.energy(euler).mean())
    assert abs(e_async - e_euler) <= 1e-5 * abs(e_euler)


def test_bench_cli_json(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)}
    out = subprocess.run([sys.executable, "-m", "earlyprop", "bench", "--json", "--configs", "A", "--repeats", "3",
                          "--json-out", str(tmp_path / "bench.json")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    row = report["configs"]["A"]
    for key in ("ms_per_batch", "bp_ms_per_batch", "flop_floor_ms", "ratio_to_floor", "speedup_vs_anchor",
                "replica_ms_per_batch", "speedup_vs_replica"):
        assert isinstance(row[key], float) and row[key] > 0
    assert row["flop_floor_mflop"] == pytest.approx(41.36, abs=0.01)  # 2 x 20.68M multiply-adds
    # the same products at the rates of their own shapes, each measured in this run (the faster layout)
    rates = report["machine"]["small_sgemm_gflops"]
    assert set(rates) == {"20x784x500", "500x20x784", "20x500x10", "20x10x500", "10x20x500"}
    macs_per_gflops = (20 * 784 * 500 * (1 / rates["20x784x500"] + 1 / rates["500x20x784"])
                       + 20 * 500 * 10 * (24 / rates["20x500x10"] + 24 / rates["20x10x500"] + 2 / rates["10x20x500"]))
    assert row["products_ms"] == pytest.approx(2 * macs_per_gflops / 1e9 * 1e3, rel=1e-12)  # 2 FLOPs per MAC
    assert row["ratio_to_products"] == pytest.approx(row["ms_per_batch"] / row["products_ms"], rel=1e-12)
    assert report["matmul_gflops"] > 0 and report["machine"]["threads"] == 1
    assert report["machine"]["device_name"] and "float32_matmul_precision" in report["machine"]
    assert json.loads((tmp_path / "bench.json").read_text())["configs"]["A"]["repeats"] == row["repeats"] == 3


def test_bench_gpu_config_g():
    """Issue 4's GPU budget: 784-1024-1024-10, batch 256, 20 + 4 Euler steps at eps 0.5, one-sided EP."""
    from earlyprop.bench_configs import CONFIGS, floor_products, flop_floor, small_shapes
    from earlyprop.commands.bench import _configs

    g = CONFIGS["G"]
    assert (g.sizes, g.batch, g.free_steps, g.nudge_steps, g.eps, g.method, g.variant) == \
        ((784, 1024, 1024, 10), 256, 20, 4, 0.5, "euler", "positive")
    # x's drive and the fused W1 gradient: 2 x 256x784x1024; 24 steps + the gradient: both directions of W2, W3
    inner = 1024 * 1024 + 1024 * 10
    assert flop_floor(g) == 2.0 * (2 * 256 * 784 * 1024 + (24 + 1) * 2 * 256 * inner)
    # every product of that floor, by shape: drive, W1's gradient, both directions and the gradients of W2, W3
    assert floor_products(g) == [((256, 784, 1024), 1), ((1024, 256, 784), 1),
                                 ((256, 1024, 1024), 24), ((256, 1024, 1024), 24), ((1024, 256, 1024), 2),
                                 ((256, 1024, 10), 24), ((256, 10, 1024), 24), ((10, 256, 1024), 2)]
    assert small_shapes([g]) == [(10, 256, 1024), (256, 1024, 1024), (256, 1024, 10), (256, 784, 1024),
                                 (256, 10, 1024), (1024, 256, 1024), (1024, 256, 784)]
    assert _configs("a,g") == ["A", "G"]


def test_bench_refuses_tf32_on_cpu_and_a_missing_json_folder(tmp_path, capsys):
    from earlyprop.cli import main

    assert main(["bench", "--configs", "A", "--tf32"]) == 2
    assert "--tf32 applies to CUDA devices only" in capsys.readouterr().err
    assert main(["bench", "--configs", "A", "--json-out", str(tmp_path / "missing" / "b.json")]) == 2
    assert "--json-out" in capsys.readouterr().err


def test_bench_machine_info_names_the_gpu(monkeypatch):
    """The CUDA branch of the report (no GPU here: the device queries are stubbed)."""
    from types import SimpleNamespace

    from earlyprop.bench import format_table
    from earlyprop.machine import machine_info

    props = SimpleNamespace(major=9, minor=0, total_memory=80 * 2**30, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    info = machine_info(torch.device("cuda"))
    assert info["gpu"] == info["device_name"] == "NVIDIA H100 80GB HBM3"
    assert info["gpu_capability"] == "9.0" and info["max_memory_allocated_mib"] == 3.0 and "tf32_matmul" in info
    info.update(sgemm_shape="4096x4096x4096", small_sgemm_gflops={})
    header = format_table({"machine": info, "matmul_gflops": 5e4, "configs": {}}).splitlines()[0]
    assert header.startswith("earlyprop bench: cuda (NVIDIA H100 80GB HBM3, CUDA") and "TF32 matmul off" in header


def test_bench_conv_config_m_matches_the_mnist_conv_config():
    """Issue 6's conv benchmark: configs/mnist-conv.toml's network; its backprop baseline is the same CNN."""
    from earlyprop.bench import make_cnn
    from earlyprop.bench_configs import CONFIGS, conv_flop_floor

    m = CONFIGS["M"]
    assert m.sizes == (784, 32 * 14 * 14, 64 * 7 * 7, 10) and m.variant == "centered"
    cnn = make_cnn(m)
    assert tuple(cnn(torch.rand(3, 784)).shape) == (3, 10)
    # conv1 drive: 64 x 32 x 25 x 28^2 MACs; conv2: 64 x 64 x 32 x 25 x 14^2; dense 64 x 3136 x 10
    c1, c2, d = 64 * 32 * 25 * 784, 64 * 64 * 32 * 25 * 196, 64 * 3136 * 10
    assert conv_flop_floor(m) == 2.0 * (c1 + (30 + 16) * 2 * (c2 + d) + c1 + 2 * (c2 + d))
    n = CONFIGS["N"]  # configs/mnist-conv-async.toml: same net, 8 + 2x3 block sweeps at omega 1.5
    assert (n.sizes, n.conv, n.gain) == (m.sizes, m.conv, m.gain) and (n.method, n.omega) == ("async", 1.5)
    assert conv_flop_floor(n) == 2.0 * (c1 + (8 + 6) * 2 * (c2 + d) + c1 + 2 * (c2 + d))
    assert "omega=1.5" in n.phases()


@pytest.mark.skipif(not (MNIST_DIR / "mnist").is_dir(), reason="needs ../shared/data/mnist (MNIST idx files)")
def test_bench_solvers_cli_json(tmp_path):
    """`earlyprop bench --solvers`: iterations to a 1e-4 residual per solver on three MNIST batches."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)}
    out = subprocess.run([sys.executable, "-m", "earlyprop", "bench", "--solvers", "--solver-nets", "784-30-10",
                          "--data-dir", str(MNIST_DIR), "--json"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)["solvers"]
    assert list(report) == [f"784-30-10 images {a}:{a + 20}" for a in (0, 20, 40)]
    for rows in report.values():
        assert [r["name"] for r in rows][:2] == ["euler", "async omega=1"] and len(rows) == 5
        assert all(r["converged"] and r["iterations"] >= 1 for r in rows)


@pytest.mark.parametrize("variant,method,rho,extra", [
    ("positive", "euler", "hard_sigmoid", dict()),  # config A's budget
    ("centered", "async", "hard_sigmoid", dict()),  # config B's
    ("positive", "euler", Sigmoid(4.0, 0.5), dict(eps=0.2, free_steps=40, project=False, nudge_scale="none")),  # C
])
def test_training_curves_match_general_loop(variant, method, rho, extra):
    """Twenty SGD steps on digits: the lean chain's training curve (cost per step) and final weights are the
    general loop's, to round-off. The twin's zero extra term stays out of the optimizer, so it stays zero."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:320] / 16.0, dtype=torch.float64)
    d = torch.nn.functional.one_hot(torch.tensor(digits.target[:320]), 10).double()
    sizes = (64, 24, 16, 10)
    net, shared = twin(sizes, rho, skip=True)  # the twin shares the lean net's terms: give it its own copies
    general = Network(sizes, [copy.deepcopy(t) for t in shared.interactions], net.rhos)
    with torch.no_grad():
        for a, b in zip(general.biases, net.biases):
            a.copy_(b)
    settings = dict(eps=0.5, free_steps=15, nudge_steps=6, method=method) | extra
    rule = EquilibriumProp(0.5 if extra.get("nudge_scale") != "none" else 0.1, variant, Relaxation(**settings))
    curves, weights = [], []
    for network in (net, general):
        params = [*network.interactions[:len(sizes) - 1].parameters(), *network.biases]
        opt = torch.optim.SGD(params, lr=0.2)
        curve = []
        for step in range(20):
            rows = slice(16 * step, 16 * step + 16)
            opt.zero_grad()
            curve.append(float(rule.compute_grads(network, x[rows], d[rows]).cost.mean()))
            opt.step()
        curves.append(curve)
        weights.append([p.detach().clone() for p in params])
    assert curves[0][-1] < curves[0][0]  # it learns
    assert max(abs(a - b) for a, b in zip(*curves)) <= 1e-10
    assert_same(weights[0], weights[1], tol=1e-10)
    assert float(general.interactions[-1].weight.detach().abs().max()) == 0.0


def test_narrow_layers_are_unit_major_on_cpu():
    """The layout the default CPU chain returns: the 10-unit output unit-major, the wider layers row-major."""
    sizes = (30, 24, 20, 10)
    net = Network.layered(sizes, "hard_sigmoid", dtype=torch.float64, seed=0)
    x, _ = data(sizes)
    state, _ = relax(net, net.init_state(x), steps=3, eps=0.5, project=True, native=False)
    assert [t.stride() for t in state[1:]] == [(24, 1), (20, 1), (1, 6)]
    if native.available():  # the compiled kernels read every layer row-major
        state, _ = relax(net, net.init_state(x), steps=3, eps=0.5, project=True)
        assert [t.stride() for t in state[1:]] == [(24, 1), (20, 1), (10, 1)]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 4e-16), (torch.float32, 2.5e-7)])
def test_chain_tanh_rates_are_tanh_to_working_precision(dtype, tol):
    """On CPU the lean chain computes tanh(s) as 2 sigmoid(2 s) - 1 (torch's CPU tanh costs ~3 sigmoids): equal to
    tanh within ~1.5 ulp of 1 (absolute), over the whole range a state takes."""
    net = Network.layered((3, 400, 100), "tanh", dtype=dtype)
    x = torch.zeros(50, 3, dtype=dtype)
    state = net.init_state(x)
    state[1] = torch.linspace(-6, 6, 50 * 400, dtype=torch.float64).reshape(50, 400).to(dtype)
    state[2] = torch.linspace(-1e-3, 1e-3, 50 * 100, dtype=torch.float64).reshape(50, 100).to(dtype)
    chain = Chain.of(net, state, net.static_fields(state))
    calls, rates, _, _ = chain.fixed_rates()
    for call in calls:
        call()
    for layer in (1, 2):
        exact = torch.tanh(state[layer].double())
        assert float((rates[layer].double() - exact).abs().max()) <= tol
