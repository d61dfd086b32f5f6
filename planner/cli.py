"""Command-line interface: parses arguments and calls one library function per command."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import traceback
import warnings
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import ModelSpecError, PlanError, PlannerError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Plan QuantStub/DeQuantStub placement for eager-mode QAT.")
console = Console()
error_console = Console(stderr=True)


class Objective(str, Enum):
    bytes = "bytes"
    count = "count"
    latency = "latency"


OBJECTIVE_HELP = ("What the cut minimises: converted elements (bytes), conversions (count), or the int8 forward "
                  "time predicted by this machine's cost model (latency; see calibrate).")
COST_MODEL_HELP = "Cost model JSON written by calibrate --out, for --objective latency. Default: this machine's cached one."


class ReportFormat(str, Enum):
    text = "text"
    json = "json"
    markdown = "markdown"
    dot = "dot"
    svg = "svg"


class DiffFormat(str, Enum):
    text = "text"
    json = "json"
    markdown = "markdown"


@app.command("plan")
def plan_command(
    model: str = typer.Argument(..., help="Built-in name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt2-tiny), a local Hugging Face folder, or package.module:factory."),
    rules: Optional[list[str]] = typer.Option(None, "--rules", help="Built-in rule set name or JSON file; repeat to layer sets in order. Default: default."),
    objective: Objective = typer.Option(Objective.bytes, help=OBJECTIVE_HELP),
    cost_model: Optional[Path] = typer.Option(None, "--cost-model", exists=True, dir_okay=False, help=COST_MODEL_HELP),
    format: ReportFormat = typer.Option(ReportFormat.text, "--format", help="Report format."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the report to this file instead of standard output."),
    seq_len: int = typer.Option(128, "--seq-len", min=1, help="Sequence length of the example input, in tokens; it sets the element counts."),
    save_plan: Optional[Path] = typer.Option(None, "--save-plan", help="Also write the plan as JSON to this file (for validate --plan or planner.Plan.load)."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when a rule from your rule files matches no node."),
) -> None:
    """Plan a model and print where every QuantStub and DeQuantStub goes, and why."""
    from .models import resolve_model
    from .plan import plan
    from .report import render

    spec = resolve_model(model)
    instance = spec.model("meta")
    _check_seq_len(instance, seq_len)
    with console.status("tracing and planning", spinner="dots") if console.is_terminal else _nothing():
        result = plan(instance, spec.example_inputs("meta", seq_len, None), rules=rules or "default", objective=objective.value,
                      strict=strict, cost_model=_cost_model(objective, cost_model))
    for origin in result.dead_rules:
        summary = result.rule_table[origin]
        error_console.print(f"warning: rule {origin} ({summary.file or 'built in Python'}) matches no node: "
                            f"{summary.action} {json.dumps(summary.match)}", highlight=False, soft_wrap=True)
    for conflict in result.conflicts[:10]:
        error_console.print(f"warning: conflict at {conflict}", highlight=False, soft_wrap=True)
    if len(result.conflicts) > 10:
        error_console.print(f"warning: ... and {len(result.conflicts) - 10} more conflicts; the plan's \"conflicts\" list has them all",
                            highlight=False, soft_wrap=True)
    if save_plan is not None:
        result.save(save_plan)
    if out is not None:
        out.write_text(render(result, format.value) + "\n", encoding="utf-8")
        error_console.print(f"wrote {format.value} report to {out}")
    elif format is ReportFormat.text:
        console.print(render(result, "text", markup=True), highlight=False, soft_wrap=True)
    else:
        sys.stdout.write(render(result, format.value) + "\n")


@app.command("explain")
def explain_command(
    model: str = typer.Argument(..., help="Built-in name, a local Hugging Face folder, or package.module:factory."),
    node: str = typer.Argument(..., help="A module fqn (transformer.h.0.mlp.c_fc) or an op node name (transformer.h.0:add#0)."),
    rules: Optional[list[str]] = typer.Option(None, "--rules", help="Built-in rule set name or JSON file; repeatable."),
    objective: Objective = typer.Option(Objective.bytes, help=OBJECTIVE_HELP),
    cost_model: Optional[Path] = typer.Option(None, "--cost-model", exists=True, dir_okay=False, help=COST_MODEL_HELP),
    seq_len: int = typer.Option(128, "--seq-len", min=1, help="Sequence length of the example input, in tokens."),
) -> None:
    """Explain why one node is int8 or fp32: its candidate rules, neighbours and stubs."""
    from .explain import explain
    from .models import resolve_model
    from .plan import plan

    spec = resolve_model(model)
    instance = spec.model("meta")
    _check_seq_len(instance, seq_len)
    result = plan(instance, spec.example_inputs("meta", seq_len, None), rules=rules or "default", objective=objective.value,
                  cost_model=_cost_model(objective, cost_model))
    console.print(explain(result, node), highlight=False, soft_wrap=True)


rules_app = typer.Typer(no_args_is_help=True, help="Check, list, show and describe rule sets.")
app.add_typer(rules_app, name="rules")


@rules_app.command("check")
def rules_check_command(files: list[Path] = typer.Argument(..., help="Rule files to check, without a model.")) -> None:
    """Validate rule files (schema, extends, presets); exit 1 when any has a problem."""
    from .errors import RuleError
    from .rules import resolve_rules

    failed = 0
    for file in files:
        try:
            resolved = resolve_rules(str(file))
        except RuleError as exc:
            failed += 1
            for line in str(exc).splitlines():
                console.print(f"FAIL  {line}", highlight=False, soft_wrap=True)
            continue
        console.print(f"OK    {file}: {len(resolved.rules)} rules after extends ({resolved.name})", highlight=False)
    if failed:
        raise typer.Exit(1)


@rules_app.command("list")
def rules_list_command() -> None:
    """List the built-in rule sets."""
    from .rules import builtin_rule_sets, load_rules

    for name in builtin_rule_sets():
        ruleset = load_rules(name)
        console.print(f"{name:16} {ruleset.description or ''}", highlight=False, soft_wrap=True)


@rules_app.command("show")
def rules_show_command(name: str = typer.Argument(..., help="Built-in name or JSON file.")) -> None:
    """Print one rule set as JSON after resolving extends (the rules in the order precedence reads them)."""
    from .rules import flatten_rules, resolve_rules

    sys.stdout.write(flatten_rules(resolve_rules(name)).to_json() + "\n")


@rules_app.command("schema")
def rules_schema_command() -> None:
    """Print the JSON Schema of rule files, for editors that complete and check them."""
    import json

    from .rules import RuleSet

    sys.stdout.write(json.dumps(RuleSet.model_json_schema(), indent=2) + "\n")


@app.command("validate")
def validate_command(
    model: str = typer.Argument(..., help="Built-in name, a local Hugging Face folder, or package.module:factory."),
    rules: Optional[list[str]] = typer.Option(None, "--rules", help="Built-in rule set name or JSON file; repeatable."),
    plan_file: Optional[Path] = typer.Option(None, "--plan", exists=True, dir_okay=False, help="Validate this saved plan instead of planning anew."),
    objective: Objective = typer.Option(Objective.bytes, help="Objective used when planning anew: bytes, count or latency."),
    cost_model: Optional[Path] = typer.Option(None, "--cost-model", exists=True, dir_okay=False, help=COST_MODEL_HELP),
    seq_len: int = typer.Option(32, "--seq-len", min=1, help="Tokens in the example input of language models."),
    static_only: bool = typer.Option(False, "--static-only", help="Skip the checks that run the model (no weights needed)."),
) -> None:
    """Check a plan: static checks on the traced graph, then emit → prepare_qat → train → convert → int8 forward."""
    import torch

    from .models import resolve_model
    from .plan import Plan, plan
    from .validate import validate

    spec = resolve_model(model)
    device = "meta" if static_only else "cpu"
    instance = spec.model(device)
    _check_seq_len(instance, seq_len)
    inputs = spec.example_inputs(device, seq_len, None)
    if isinstance(inputs, dict) and "input_ids" in inputs and device != "meta":
        vocab = getattr(getattr(instance, "config", None), "vocab_size", 2)
        inputs = {**inputs, "input_ids": torch.randint(0, vocab, tuple(inputs["input_ids"].shape), generator=torch.Generator().manual_seed(0))}
    the_plan = Plan.load(plan_file) if plan_file else plan(instance, inputs, rules=rules or "default", objective=objective.value,
                                                           cost_model=_cost_model(objective, cost_model))
    report = validate(instance, inputs, the_plan, dynamic=not static_only)
    console.print(report.render(), highlight=False, soft_wrap=True)
    if not report.passed:
        raise typer.Exit(1)


@app.command("diff")
def diff_command(
    plan_a: Path = typer.Argument(..., help="Plan JSON written by plan --save-plan or Plan.save (the before side)."),
    plan_b: Path = typer.Argument(..., help="Plan JSON to compare with it (the after side)."),
    format: DiffFormat = typer.Option(DiffFormat.text, "--format", help="Report format."),
) -> None:
    """Compare two saved plans: domain changes, stubs and fusions that appeared or went, and the cost change."""
    from .diff import diff_plans, render_diff
    from .plan import Plan

    before, after = Plan.load(plan_a), Plan.load(plan_b)
    sys.stdout.write(render_diff(diff_plans(before, after, labels=(str(plan_a), str(plan_b))), format.value) + "\n")


@app.command("qat")
def qat_command(
    model: str = typer.Argument(..., help="Built-in name, a local Hugging Face folder, or package.module:factory."),
    text: Path = typer.Option(..., "--text", exists=True, dir_okay=False, help="UTF-8 text file to train and validate on (last 10% held out)."),
    float_steps: int = typer.Option(300, "--float-steps", min=0, help="fp32 training steps before planning (built-in models start from random weights)."),
    qat_steps: int = typer.Option(100, "--qat-steps", min=1, help="Training steps after prepare_qat (at least 1, so observers see data)."),
    seq_len: int = typer.Option(128, "--seq-len", min=1, help="Training window, in tokens."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Windows per training step."),
    rules: Optional[list[str]] = typer.Option(None, "--rules", help="Built-in rule set name or JSON file; repeatable."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the converted model's state dict (model_int8.pt) and plan.json."),
    seed: int = typer.Option(0, "--seed", help="Random seed for initialisation and batch sampling."),
) -> None:
    """Train on real text in fp32, plan, emit, QAT-train, convert, and compare fp32, fake-quant and int8."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from .models import resolve_model
    from .qat import QATConfig, run_qat

    spec = resolve_model(model)
    config = QATConfig(text=text, float_steps=float_steps, qat_steps=qat_steps, seq_len=seq_len, batch_size=batch_size,
                       rules=rules or "default", out=out, seed=seed)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
                        TimeRemainingColumn(), console=error_console, transient=False)
    tasks: dict[str, int] = {}

    def on_step(phase: str, step: int, total: int, loss: float) -> None:
        # The bars start with the first step, so input errors found before training print no bars.
        if not tasks:
            progress.start()
            tasks["fp32"] = progress.add_task("fp32 training", total=float_steps, loss=float("nan"))
            tasks["qat"] = progress.add_task("QAT training ", total=qat_steps, loss=float("nan"))
        progress.update(tasks[phase], completed=step, loss=loss)

    try:
        result = run_qat(spec, config, on_step)
    finally:
        progress.stop()

    table = Table(title=f"QAT of {model} on {text.name} ({result.tokenizer}; {result.train_tokens} training, {result.validation_tokens} validation tokens)")
    table.add_column("model")
    table.add_column("validation perplexity", justify="right")
    table.add_column(f"forward latency, batch 1 × {seq_len} (ms)", justify="right")
    table.add_column("state dict (MB)", justify="right")
    for name in ("fp32", "fake-quant", "int8"):
        latency = result.latency_ms.get(name)
        size = result.state_dict_bytes.get(name)
        table.add_row(name, f"{result.perplexity[name]:.3f}", f"{latency:.2f}" if latency else "–", f"{size / 1e6:.2f}" if size else "–")
    console.print(table)
    change = (result.perplexity["int8"] / result.perplexity["fp32"] - 1) * 100
    console.print(f"int8 perplexity is {change:+.2f}% from fp32; int8 forward is {result.latency_ms['fp32'] / result.latency_ms['int8']:.2f}× the speed of fp32; "
                  f"{result.plan.stats.conversions} conversions")
    checked = [v for v in result.substitution_checks.values() if v is not None]
    if checked:
        console.print(f"substitutions checked on random inputs: {len(checked)} modules, max abs difference {max(checked):.2g}")
    if out is not None:
        console.print(f"saved {out / 'model_int8.pt'} and {out / 'plan.json'}")


@app.command("calibrate")
def calibrate_command(
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads to measure with; plans for that thread count use it. Default: torch's current count."),
    out: Optional[Path] = typer.Option(None, "--out", dir_okay=False, help="Write the cost model here instead of the cache."),
    quick: bool = typer.Option(False, "--quick", help="Fewer sizes: about 12 s instead of 18, less exact."),
    show: bool = typer.Option(False, "--show", help="Print the cached cost model without measuring."),
) -> None:
    """Measure this machine's cost of quantize, dequantize and each op class, for --objective latency."""
    from .costs import MAC_CLASSES, CostModel, calibrate, default_cost_model_path

    path = out or default_cost_model_path(threads)
    if show:
        if out is None and not path.exists():
            command = "qat-planner calibrate" + (f" --threads {threads}" if threads else "")
            raise PlanError(f"no cost model for this machine at {path}; write one with `{command}`")
        model = CostModel.load(path)
    else:
        with console.status("timing op classes", spinner="dots") if console.is_terminal else _nothing():
            model = calibrate(threads)
        model.save(path)
    table = Table(title=f"cost model: {model.describe()} ({model.calibrated_at})")
    for column in ("op class", "domain", "unit"):
        table.add_column(column, no_wrap=True)
    for column in ("µs/call", "ns/unit", "ns/weight"):
        table.add_column(column, justify="right", no_wrap=True, min_width=len(column))
    rows = [("quantize", "–", model.quantize), ("dequantize", "–", model.dequantize)]
    rows += [(op, domain, cost) for domain in ("fp32", "int8") for op, cost in getattr(model, domain).items()]
    for op, domain, cost in rows:
        unit = "MAC" if op.startswith(MAC_CLASSES) else "element"
        weight = f"{cost.ns_per_weight:.4f}" if op.startswith(("linear", "conv")) else "–"
        table.add_row(op, domain, unit, f"{cost.fixed_us:.2f}", f"{cost.ns_per_unit:.4f}", weight)
    console.print(table)
    console.print(f"{'read' if show else 'saved'} {path}" + ("" if show else f" ({model.threads} threads)"),
                  highlight=False, soft_wrap=True)


def _cost_model(objective: Objective, path: Optional[Path]):
    """Return the cost model for --objective latency: the named file, else the cache, measured now if missing."""
    if objective is not Objective.latency:
        if path is not None:
            raise typer.BadParameter(f"{path} is a cost model, used only with --objective latency; add that option "
                                     "or leave --cost-model out", param_hint="--cost-model")
        return None
    from .costs import default_cost_model_path, load_cost_model

    cached = default_cost_model_path()
    if path is None and not cached.exists():
        error_console.print(f"no cost model for this machine yet; calibrating once (about 20 s on an idle machine) "
                            f"and caching it in {cached}", highlight=False, soft_wrap=True)
    model = load_cost_model(path)
    differences = model.mismatches()
    if differences:
        error_console.print(f"warning: the cost model was measured with {', '.join(differences)}; its predictions "
                            "are for that setting. Run `qat-planner calibrate` here for one that fits",
                            highlight=False, soft_wrap=True)
    return model


def _show_each_warning_once() -> None:
    """Print each distinct warning (category and message) once per process.

    ``warnings.simplefilter("once")`` is not enough: every ``catch_warnings`` block in torch or
    transformers resets the registry that "once" relies on, so the same notice would print again.
    """
    seen: set[tuple[type, str]] = set()
    show = warnings.showwarning

    def show_once(message, category, filename, lineno, file=None, line=None):
        key = (category, str(message))
        if key not in seen:
            seen.add(key)
            show(message, category, filename, lineno, file, line)

    warnings.simplefilter("always")
    warnings.showwarning = show_once


def _check_seq_len(model, seq_len: int) -> None:
    from .models import max_positions

    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise ModelSpecError(f"--seq-len {seq_len} is longer than the model's {limit} positions; pass --seq-len {limit} or less")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    """Run the CLI with one error handler: project errors print one line and exit 1, Ctrl-C exits 130."""
    # torch.ao.quantization warns (deprecation notices, observer notes) at every call site, hundreds of
    # times for a large model. On the command line each distinct message is shown once.
    _show_each_warning_once()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # transformers imports torchao when it is installed. On a CPU-only machine torchao then logs that
    # its CUDA kernels did not load, and torch logs a deprecation in torchao's code. Neither concerns planning.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        # Without standalone mode click returns the code of typer.Exit instead of exiting.
        code = app(standalone_mode=False, prog_name="qat-planner")
        if isinstance(code, int) and code:
            sys.exit(code)
    except PlannerError as exc:
        error_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort):
        error_console.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors: bad option values, missing arguments
        if hasattr(exc, "show"):
            exc.show()
        sys.exit(getattr(exc, "exit_code", 2))
    except OSError as exc:  # a file the user named cannot be written or read
        error_console.print(f"[bold red]error:[/] {exc.strerror or exc}: {exc.filename}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except Exception as exc:  # the last resort: keep the traceback, show one line
        with tempfile.NamedTemporaryFile("w", prefix="qat-planner-", suffix=".log", delete=False) as log:
            traceback.print_exc(file=log)
        error_console.print(f"[bold red]unexpected error:[/] {type(exc).__name__}: {exc}. Full traceback: {log.name}",
                            highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
