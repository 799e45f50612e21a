"""What CUDA graphs cost before they pay (issue 4: "document the compile cost"): for bench configs on a fresh
network, the ms of each of the first training batches with ``Relaxation(cuda_graphs=True)`` and without, the
graphs captured, and the median of later batches.

    python scripts/gpu_graph_cost.py [CONFIGS] [JSON_OUT]     # CONFIGS defaults to G,A,B,C
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from earlyprop.bench import CONFIGS, build_ep, random_batches, relaxation_twin


def batch_times(cfg, graphs: bool, count: int = 30) -> tuple[list[float], int]:
    device = torch.device("cuda")
    net, rule = build_ep(cfg, device)
    rule = relaxation_twin(rule, cuda_graphs=graphs)
    batches = random_batches(cfg, device)
    out = []
    for i in range(count):
        for p in net.parameters():
            p.grad = None
        torch.cuda.synchronize()
        start = time.perf_counter()
        rule.compute_grads(net, *batches[i % len(batches)])
        torch.cuda.synchronize()
        out.append((time.perf_counter() - start) * 1e3)
    layouts = [v for v in net.memo.values() if hasattr(v, "step_graphs")]
    captures = sum(g.captures for g in (layout.step_graphs() for layout in layouts) if g is not None)
    return out, captures


def main() -> int:
    torch.set_num_threads(1)
    names = (sys.argv[1] if len(sys.argv) > 1 else "G,A,B,C").split(",")
    report = {}
    for name in names:
        row = {}
        for graphs in (False, True):
            times, captures = batch_times(CONFIGS[name], graphs)
            row["graphs" if graphs else "no graphs"] = {"first_batches_ms": [round(t, 3) for t in times[:4]],
                                                        "median_ms_batches_10_30": statistics.median(times[10:]),
                                                        "captures": captures}
        report[name] = row
        for label, r in row.items():
            print(f"{name} {label:<9}: first batches {r['first_batches_ms']} ms, then median "
                  f"{r['median_ms_batches_10_30']:.3f} ms; graphs captured: {r['captures']}", flush=True)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
