"""`earlyprop train` from the command line: JSON output, run directories and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")
QUICK = ["--epochs", "1", "--hidden", "16", "--free-steps", "10", "--eval-steps", "10", "--threads", "1"]


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "earlyprop", "train", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.random((40, 6)), y_train=rng.integers(0, 3, 40), x_test=rng.random((12, 6)),
                  y_test=rng.integers(0, 3, 12))
    arrays.update(overrides)
    np.savez(path, **arrays)
    return path


def test_json_summary_is_the_last_line(tmp_path):
    result = run_cli("--data", write_npz(tmp_path / "d.npz"), "--rule", "ep-symmetric", "--json", *QUICK)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("test_accuracy", "train_accuracy", "epochs", "seconds", "examples_per_second", "rule"):
        assert key in summary
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["rule"] == "ep-symmetric"


def test_run_directory_is_never_overwritten_without_force(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("precious\n")
    result = run_cli("--data", write_npz(tmp_path / "d.npz"), "--out", out, *QUICK)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (out / "metrics.csv").read_text() == "precious\n"


BAD_DATA = {
    "nan": dict(x_train=np.full((40, 6), np.nan)),
    "inf": dict(x_test=np.full((12, 6), np.inf)),
    "labels out of range": dict(y_train=np.full(40, -1)),
    "non-integer labels": dict(y_train=np.linspace(0, 2, 40)),
    "feature mismatch": dict(x_test=np.zeros((12, 5))),
    "empty": dict(x_train=np.zeros((0, 6)), y_train=np.zeros(0, dtype=int)),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_line_exit_2_and_touches_nothing(tmp_path, case):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = run_cli("--data", write_npz(tmp_path / "d.npz", **BAD_DATA[case]), "--out", out, "--force", *QUICK)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("earlyprop: error:"), result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("args, message", [
    (["--rule", "ep", "--beta", "0"], "beta = 0"),
    (["--eps", "0"], "eps"),
    (["--data", "mnist", "--data-dir", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--data", "missing.npz"], "missing.npz"),
    (["--lr", "0.1,0.1,0.1"], "lr"),
    (["--gain", "0"], "gain"),
])
def test_bad_settings_are_one_line_errors(tmp_path, args, message):
    result = run_cli(*args, *QUICK, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_config_key_is_an_error(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("epochs = 1\nlearnig_rate = 0.1\n")
    result = run_cli("--config", config, *QUICK)
    assert result.returncode == 2 and "learnig_rate" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--eps", "-1", "--debug", *QUICK)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_divergence_names_eps_beta_and_step(tmp_path):
    # eps = 3 > 2 / lambda_max(H): the leaky integrator oscillates with growing amplitude until it overflows
    result = run_cli("--rho", "tanh", "--eps", "3", "--epochs", "1", "--hidden", "16", "--free-steps", "400",
                     "--threads", "1", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "diverged" in lines[0] and "eps=3" in lines[0] and "beta=" in lines[0] and "step" in lines[0]


def test_init_and_gain_flags_reach_the_network(tmp_path):
    """--init/--gain (issue 3: the initial weight scale matters for EP's generalisation) land in config.toml."""
    out = tmp_path / "run"
    result = run_cli("--data", write_npz(tmp_path / "d.npz"), "--init", "gaussian", "--gain", "0.5", "--out", out,
                     *QUICK)
    assert result.returncode == 0, result.stderr
    text = (out / "config.toml").read_text()
    assert 'init = "gaussian"' in text and "gain = 0.5" in text
