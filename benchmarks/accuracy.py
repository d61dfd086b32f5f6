"""Validation perplexity of int8 GPT-2 after PTQ and QAT: qat-planner's plan against wrapping every Linear by hand.

A small GPT-2 (byte-level tokens, vocabulary 256) is trained in fp32 on a text file, by default
tiny-shakespeare. From that one model, four int8 models are made and converted with
torch.ao.quantization in eager mode:

- PTQ with qat-planner's default plan: prepare_qat, observe calibration batches, convert.
- QAT with the default plan: prepare_qat, train ``--qat-steps`` more steps with fake quantization, convert.
- PTQ and QAT with every Linear in its own QuantStub -> Linear -> DeQuantStub island.

Because QAT trains extra steps, which alone lower perplexity, a control row continues the fp32
model for the same steps, learning rate and batches, without fake quantization. All rows are
measured in one process on the same validation windows (the last 10% of the tokens): perplexity,
its distance from fp32 in percent, and top-1 agreement, the fraction of positions whose argmax
next token equals the fp32 model's.

    python benchmarks/accuracy.py [--text PATH] [--float-steps 1000] [--qat-steps 200] [--json PATH]

The default run took 5 min 10 s and 5 min 27 s of wall time in two runs on a 2-core x86-64 CPU with torch 2.13.0.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
import warnings
from pathlib import Path

import torch
import torch.ao.quantization as tq
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import planner
from planner.qat import ByteTokenizer, _batches, _logits, _train

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
# Acceptance target: QAT int8 perplexity with qat-planner's plan at most this many percent above fp32.
TARGET_PCT = 2.0


def load_tokens(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize ``path`` byte-level and split it into training tokens and the last 10% for validation."""
    data = torch.tensor(ByteTokenizer().encode(path.read_text(encoding="utf-8")), dtype=torch.long)
    split = int(len(data) * 0.9)
    return data[:split], data[split:]


def validation_windows(data: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """Return up to ``count`` non-overlapping windows of ``seq_len + 1`` tokens from the start of ``data``.

    These are the windows that `planner.qat.perplexity` evaluates.
    """
    count = min(count, (len(data) - 1) // seq_len)
    return torch.stack([data[i * seq_len:(i + 1) * seq_len + 1] for i in range(count)])


def build_model(args: argparse.Namespace, device: str = "cpu") -> GPT2LMHeadModel:
    config = GPT2Config(
        n_layer=args.layers, n_embd=args.width, n_head=args.heads, vocab_size=ByteTokenizer.vocab_size,
        n_positions=args.seq_len,
        # GPT-2's end-of-text id must lie inside the 256-token byte vocabulary.
        bos_token_id=ByteTokenizer.vocab_size - 1, eos_token_id=ByteTokenizer.vocab_size - 1,
    )
    with torch.device(device):
        return GPT2LMHeadModel(config)


def every_linear_rules() -> planner.RuleSet:
    """Return the default rules with GELU kept fp32, which makes the plan one Q -> Linear -> DQ island per Linear."""
    return planner.RuleSet(name="linear-islands", extends=("default",),
                           rules=(planner.Rule(match=planner.Match(type="GELU"), action="float"),))


def evaluate(model: nn.Module, windows: torch.Tensor, reference: torch.Tensor | None) -> tuple[float, float, torch.Tensor]:
    """Return perplexity, top-1 agreement with ``reference`` (1.0 when it is None) and the argmax tokens.

    The perplexity is exp(mean next-token cross-entropy over every position), as in `planner.qat.perplexity`.
    """
    model.eval()
    loss_sum = 0.0
    predictions = []
    with torch.no_grad():
        for chunk in windows.split(8):
            logits = _logits(model, chunk[:, :-1]).float()
            targets = chunk[:, 1:]
            loss_sum += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                    reduction="sum").item()
            predictions.append(logits.argmax(dim=-1))
    argmax = torch.cat(predictions)
    agreement = 1.0 if reference is None else (argmax == reference).float().mean().item()
    return math.exp(loss_sum / argmax.numel()), agreement, argmax


def convert_after_calibration(model: nn.Module, plan: planner.Plan, batches, count: int) -> nn.Module:
    """Emit ``plan`` on a copy of ``model``, observe ``count`` batches in eval mode without training, and convert."""
    prepared = planner.emit(model, plan)
    tq.prepare_qat(prepared, inplace=True)
    prepared.eval()
    prepared.apply(tq.enable_observer)
    prepared.apply(tq.enable_fake_quant)
    with torch.no_grad():
        for _ in range(count):
            _logits(prepared, next(batches)[:, :-1])
    prepared.apply(tq.disable_observer)
    return tq.convert(prepared, inplace=False)


def convert_after_training(model: nn.Module, plan: planner.Plan, batches, steps: int, lr: float) -> nn.Module:
    """Emit ``plan`` on a copy of ``model``, train it ``steps`` steps with fake quantization, and convert."""
    prepared = planner.emit(model, plan)
    tq.prepare_qat(prepared, inplace=True)
    _train(prepared, batches, steps, lr, "qat", None)
    prepared.eval()
    prepared.apply(tq.disable_observer)
    return tq.convert(prepared, inplace=False)


TABLE_HEADER = (f"{'method':34} {'conversions':>11} {'perplexity':>10} {'vs fp32':>8} {'vs control':>10} "
                f"{'top-1 agree':>11} {'seconds':>8}")


def format_row(row: dict) -> str:
    conversions = "-" if row["conversions"] is None else str(row["conversions"])
    return (f"{row['method']:34} {conversions:>11} {row['perplexity']:10.3f} {row['distance_pct']:+7.2f}% "
            f"{row['control_distance_pct']:+9.2f}% {row['top1_agreement']:11.4f} {row['seconds']:8.1f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="UTF-8 text file to train and validate on")
    parser.add_argument("--layers", type=int, default=4, help="number of transformer blocks")
    parser.add_argument("--width", type=int, default=128, help="embedding width (n_embd)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads per block")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training and validation window")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per training batch")
    parser.add_argument("--float-steps", type=int, default=1000, help="fp32 training steps from random weights")
    parser.add_argument("--float-lr", type=float, default=3e-3, help="peak AdamW learning rate of fp32 training (cosine decay)")
    parser.add_argument("--qat-steps", type=int, default=200,
                        help="QAT steps, also the extra steps of the fp32 control row")
    parser.add_argument("--qat-lr", type=float, default=3e-4, help="peak AdamW learning rate of QAT and of the fp32 control")
    parser.add_argument("--calibration-batches", type=int, default=32, help="training batches observed for PTQ")
    parser.add_argument("--eval-windows", type=int, default=256, help="validation windows of --seq-len tokens")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the batch order")
    parser.add_argument("--json", type=Path, help="also write the rows as a JSON list of objects to this file")
    args = parser.parse_args()

    if not args.text.is_file():
        parser.error(f"text file {args.text} not found. Pass an existing UTF-8 file with --text")
    if args.width % args.heads:
        parser.error(f"--width {args.width} is not divisible by --heads {args.heads}")
    for option in ("layers", "heads", "seq_len", "batch_size", "calibration_batches", "eval_windows", "threads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    for option in ("float_steps", "qat_steps"):
        if getattr(args, option) < 0:
            parser.error(f"--{option.replace('_', '-')} must not be negative, got {getattr(args, option)}")
    return args


def print_header(args: argparse.Namespace, model: nn.Module, train_data, validation, windows: torch.Tensor) -> None:
    parameters = sum(p.numel() for p in model.parameters())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, "
          f"engine {torch.backends.quantized.engine}")
    print(f"model: GPT-2, {args.layers} layers, width {args.width}, {args.heads} heads, byte-level vocabulary 256, "
          f"{parameters / 1e6:.2f}M parameters")
    print(f"data: {args.text.name}, {len(train_data)} training tokens, {len(validation)} validation tokens, "
          f"{len(windows)} validation windows of {args.seq_len} ({len(windows) * args.seq_len} positions)")
    print(f"steps: fp32 {args.float_steps} at lr {args.float_lr:g}, then QAT and fp32 control {args.qat_steps} at "
          f"lr {args.qat_lr:g}, batch {args.batch_size} x {args.seq_len}, PTQ calibration on {args.calibration_batches} batches")


def print_verdict(rows: list[dict]) -> None:
    by_method = {row["method"]: row for row in rows}
    qat = by_method["QAT int8, qat-planner plan"]
    ptq = by_method["PTQ int8, qat-planner plan"]
    met = "met" if qat["distance_pct"] <= TARGET_PCT else "NOT met"
    print(f"target (QAT int8 with qat-planner's plan at most {TARGET_PCT:g}% above fp32 perplexity): {met}, "
          f"{qat['distance_pct']:+.2f}% from fp32 and {qat['control_distance_pct']:+.2f}% from the fp32 control "
          "trained the same steps")
    print(f"PTQ int8 with the same plan: {ptq['distance_pct']:+.2f}% from fp32")


def main() -> None:
    args = parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_data, validation = load_tokens(args.text)
    window = args.seq_len + 1
    if len(validation) < window or len(train_data) <= window:
        raise SystemExit(f"{args.text} has {len(train_data) + len(validation)} tokens, too few for one window of "
                         f"{window} tokens in the last 10%. Use a longer --text or a smaller --seq-len")
    windows = validation_windows(validation, args.seq_len, args.eval_windows)
    model = build_model(args)
    print_header(args, model, train_data, validation, windows)

    # Seed + 1 feeds every QAT run and the fp32 control, so they see the same batches. Seed + 2 feeds both PTQ calibrations.
    def batches(seed: int):
        return _batches(train_data, window, args.batch_size, torch.Generator().manual_seed(seed))

    started = time.perf_counter()
    _train(model, batches(args.seed), args.float_steps, args.float_lr, "fp32", None)
    model.eval()
    float_seconds = time.perf_counter() - started
    control = copy.deepcopy(model)
    started = time.perf_counter()
    _train(control, batches(args.seed + 1), args.qat_steps, args.qat_lr, "fp32 control", None)
    control_seconds = time.perf_counter() - started
    float_perplexity, _, reference = evaluate(model, windows, None)
    control_perplexity, _, _ = evaluate(control, windows, None)

    rows = []

    def add_row(method: str, candidate: nn.Module, conversions: int | None, seconds: float) -> None:
        perplexity, agreement, _ = evaluate(candidate, windows, reference)
        rows.append({
            "method": method, "conversions": conversions, "perplexity": perplexity,
            "distance_pct": 100 * (perplexity / float_perplexity - 1),
            "control_distance_pct": 100 * (perplexity / control_perplexity - 1),
            "top1_agreement": agreement, "seconds": seconds,
        })
        print(format_row(rows[-1]), flush=True)

    print()
    print(TABLE_HEADER)
    add_row("fp32", model, None, float_seconds)
    add_row(f"fp32 + {args.qat_steps} steps (control)", control, None, control_seconds)

    example = {"input_ids": torch.zeros(1, args.seq_len, dtype=torch.long, device="meta")}
    plans = {
        "qat-planner plan": planner.plan(build_model(args, "meta"), example, rules="default"),
        "every Linear wrapped": planner.plan(build_model(args, "meta"), example, rules=every_linear_rules()),
    }
    for name, plan in plans.items():
        started = time.perf_counter()
        converted = convert_after_calibration(model, plan, batches(args.seed + 2), args.calibration_batches)
        add_row(f"PTQ int8, {name}", converted, plan.stats.conversions, time.perf_counter() - started)

        started = time.perf_counter()
        converted = convert_after_training(model, plan, batches(args.seed + 1), args.qat_steps, args.qat_lr)
        add_row(f"QAT int8, {name}", converted, plan.stats.conversions, time.perf_counter() - started)

    print()
    print("vs fp32, vs control: perplexity distance from the fp32 row and from the control row")
    print("top-1 agree: fraction of validation positions whose argmax next token equals fp32's")
    print("seconds: training (fp32 rows), or emit, calibration or QAT, and convert (int8 rows)")
    print_verdict(rows)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
