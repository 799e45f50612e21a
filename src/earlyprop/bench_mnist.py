"""The MNIST epoch of ``earlyprop bench --mnist-epoch`` (issue 4): config A against backprop on real data."""

from __future__ import annotations

import math
from typing import Any

import torch

from earlyprop.bench import CONFIGS, build_ep, make_mlp, time_calls


def mnist_epoch(data_dir: str, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """One MNIST training epoch of config A (EP17's learning rates 0.1, 0.05) against one of the same MLP
    trained by backprop (SGD 0.1); seconds per epoch, then test accuracy (untimed)."""
    from earlyprop.data import load_dataset, to_tensors

    cfg = CONFIGS["A"]
    data = to_tensors(load_dataset("mnist", data_dir=data_dir), device=device)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.x_train), generator=gen).to(device)
    n_classes = cfg.sizes[-1]
    net, rule = build_ep(cfg, device, seed)
    terms = list(net.interactions)
    opt = torch.optim.SGD([{"params": [terms[0].weight, net.biases[0]], "lr": 0.1},
                           {"params": [terms[1].weight, net.biases[1]], "lr": 0.05}])

    def ep_epoch() -> None:
        for start in range(0, len(order), cfg.batch):
            idx = order[start:start + cfg.batch]
            opt.zero_grad(set_to_none=True)
            y = torch.nn.functional.one_hot(data.y_train[idx], n_classes).float()
            rule.compute_grads(net, data.x_train[idx], y)
            opt.step()

    mlp = make_mlp(cfg.sizes, device, seed)
    bp_opt = torch.optim.SGD(mlp.parameters(), lr=0.1)

    def bp_epoch() -> None:
        for start in range(0, len(order), cfg.batch):
            idx = order[start:start + cfg.batch]
            bp_opt.zero_grad(set_to_none=True)
            y = torch.nn.functional.one_hot(data.y_train[idx], n_classes).float()
            (0.5 * ((mlp(data.x_train[idx]) - y) ** 2).sum(-1).mean()).backward()
            bp_opt.step()

    ep_s = time_calls(ep_epoch, 1, 0, device)[0] / 1e3
    bp_s = time_calls(bp_epoch, 1, 0, device)[0] / 1e3
    with torch.no_grad():
        chunks = range(0, len(data.x_test), 1000)
        ep_right = sum(int((rule.predict(net, data.x_test[i:i + 1000]) == data.y_test[i:i + 1000]).sum())
                       for i in chunks)
        bp_right = sum(int((mlp(data.x_test[i:i + 1000]).argmax(-1) == data.y_test[i:i + 1000]).sum())
                       for i in chunks)
    n_train, n_test = len(data.x_train), len(data.x_test)
    return {"config": "A", "batches": math.ceil(n_train / cfg.batch), "ep_seconds": ep_s, "bp_seconds": bp_s,
            "ratio": ep_s / bp_s, "ep_test_accuracy": ep_right / n_test, "bp_test_accuracy": bp_right / n_test}
