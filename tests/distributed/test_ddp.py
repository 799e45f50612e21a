"""Data-parallel training over 2 CPU processes (gloo): same step as one process, and it learns."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
SRC = str(HERE.parents[1] / "src")


def env():
    # faulthandler: a rank killed by a signal prints every thread's Python stack
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
            "PYTHONFAULTHANDLER": "1"}


@pytest.mark.parametrize("mode", [[], ["persistent"]], ids=["plain", "persistent"])
def test_two_processes_take_the_same_step_as_one(tmp_path, mode):
    """One step (with persistent particles: two, the second revisiting examples on the other rank) gives the
    weights, and the particles of every example, of one process with the combined batch."""
    worker = str(HERE / "ddp_worker.py")
    single = tmp_path / "single.safetensors"
    subprocess.run([sys.executable, worker, "0", "1", "unused", str(single), *mode], env=env(), check=True,
                   timeout=120)
    init, double = tmp_path / "init", tmp_path / "double.safetensors"
    procs = [subprocess.Popen([sys.executable, worker, str(r), "2", str(init), str(double), *mode], env=env())
             for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    a, b = load_file(single), load_file(double)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-12), key
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a)
    if mode:
        assert "particles.1" in a and int((a["particles.1"].abs().sum(1) > 0).sum()) == 29  # 20 + 9 examples


LEAVE = """
import torch
import torch.distributed as dist
from earlyprop.distributed import joined_group
for fails in (False, True):
    try:
        with joined_group() as group:
            assert dist.is_initialized() and group.world == 2
            total = torch.ones(1)
            dist.all_reduce(total)
            assert total.item() == 2.0
            if fails:
                raise KeyError("inside")
    except KeyError:
        assert fails
    assert not dist.is_initialized()
print("left", group.rank)
"""


def test_joined_group_is_left_before_the_process_exits():
    """A rank exiting with its gloo group alive can die of SIGABRT in interpreter shutdown (seen once in CI):
    the group is left at the end of the block, normally and after an error, and can be joined again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", LEAVE], stdout=subprocess.PIPE, text=True,
                              env={**env(), "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)})
             for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == ["left 0\n", "left 1\n"]


@pytest.mark.parametrize("device, expected", [("cuda", ("nccl", 3)), ("auto", ("nccl", 3)), ("cuda:1", ("nccl", None)),
                                              ("cpu", ("gloo", None))])
def test_each_gpu_rank_takes_its_own_device(monkeypatch, device, expected):
    """Under torchrun with GPUs, "cuda" (or "auto") means the rank's LOCAL_RANK-th device, joined with nccl (no GPU
    here: torch.cuda and the group's start are stand-ins that record what they were asked)."""
    from earlyprop import distributed

    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("device", index))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.setdefault("backend", backend))
    monkeypatch.setattr(distributed, "current_group", lambda: distributed.Group(3, 4))
    assert distributed.init_from_environment(device) == distributed.Group(3, 4)
    assert (calls["backend"], calls.get("device")) == expected


@pytest.mark.parametrize("backend, expected", [("nccl", torch.device("cuda", 2)), ("gloo", torch.device("cpu"))])
def test_metrics_are_summed_on_the_backends_device(monkeypatch, backend, expected):
    """nccl reduces CUDA tensors only: the metrics' sum is made on the rank's GPU there (stand-ins, no GPU here)."""
    from earlyprop import distributed

    monkeypatch.setattr(distributed.dist, "get_backend", lambda: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert distributed.collective_device() == expected


def test_torchrun_trains_digits(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "earlyprop",
         "train", "--rule", "stdp", "--hidden", "128", "--epochs", "5", "--solver", "async", "--free-steps", "20",
         "--threads", "1", "--out", str(out), "--json"],
        env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, result.stdout  # the summary is printed once, by rank 0
    summary = json.loads(lines[0])
    assert summary["test_accuracy"] > 0.90
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] == summary["test_accuracy"]
