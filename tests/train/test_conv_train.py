"""Convolutional energy networks through the trainer and the CLI: real accuracy on digits (1x8x8 images),
configuration errors as one-line messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from earlyprop.config import ConfigError, load_config
from earlyprop.conv import ConvPool
from earlyprop.train import Trainer, train

SRC = str(Path(__file__).resolve().parents[2] / "src")
CONV = dict(conv="16:3:max", hidden=[], epochs=4)


@pytest.mark.parametrize("rule, threshold", [("stdp", 0.85), ("backprop", 0.85)])
def test_conv_net_learns_digits(rule, threshold):
    torch.set_num_threads(1)
    summary = train(load_config(None, {**CONV, "rule": rule}), log=lambda _: None)
    assert summary["test_accuracy"] > threshold, summary


def test_conv_layers_build_from_the_config_and_get_their_own_learning_rate():
    trainer = Trainer(load_config(None, {"conv": "4:3:avg,6:3:max:1", "hidden": [12], "lr": [0.1, 0.2, 0.3, 0.4]}),
                      dataset=_digits())
    net = trainer.network
    assert net.sizes == (64, 64, 24, 12, 10)
    assert [type(t) for t in net.interactions[:2]] == [ConvPool, ConvPool]
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.1, 0.2, 0.3, 0.4]


def _digits():
    from earlyprop.data import load_dataset

    return load_dataset("digits")


@pytest.mark.parametrize("overrides, message", [
    ({"conv": "16:3:maxx"}, "bad conv layer"),
    ({"conv": "16"}, "channels:kernel"),
    ({"conv": "16:3:max", "hidden": [], "lr": [0.1, 0.1, 0.1]}, "lr needs 1 or 2 values"),
    ({"hidden": []}, "hidden"),
    ({"device": "tpu9"}, "device"),
    ({"amp": "int8"}, "amp"),
])
def test_bad_conv_and_device_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_config(None, {"device": "cuda"})


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "earlyprop", "train", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def test_cli_trains_a_conv_net_on_auto_device(tmp_path):
    result = run_cli("--conv", "4:3:max", "--hidden", "", "--epochs", "1", "--free-steps", "10", "--eval-steps", "10",
                     "--device", "auto", "--json", "--out", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["sizes"] == [64, 64, 10] and 0 <= summary["test_accuracy"] <= 1


def test_cli_conv_on_flat_features_is_a_one_line_error(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "flat.npz", x_train=rng.random((20, 6)), y_train=rng.integers(0, 3, 20),
             x_test=rng.random((5, 6)), y_test=rng.integers(0, 3, 5))
    result = run_cli("--data", tmp_path / "flat.npz", "--conv", "4:3:max", "--lr", "0.05", "--epochs", "1",
                     cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "conv layers need image inputs" in lines[0], result.stderr


def test_shipped_conv_configs_build_their_networks():
    from earlyprop.train import build_network

    root = Path(__file__).resolve().parents[2] / "configs"
    cifar = build_network(load_config(root / "cifar10-la21.toml"), 3072, 10, (3, 32, 32))
    assert cifar.sizes == (3072, 128 * 16 * 16, 256 * 8 * 8, 512 * 4 * 4, 512 * 2 * 2, 10)
    mnist = build_network(load_config(root / "mnist-conv.toml"), 784, 10, (1, 28, 28))
    assert mnist.sizes == (784, 32 * 14 * 14, 64 * 7 * 7, 10)


def test_mixed_precision_trains_to_the_same_accuracy():
    """--amp bf16: the relaxation's products run in bfloat16 (autocast; on CPU here), parameters stay float32."""
    torch.set_num_threads(1)
    base = dict(hidden=[128], epochs=5, solver="async", free_steps=20)
    full = train(load_config(None, base), log=lambda _: None)
    mixed = train(load_config(None, {**base, "amp": "bf16"}), log=lambda _: None)
    assert mixed["test_accuracy"] > 0.90, mixed
    assert abs(mixed["test_accuracy"] - full["test_accuracy"]) < 0.02, (mixed, full)
