"""The compiled CPU kernels (earlyprop.native): their exp, rates and float32 steps, their switch, their NaNs.

Their fixed points, trajectories and gradients against the general loop are in test_fast_paths.py (the
"compiled" layout); here what is particular to them. Skipped, with the reason, where numba is not installed
(CI installs it: the test extra requires it).
"""

from __future__ import annotations

import ast
import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_fast_paths import data  # tests/speed is on sys.path (rootdir-relative import)

import earlyprop.native as native
import earlyprop.native_chain as native_chain
import earlyprop.native_step as native_step
import earlyprop.small_gemm as small_gemm
from earlyprop import DivergenceError
from earlyprop.chain import Chain
from earlyprop.cli import build_parser
from earlyprop.config import TrainConfig, load_config
from earlyprop.dynamics import relax
from earlyprop.network import Network
from earlyprop.nonlinearity import Sigmoid, Tanh
from earlyprop.rules import EquilibriumProp, Relaxation

pytestmark = pytest.mark.skipif(not native.available(), reason="numba is not installed: no compiled kernels here "
                                "(pip install earlyprop[native])")


@pytest.fixture(scope="module")
def exp_all():
    import numba

    @numba.njit(fastmath=native.FASTMATH - {"reassoc"}, error_model="numpy")
    def run(x):
        for i in range(x.shape[0]):
            x[i] = native._exp(x[i])

    return run


@pytest.mark.parametrize("dtype, limit", [(np.float64, 708.0), (np.float32, 87.0)])
def test_exp_is_within_one_ulp(exp_all, dtype, limit):
    """Over the whole range it computes (and at the reduction's seams, x = (k + 1/2) ln 2), against float64 exp."""
    x = np.concatenate([np.linspace(-limit, limit, 200_001), (np.arange(-60, 60) + 0.5) * math.log(2)]).astype(dtype)
    y = x.copy()
    exp_all(y)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(y - exact) / exact) <= np.finfo(dtype).eps


def test_exp_saturates_and_passes_nan(exp_all):
    x = np.array([-1e4, -np.inf, 1e4, np.inf, np.nan, 0.0])
    exp_all(x)
    assert x[0] == x[1] == pytest.approx(math.exp(-708.0), rel=2.3e-16)
    assert x[2] == x[3] == pytest.approx(math.exp(708.0), rel=2.3e-16)
    assert math.isnan(x[4]) and x[5] == 1.0


@pytest.mark.parametrize("rho", [Sigmoid(4.0, 0.5), Sigmoid(1.0, 0.0), Tanh()], ids=repr)
@pytest.mark.parametrize("dtype, tol", [(np.float64, 4e-16), (np.float32, 2.5e-7)])
def test_smooth_rates_and_slopes_to_working_precision(rho, dtype, tol):
    s = np.linspace(-12.0, 12.0, 4001).astype(dtype)
    r, slope = np.empty_like(s), np.empty_like(s)
    kind, (_, _, gain, shift) = native_chain.KINDS[type(rho)], native_chain.rate_params(rho)
    native._smooth_rates(s, r, slope, kind, dtype(gain), dtype(shift))
    exact = torch.from_numpy(s.astype(np.float64))
    assert np.max(np.abs(r - rho.rho(exact).numpy())) <= tol
    assert np.max(np.abs(slope - rho.rho_prime(exact).numpy())) <= 4 * tol * max(1.0, rho_gain(rho))


def rho_gain(rho) -> float:
    return getattr(rho, "gain", 1.0)


@pytest.mark.parametrize("rho, project, method", [
    ("hard_sigmoid", True, "euler"), ("hard_sigmoid", False, "euler"), (Sigmoid(4.0, 0.5), False, "euler"),
    ("tanh", False, "euler"), ("hard_sigmoid", True, "async")])  # the block solver: hard-sigmoid/linear layers
def test_float32_steps_match_the_torch_loop(rho, project, method):
    """In float32 (what training runs) the kernels and the torch loop agree to float32 round-off, free and
    nudged, with a per-example beta."""
    sizes = (784, 100, 10)
    net = Network.layered(sizes, rho, dtype=torch.float32, seed=3, gain=1.5)
    x, d = data(sizes, batch=7)
    x, d = x.float(), d.float()
    beta = torch.linspace(-0.5, 1.0, 7)
    kw = dict(steps=30, eps=0.3, project=project, method=method, tol=1e-9, check_every=7)
    for nudge in (dict(), dict(beta=beta, target=d)):
        fast, fd = relax(net, net.init_state(x), **kw, **nudge)
        slow, sd = relax(net, net.init_state(x), **kw, **nudge, native=False)
        assert Chain.of(net, net.init_state(x), net.static_fields(net.init_state(x))).native is not None
        for a, b in zip(fast, slow):
            assert float((a - b).abs().max()) <= 2e-5
        assert fd.steps == sd.steps and abs(fd.residual - sd.residual) <= 1e-3 * max(1.0, sd.residual)


def test_a_nan_input_diverges_as_in_the_torch_loop():
    """NaN passes through the clips and the exp: relax's finiteness check sees it."""
    sizes = (6, 5, 3)
    for rho in ("hard_sigmoid", "tanh"):
        net = Network.layered(sizes, rho, dtype=torch.float64, seed=0)
        x = torch.rand(2, 6, dtype=torch.float64)
        state = net.init_state(x)
        static = net.static_fields(state)
        static[1][0, 2] = math.nan
        with pytest.raises(DivergenceError):
            relax(net, state, steps=5, eps=0.5, static=static, validate=False)


def test_the_switch_reaches_the_rules_and_the_config(monkeypatch):
    """Relaxation(native=...) decides which loop runs each phase (counted at the kernels), with the same gradient."""
    net = Network.layered((12, 9, 4), "hard_sigmoid", dtype=torch.float64, seed=0)
    x, d = data((12, 9, 4))
    calls, kernel, step = [], native.euler_steps, native_step.ep_step  # EP's step runs in one compiled call
    monkeypatch.setattr(native, "euler_steps", lambda *args: calls.append(1) or kernel(*args))
    monkeypatch.setattr(native_step, "ep_step", lambda *args: calls.append(1) or step(*args))
    grads = []
    for flag in (True, False):
        calls.clear()
        rule = EquilibriumProp(0.5, "centered", Relaxation(native=flag))
        rule.compute_grads(net, x, d)
        assert (len(calls) > 0) == flag
        grads.append([p.grad.clone() for p in net.parameters()])
        net.zero_grad(set_to_none=True)
    for a, b in zip(*grads):
        assert float((a - b).abs().max()) <= 1e-12
    assert TrainConfig().native is True and load_config(None, {"native": False}).native is False
    args = build_parser().parse_args(["train", "--no-native"])
    assert args.native is False and build_parser().parse_args(["train"]).native is None  # None: the config's


def test_compiles_without_a_writable_cache(monkeypatch):
    """A read-only install with no user cache directory: numba cannot cache, and the kernels still compile (in
    each process) instead of failing the import. (Checked by hand too: the package copied to a read-only
    folder, run as another user with HOME and NUMBA_CACHE_DIR unwritable, relaxes a tanh chain.)"""
    import numba

    njit = numba.njit

    def no_cache(*args, cache=False, **kwargs):
        if cache:
            raise RuntimeError("cannot cache function: no locator available")
        return njit(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", no_cache)

    def twice(x):
        return 2.0 * x

    assert native._jit(twice)(1.5) == 3.0


@pytest.mark.parametrize("sizes, rho, batch, compiled", [
    ((784, 500, 10), "hard_sigmoid", 20, True), ((30, 24, 20, 10), "linear", 2, True),
    ((784, 500, 10), Sigmoid(4.0, 0.5), 20, True), ((784, 500, 10), "tanh", 64, True),
    ((784, 500, 10), "hard_sigmoid", 256, False),  # 1.3M multiply-adds a step: MKL's
    ((784, 500, 500, 10), "hard_sigmoid", 20, False),  # 500 x 500 products: MKL's
    ((784, 10), "hard_sigmoid", 20, False)])  # one free layer: no product in the loop
def test_which_chains_run_compiled(sizes, rho, batch, compiled, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # the threshold is per torch thread
    net = Network.layered(sizes, rho, dtype=torch.float32, seed=0)
    state = net.init_state(torch.zeros(batch, sizes[0]))
    chain = Chain.of(net, state, net.static_fields(state))
    assert (chain.native is not None) == compiled
    assert Chain.of(net, state, net.static_fields(state), native=False).native is None


def test_the_bench_report_names_numba(monkeypatch):
    from earlyprop.bench import format_table
    from earlyprop.machine import machine_info

    info = machine_info(torch.device("cpu"))
    assert info["numba"] == native.numba.__version__
    info.update(sgemm_shape="1x1x1", small_sgemm_gflops={})
    header = format_table({"machine": info, "matmul_gflops": 1.0, "configs": {}}).splitlines()[0]
    assert f"numba {native.numba.__version__}, small_gemm {info['small_gemm']}" in header
    monkeypatch.setattr(native, "numba", None)
    assert machine_info(torch.device("cpu"))["numba"] is None
    # and whether earlyprop.small_gemm's products run, and if not why
    cases = ((1, True, "on"), (2, True, "off (more than one thread)"), (1, False, "off (no AVX-512)"))
    for threads, avx512, said in cases:
        monkeypatch.setattr(small_gemm, "_host", lambda avx512=avx512: ("cpu", "", avx512))
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        assert machine_info(torch.device("cpu"))["small_gemm"] == said
    monkeypatch.setattr(small_gemm, "_host", lambda: None)
    assert machine_info(torch.device("cpu"))["small_gemm"] == "absent (no llvmlite)"


def _kernel_calls_with_literals(module) -> list[str]:
    """Calls, in the module's compiled functions, of compiled functions with a literal argument (True, -1, 0.5)."""
    found = []
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            callee = getattr(module, node.func.id, None)
            literal = [a for a in node.args if isinstance(a, ast.Constant) or isinstance(a, ast.UnaryOp)
                       and isinstance(a.operand, ast.Constant)]
            if hasattr(callee, "py_func") and literal:
                found.append(f"{module.__name__}:{node.lineno} {node.func.id}")
    return found


@pytest.mark.parametrize("module", [native, native_step], ids=lambda m: m.__name__)
def test_compiled_callers_pass_no_literals(module):
    # numba compiles a compiled callee once more for each literal argument (a literal True is another type
    # than the bool Python passes): seconds of compiling each, for the same machine code
    assert _kernel_calls_with_literals(module) == []


def test_the_compiled_step_passes_step_sizes_in_the_state_dtype():
    # a float64 step size would make the float32 kernels compute in float64 and compile again
    # (the float32 depth the other tests compile: a new depth would compile the kernels again, ~20 s)
    net = Network.layered((6, 5, 3), "hard_sigmoid", dtype=torch.float32, seed=0)
    x, d = torch.rand(4, 6), torch.eye(3)[[0, 1, 2, 0]]
    for method in ("euler", "async"):
        rule = EquilibriumProp(0.5, "centered", Relaxation(method=method, free_steps=3, nudge_steps=2))
        rule.compute_grads(net, x, d)
    names = native_step.ep_step.py_func.__code__.co_varnames
    eps, omega = names.index("eps"), names.index("omega")
    float32 = [sig for sig in native_step.ep_step.signatures if str(sig[0].dtype) == "float32"]
    assert float32 and all(str(sig[eps]) == str(sig[omega]) == "float32" for sig in float32)


CALLEE = """import numba

@numba.njit(cache=True)
def plus(x):
    return x + {step}
"""
CALLER = """import pathlib
import numba
from callee import plus
from earlyprop.native_cache import stamp_cache

@numba.njit(cache=True)
def twice(x):
    return 2.0 * plus(x)

SOURCES = [pathlib.Path(__file__).with_name(name) for name in ("callee.py", "caller.py")]
assert stamp_cache(plus, SOURCES) and stamp_cache(twice, SOURCES)
"""


def test_a_cached_caller_sees_its_callees_file_change(tmp_path):
    # numba stamps a cache with the function's own file: a caller cached in caller.py would keep running the old
    # plus() after callee.py changed (as native_step.ep_step the old kernels of native.py) unless stamp_cache
    # stamps it with both files
    src = str(Path(native.__file__).parents[1])
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), src, os.environ.get("PYTHONPATH", "")])}

    def twice_of_one() -> str:
        return subprocess.run([sys.executable, "-c", "from caller import twice; print(twice(1.0))"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, check=True).stdout.strip()

    (tmp_path / "callee.py").write_text(CALLEE.format(step=1.0))
    (tmp_path / "caller.py").write_text(CALLER)
    assert twice_of_one() == "4.0"
    assert list((tmp_path / "cache").rglob("caller.twice-*.nbi"))  # cached: the next process loads it
    assert twice_of_one() == "4.0"
    (tmp_path / "callee.py").write_text(CALLEE.format(step=2.0))
    assert twice_of_one() == "6.0"


def test_the_kernels_caches_are_stamped_with_every_kernel_file():
    from earlyprop.native_cache import KERNEL_SOURCES, _contents_hash

    assert {p.name for p in KERNEL_SOURCES} == {"native.py", "native_step.py"}
    for kernel in (native.euler_steps, native.block_sweeps, native_step.ep_step):
        stamp = kernel._cache._cache_file._source_stamp
        assert stamp[1:] == tuple(_contents_hash(p) for p in KERNEL_SOURCES)
