"""int8 forward latency of GPT-2 small: qat-planner's plan against fp32 and against wrapping every Linear by hand.

All models are measured in one process, on the same input, after prepare_qat and convert (no training:
the weights are random, which does not change the latency). Prints min/median/max of repeated runs and
the speed-up over the fp32 Hugging Face model.

    python benchmarks/runtime.py [--seq-lens 32 128 512] [--threads 1 2] [--repeats 10]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
import warnings

import torch
import torch.ao.quantization as tq
from torch import nn
from transformers import GPT2LMHeadModel

import planner
from planner.emit import StubWrapper
from planner.models import gpt2_config


def convert_quickly(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Run prepare_qat, one observed forward and convert: enough for timing, which does not depend on the weights."""
    model.train()
    tq.prepare_qat(model, inplace=True)
    with torch.no_grad():
        model(example)
    model.eval()
    return tq.convert(model, inplace=False)


def every_linear_wrapped(model: GPT2LMHeadModel) -> nn.Module:
    """Emit the hand placement users write first: every projection and the LM head as its own Q -> Linear -> DQ island."""
    # Keeping GELU fp32 turns the default plan into exactly one island per Linear.
    rules = planner.RuleSet(name="linear-islands", extends=("default",),
                            rules=(planner.Rule(match=planner.Match(type="GELU"), action="float"),))
    return planner.emit(model, planner.plan(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)}, rules=rules))


def measure(model: nn.Module, ids: torch.Tensor, repeats: int) -> list[float]:
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(3):
            model(ids)
        for _ in range(repeats):
            started = time.perf_counter()
            model(ids)
            times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)

    config = gpt2_config("gpt2")
    base = GPT2LMHeadModel(config).eval()
    plan = planner.plan(base, {"input_ids": torch.zeros(1, 128, dtype=torch.long)})
    example = torch.randint(0, config.vocab_size, (1, 32))
    models = {
        "fp32 (Hugging Face)": base,
        "every Linear wrapped": convert_quickly(every_linear_wrapped(copy.deepcopy(base)), example),
        "qat-planner default plan": convert_quickly(planner.emit(base, plan), example),
    }
    stubs = {name: sum(isinstance(m, StubWrapper) for m in model.modules()) for name, model in models.items()}

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"engine {torch.backends.quantized.engine}; GPT-2 small, batch 1, random weights")
    print(f"{'threads':>7} {'seq':>5} {'model':26} {'ms min/median/max':>24} {'speed-up':>9}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for seq_len in args.seq_lens:
            ids = torch.randint(0, config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seq_len))
            reference = None
            for name, model in models.items():
                times = measure(model, ids, args.repeats)
                median = statistics.median(times)
                reference = reference or median
                print(f"{threads:>7} {seq_len:>5} {name:26} {min(times):7.1f} {median:7.1f} {max(times):7.1f} "
                      f"{reference / median:8.2f}x")
    print(f"wrapped modules: {stubs}")


if __name__ == "__main__":
    main()
