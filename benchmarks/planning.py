"""Planning time against torch.export alone, for the built-in GPT-2 shapes on the meta device.

Prints, per model, the median of repeated runs of torch.export and of planner.plan (which includes
its own torch.export), and the planner's overhead as a ratio, all measured in this process.

    python benchmarks/planning.py [--models gpt2 gpt2-xl] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import torch

import planner
from planner.models import resolve_model


def measure(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':12} {'export s (min/med/max)':>26} {'plan s (min/med/max)':>24} {'plan / export':>14}")
    for name in args.models:
        spec = resolve_model(name)
        model = spec.model("meta")
        inputs = spec.example_inputs("meta", args.seq_len, None)
        export = measure(lambda: torch.export.export(model, (), {**inputs, "use_cache": False}, strict=False), args.repeats)
        plan = measure(lambda: planner.plan(model, inputs), args.repeats)
        ratio = statistics.median(plan) / statistics.median(export)
        print(f"{name:12} {min(export):8.2f} {statistics.median(export):8.2f} {max(export):8.2f} "
              f"{min(plan):7.2f} {statistics.median(plan):7.2f} {max(plan):7.2f} {ratio:14.2f}")


if __name__ == "__main__":
    main()
