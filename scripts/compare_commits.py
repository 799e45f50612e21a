"""Time the bench configs' training step of this tree against another commit, paired, in one process.

On a shared machine two runs of the same code can differ by 30 %: a paired comparison is the stable number.
Both versions are imported side by side (the other commit's package renamed ``earlyprop_base``) and their
batches alternate, so a burst of load hits both alike. Prints each version's median ms per batch and the
median of the per-pair ratios new/base.

    python scripts/compare_commits.py HEAD~1 --configs A,B --batches 300
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def export_base(rev: str, into: Path) -> None:
    """``src/earlyprop`` of ``rev`` as the package ``earlyprop_base`` under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/earlyprop"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    package = into / "earlyprop_base"
    (into / "src" / "earlyprop").rename(package)
    for path in package.rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\bearlyprop(?=[.\s])", "earlyprop_base", text))


def paired(base_bench, new_bench, name: str, batches: int) -> tuple[float, float, float]:
    runners = [module.Runner(module.CONFIGS[name], torch.device("cpu")) for module in (base_bench, new_bench)]
    times: list[list[float]] = [[], []]
    for _ in range(5):
        for runner in runners:
            runner.zero()
            runner.ep_step()
    for i in range(batches):
        for j in ((0, 1) if i % 2 else (1, 0)):
            runners[j].zero()
            start = time.perf_counter()
            runners[j].ep_step()
            times[j].append(time.perf_counter() - start)
    ratios = [new / base for base, new in zip(*times)]
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3, statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the commit to compare with (e.g. HEAD~1)")
    parser.add_argument("--configs", default="A,B,C")
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        export_base(args.base, Path(tmp))
        sys.path[:0] = [tmp, str(ROOT / "src")]
        import earlyprop_base.bench as base_bench

        import earlyprop.bench as new_bench

        print(f"{'cfg':4}{'base ms':>10}{'new ms':>10}{'new/base':>10}   (base = {args.base}, paired, 1 thread)")
        for name in args.configs.split(","):
            base_ms, new_ms, ratio = paired(base_bench, new_bench, name, args.batches)
            print(f"{name:4}{base_ms:10.3f}{new_ms:10.3f}{ratio:10.3f}")


if __name__ == "__main__":
    main()
