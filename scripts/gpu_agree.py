"""Issue 4's "speed never changes results", on a GPU: the same EP steps in float64 on the CPU and on ``DEVICE``.

For each case (configs A, B, C and D's phases on smaller nets, a conv net, one with a tolerance-stopped relaxation)
it builds one network, copies it to the device, runs ``rule.compute_grads`` on the same batch on both, and prints the
largest relative difference of every parameter's gradient; then trains a copy on each for a few SGD batches and
prints the largest relative difference of the weights after them; on the device once as it is and once with
``Relaxation(cuda_graphs=True)``. Exits 1 if any difference is above ``TOL``.

    python scripts/gpu_agree.py [DEVICE] [JSON_OUT]      # DEVICE defaults to cuda (cpu: a dry run of the script)
"""

from __future__ import annotations

import json
import sys

import torch

from earlyprop.conv import conv_network
from earlyprop.network import Network
from earlyprop.rules import EquilibriumProp, Relaxation

TOL = 1e-9  # float64; the paths differ in summation order only
CASES = {  # name: (sizes or conv specs, rho, batch, EP variant, relaxation settings)
    "A-like 784-64-10 euler P-EP": ((784, 64, 10), "hard_sigmoid", 20, "positive",
                                    dict(eps=0.5, free_steps=20, nudge_steps=4)),
    "B-like 784-64-10 async C-EP": ((784, 64, 10), "hard_sigmoid", 16, "centered",
                                    dict(method="async", free_steps=15, nudge_steps=15)),
    "C-like 784-64-10 leaky sigmoid": ((784, 64, 10), "sigmoid", 20, "positive",
                                       dict(eps=0.2, free_steps=100, nudge_steps=12, project=False,
                                            nudge_scale="none")),
    "D-like 784-48-48-48-10": ((784, 48, 48, 48, 10), "hard_sigmoid", 20, "positive",
                               dict(eps=0.5, free_steps=100, nudge_steps=8)),
    "tol-stopped 784-64-32-10": ((784, 64, 32, 10), "hard_sigmoid", 20, "positive",
                                 dict(eps=0.5, free_steps=300, nudge_steps=20, tol=1e-6, check_every=5)),
    "conv 8:5:max,16:5:max async": (("8:5:max", "16:5:max"), "hard_sigmoid", 8, "centered",
                                    dict(method="async", omega=1.5, free_steps=8, nudge_steps=3)),
}


def build(spec, rho: str) -> Network:
    if isinstance(spec[0], str):
        return conv_network((1, 28, 28), list(spec), [], 10, rho, gain=0.5, seed=0, dtype=torch.float64)
    return Network.layered(spec, rho, seed=0, dtype=torch.float64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu() - b.cpu()).abs().max() / b.cpu().abs().max().clamp_min(1e-300))


def grads(net: Network, rule: EquilibriumProp, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    for p in net.parameters():
        p.grad = None
    rule.compute_grads(net, x, y)
    return [p.grad.detach().cpu() for p in net.parameters()]


def trained(net: Network, rule: EquilibriumProp, batches, device: torch.device) -> list[torch.Tensor]:
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        rule.compute_grads(net, x.to(device), y.to(device))
        opt.step()
    return [p.detach().cpu() for p in net.parameters()]


def main() -> int:
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    report, worst = {}, 0.0
    for name, (spec, rho, batch, variant, settings) in CASES.items():
        rule = EquilibriumProp(0.5, variant, Relaxation(**settings))
        batches = [(torch.rand(batch, 784, generator=gen, dtype=torch.float64),
                    torch.nn.functional.one_hot(torch.randint(0, 10, (batch,), generator=gen), 10).double())
                   for _ in range(6)]
        cpu_net = build(spec, rho)
        x, y = batches[0]
        g_cpu = grads(cpu_net, rule, x, y)
        w_cpu = trained(cpu_net, rule, batches, torch.device("cpu"))
        for graphs in (False, True):
            dev_rule = EquilibriumProp(0.5, variant, Relaxation(cuda_graphs=graphs, **settings))
            dev_net = build(spec, rho).to(device)
            g_dev = grads(dev_net, dev_rule, x.to(device), y.to(device))
            grad_diff = max(rel(d, c) for d, c in zip(g_dev, g_cpu))
            weight_diff = max(rel(d, c) for d, c in zip(trained(dev_net, dev_rule, batches, device), w_cpu))
            label = f"{name}{' +graphs' if graphs else ''}"
            report[label] = {"grad_rel_diff": grad_diff, "weights_after_6_sgd_batches_rel_diff": weight_diff,
                             "grad_max_abs": max(float(g.abs().max()) for g in g_cpu)}
            worst = max(worst, grad_diff, weight_diff)
            print(f"{label:<42} grads {grad_diff:.2e}  weights after 6 SGD batches {weight_diff:.2e}", flush=True)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}: worst relative difference {worst:.2e} (tolerance {TOL:g})")
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "cases": report, "worst": worst}, f, indent=1)
    return 0 if worst <= TOL else 1


if __name__ == "__main__":
    sys.exit(main())
