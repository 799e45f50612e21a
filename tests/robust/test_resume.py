"""Checkpoints survive SIGKILL; resumed runs equal uninterrupted ones; bad checkpoints are clear errors."""

import csv
import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from earlyprop.checkpoint import CheckpointError, checkpoint_paths, latest_checkpoint, load_checkpoint
from earlyprop.config import load_config
from earlyprop.train import train

SRC = str(Path(__file__).resolve().parents[2] / "src")
RUN = ["--epochs", "3", "--hidden", "24", "--free-steps", "8", "--nudge-steps", "3", "--eval-steps", "8",
       "--checkpoint-every", "4", "--keep-checkpoints", "2", "--threads", "1", "--seed", "3"]


def command(out, *extra):
    return [sys.executable, "-m", "earlyprop", "train", "--out", str(out), *RUN, *extra]


def env():
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def metrics_without_time(out):
    with open(out / "metrics.csv") as fh:
        return [{k: v for k, v in row.items() if k not in ("seconds", "examples_per_second")}
                for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "run"
    subprocess.run(command(out), env=env(), check=True, capture_output=True, timeout=300)
    return out


def test_same_seed_runs_are_bitwise_identical(uninterrupted, tmp_path):
    out = tmp_path / "again"
    subprocess.run(command(out), env=env(), check=True, capture_output=True, timeout=300)
    assert (out / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    assert metrics_without_time(out) == metrics_without_time(uninterrupted)


@pytest.mark.parametrize("kill_seed", [0, 1, 2])
def test_killed_and_resumed_run_equals_uninterrupted_run(uninterrupted, tmp_path, kill_seed):
    rng = random.Random(kill_seed)
    out = tmp_path / "run"
    kills = 0
    for attempt in range(2):
        process = subprocess.Popen(command(out, *(["--resume"] if attempt else [])), env=env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        wanted = rng.randint(1, 6)
        while time.time() < deadline and process.poll() is None:
            if len(list((out / "checkpoints").glob("ckpt-*.json"))) >= min(wanted, 2) and rng.random() < 0.3:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.2))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
    finished = subprocess.run(command(out, "--resume"), env=env(), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert kills >= 1, "the run finished before it could be killed; make it longer"
    assert (out / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    assert metrics_without_time(out) == metrics_without_time(uninterrupted)


def quick_config(**overrides):
    values = dict(epochs=1, hidden=[16], free_steps=5, nudge_steps=2, eval_steps=5, checkpoint_every=10)
    values.update(overrides)
    return load_config(None, values)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    out = tmp_path / "run"
    train(quick_config(), out=out, log=lambda _: None)
    newest, older = checkpoint_paths(out / "checkpoints")[:2]
    tensors = newest.with_suffix(".safetensors")
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(newest)
    skipped = []
    assert latest_checkpoint(out / "checkpoints", warn=skipped.append).path == older
    assert skipped and "corrupt or truncated" in skipped[0]


def test_no_valid_checkpoint_is_a_one_line_error(tmp_path):
    out = tmp_path / "run"
    train(quick_config(), out=out, log=lambda _: None)
    for path in checkpoint_paths(out / "checkpoints"):
        path.write_text("{not json")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    result = subprocess.run([sys.executable, "-m", "earlyprop", "train", "--out", str(out), "--resume"], env=env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no valid checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_checkpoint_of_another_architecture_says_what_differs(tmp_path):
    out = tmp_path / "run"
    train(quick_config(), out=out, log=lambda _: None)
    with pytest.raises(CheckpointError, match=r"another architecture.*\[64, 16, 10\].*\[64, 32, 10\]"):
        train(quick_config(hidden=[32]), out=out, log=lambda _: None, resume=True)
    with pytest.raises(CheckpointError, match="other settings: beta"):
        train(quick_config(beta=0.5), out=out, log=lambda _: None, resume=True)


def test_full_disk_keeps_the_previous_checkpoint_valid(tmp_path, monkeypatch):
    import earlyprop.checkpoint as checkpoint

    out = tmp_path / "run"
    calls = {"n": 0}
    real_write = checkpoint.atomic_write

    def failing_write(path, data):
        calls["n"] += 1
        if calls["n"] > 5 and path.suffix == ".safetensors":
            with open(path.with_name(".partial"), "wb") as fh:
                fh.write(data[: len(data) // 2])  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write", failing_write)
    with pytest.raises(OSError, match="No space left on device.*previous checkpoint is intact"):
        train(quick_config(epochs=3), out=out, log=lambda _: None)
    monkeypatch.setattr(checkpoint, "atomic_write", real_write)
    valid = latest_checkpoint(out / "checkpoints")
    assert valid is not None and valid.meta["batches_seen"] > 0


def test_checkpoint_from_before_a_config_key_existed_resumes_with_its_default(tmp_path):
    """A checkpoint written before ``tol``/``check_every`` existed ran with their defaults: it resumes under them,
    and a run configured otherwise is told what differs."""
    import json

    out = tmp_path / "run"
    train(quick_config(epochs=2), out=out, log=lambda _: None)
    for path in checkpoint_paths(out / "checkpoints"):
        record = json.loads(path.read_text())
        for key in ("tol", "check_every"):
            del record["meta"]["config"][key]
        del record["meta"]["position"]["free_steps"]
        path.write_text(json.dumps(record))
    summary = train(quick_config(epochs=2), out=out, log=lambda _: None, resume=True)
    assert summary["resumed_from_epoch"] == 3
    with pytest.raises(CheckpointError, match="other settings: tol"):
        train(quick_config(epochs=2, tol=1e-3), out=out, log=lambda _: None, resume=True)
