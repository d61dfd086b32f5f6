"""Check a plan: statically against the traced graph, and dynamically through prepare_qat, training and convert."""

from __future__ import annotations

import copy
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.ao.quantization as tq
from torch import nn
from torch.ao.quantization.quantization_mappings import get_default_qat_module_mappings

from .costs import plan_latency_costs, predict_graph
from .emit import StubWrapper, emit
from .errors import PlannerError
from .graph import OpGraph
from .plan import Plan, _input_shapes, _split_inputs
from .solve import price, solve
from .trace import trace

__all__ = ["Check", "ValidationReport", "validate", "check_plan_static", "check_plan_dynamic",
           "FP32_TOLERANCE", "INT8_RELATIVE_TOLERANCE", "recalibrate"]

# The emitted model before prepare_qat runs the same float ops, except substitutions that match to
# float32 rounding; 1e-5 absolute leaves room for that and nothing more.
FP32_TOLERANCE = 1e-5
# int8 kernels and fake-quant round differently: on a single 64x64 Linear (torch 2.13, x86 engine) 8%
# of the outputs differ by one quantization step. Over 12 GPT-2 blocks with random weights the gap
# grows to 10% of the largest logit, so the limit is 20% of the fake-quant output's largest magnitude.
# A wrong stub or a broken kernel (quantized ConvTranspose2d on x86) misses it by far more.
INT8_RELATIVE_TOLERANCE = 0.2
# How far the latency cost model's prediction may be from a measured int8 forward (see benchmarks/runtime.py).
LATENCY_TOLERANCE = 0.25


@dataclass
class Check:
    """One named check; ``failures`` lists ``(module or node, message)`` for each violation."""

    name: str
    failures: list[tuple[str, str]] = field(default_factory=list)
    detail: str = ""
    status: Literal["passed", "failed", "skipped", "info"] = "passed"

    def fail(self, where: str, message: str) -> None:
        self.failures.append((where, message))
        self.status = "failed"

    @property
    def passed(self) -> bool:
        return self.status != "failed"


@dataclass
class ValidationReport:
    """All checks of one validation run, in the order they ran."""

    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def render(self) -> str:
        lines = []
        for check in self.checks:
            mark = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP", "info": "INFO"}[check.status]
            lines.append(f"{mark}  {check.name}" + (f": {check.detail}" if check.detail else ""))
            for where, message in check.failures[:10]:
                lines.append(f"      {where}: {message}")
            if len(check.failures) > 10:
                lines.append(f"      ... and {len(check.failures) - 10} more")
        passed = sum(c.status == "passed" for c in self.checks)
        failed = sum(c.status == "failed" for c in self.checks)
        skipped = sum(c.status == "skipped" for c in self.checks)
        counted = sum(c.status != "info" for c in self.checks)
        summary = f"{passed} of {counted} checks passed"
        if failed:
            summary += f", {failed} failed"
        if skipped:
            summary += f", {skipped} skipped"
        lines.append(summary)
        return "\n".join(lines)


def validate(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | dict[str, Any] | Any,
    plan: Plan,
    *,
    dynamic: bool = True,
    steps: int = 2,
) -> ValidationReport:
    """Run the static checks and, with ``dynamic=True``, the dynamic ones on ``model`` (real weights).

    The model is not modified. Dynamic checks need real (not meta) tensors in ``model`` and
    ``example_inputs``.

    Raises:
        TraceError: the model cannot be traced.
    """
    args, kwargs = _split_inputs(model, example_inputs, None)
    graph = trace(model, args, kwargs)
    checks = check_plan_static(graph, plan, _input_shapes(args, kwargs))
    if dynamic:
        checks += check_plan_dynamic(model, args, kwargs, plan, steps=steps, graph=graph)
    return ValidationReport(checks)


# ---------------------------------------------------------------- static


def _flip(domain: str) -> str:
    return "fp32" if domain == "int8" else "int8"


def check_plan_static(graph: OpGraph, plan: Plan, input_shapes: dict[str, list[int]] | None = None) -> list[Check]:
    """Check ``plan`` against the traced graph without running the model.

    ``input_shapes`` are the shapes the graph was traced with. A latency plan made for other shapes
    is not held to this trace's optimum, because the fastest placement depends on the sizes.
    """
    coverage = Check("plan covers the traced graph")
    for node in graph.nodes():
        if node.name not in plan.nodes:
            coverage.fail(node.name, "node is in the traced graph but not in the plan; plan this model again")
    if not coverage.passed:
        return [coverage]

    boundaries = {(b.module, b.position): b for b in plan.boundaries}
    domain = {name: plan.nodes[name].domain for name in plan.nodes}

    def out_domain(name: str) -> str:
        return _flip(domain[name]) if (name, "output") in boundaries else domain[name]

    def arriving_domain(name: str) -> str:
        return _flip(domain[name]) if (name, "input") in boundaries else domain[name]

    requirements = Check("every node runs in the domain its rule requires")
    actions = {"quantize": "int8", "float": "fp32", "passthrough": "any"}
    for name, node in plan.nodes.items():
        summary = plan.rule_table.get(node.rule) if node.rule else None
        stated = actions.get(summary.action) if summary else None
        overruled = node.note is not None or node.reason.startswith("fused into")
        if stated is not None and not overruled and stated != node.requirement and not (stated == "int8" and node.requirement == "any"):
            requirements.fail(name, f"records requirement {node.requirement}, but its rule {node.rule} says {summary.action}")
        if node.requirement != "any" and node.domain != node.requirement:
            requirements.fail(name, f"required {node.requirement} by {node.rule or 'default'} but planned {node.domain}")
        if node.kind in ("input", "output", "constant") and node.domain != "fp32":
            requirements.fail(name, f"model {node.kind}s must stay fp32")

    dataflow = Check("every tensor arrives in the domain its consumer runs in")
    for producer, consumer in graph.graph.edges:
        if out_domain(producer) != arriving_domain(consumer):
            dataflow.fail(consumer, f"receives an {out_domain(producer)} tensor from {producer} but expects {arriving_domain(consumer)} "
                                    f"{'before its input stub' if (consumer, 'input') in boundaries else ''}".rstrip())

    stubs = Check("every stub converts to the other domain and sits on a float tensor of a module")
    for boundary in plan.boundaries:
        node = plan.nodes.get(boundary.module)
        if node is None or node.kind != "module":
            stubs.fail(boundary.module, "a stub can only wrap a module")
            continue
        core = node.domain
        to_int8 = boundary.kind == "quantize"
        expected = (core == "int8") if boundary.position == "input" else (core == "fp32")
        if to_int8 != expected:
            stubs.fail(boundary.module, f"{boundary.kind} at the {boundary.position} of an {core} module converts to the domain the tensor is already in")
        graph_node = graph.node(boundary.module) if boundary.module in graph.graph else None
        if graph_node is not None:
            elements = graph_node.input_elements if boundary.position == "input" else graph_node.output_elements
            if elements == 0:
                stubs.fail(boundary.module, f"{boundary.kind} at the {boundary.position}, which carries no float tensor (integer inputs are never stubbed)")

    minimal = _check_minimal(graph, plan, input_shapes)

    fusions = Check("every fusion is a chain of single-consumer modules in one domain")
    for group in plan.fusions:
        for first, second in zip(group.modules, group.modules[1:]):
            if not graph.graph.has_edge(first, second):
                fusions.fail(second, f"does not consume {first}'s output")
            elif len(graph.successors(first)) != 1:
                fusions.fail(first, "its output has more than one consumer")
        domains = {domain[m] for m in group.modules}
        if domains != {"int8"}:
            fusions.fail(group.modules[0], f"fused modules run in {sorted(domains)}, not all int8")
        inner = [b for b in plan.boundaries if b.module in group.modules[:-1] and b.position == "output"
                 or b.module in group.modules[1:] and b.position == "input"]
        for boundary in inner:
            fusions.fail(boundary.module, f"stub inside the fused chain at its {boundary.position}")
    return [coverage, requirements, dataflow, stubs, minimal, fusions]


def _check_minimal(graph: OpGraph, plan: Plan, input_shapes: dict[str, list[int]] | None) -> Check:
    """Re-solve the cut on this trace and compare the plan's cost with the optimum."""
    minimal = Check("no cheaper plan exists (min-cut optimum)")
    needs = {name: plan.nodes[name].requirement for name in plan.nodes}
    costs = None
    if plan.objective == "latency":
        if plan.cost_model is None:
            minimal.status = "skipped"
            minimal.detail = "a latency plan without its cost model (written by an older version) cannot be re-solved"
            return minimal
        costs = plan_latency_costs(graph, plan, plan.cost_model)
    optimum = solve(graph, needs, objective=plan.objective, costs=costs)
    # Price the plan with this trace's element counts, which may differ from the planning input's.
    domains = {name: plan.nodes[name].domain for name in plan.nodes if name in graph.graph}
    cost = price(graph, domains, plan.boundaries, needs, plan.objective, costs)

    minimal.detail = f"plan cost {cost}, optimum {optimum.cost} ({plan.objective})"
    if cost < optimum.cost:
        # Cheaper than the optimum is only possible for a plan that breaks a requirement.
        minimal.status = "skipped"
        minimal.detail += "; the plan is cheaper than any valid plan, so it misses a conversion (see the failed checks)"
    elif cost > optimum.cost and plan.objective == "latency" and input_shapes != plan.example_inputs:
        minimal.status = "skipped"
        minimal.detail += (f"; the plan was made for inputs {plan.example_inputs}, and the fastest placement for "
                           f"{input_shapes} differs; plan again at these sizes to compare")
    elif cost > optimum.cost:
        extra = sorted({(c.module, c.position) for c in optimum.conversions} ^ {(b.module, b.position) for b in plan.boundaries})
        for module, position in extra[:10]:
            minimal.fail(module, f"stub at the {position} differs from the cheapest plan")
    return minimal


# ---------------------------------------------------------------- dynamic


def _first_float(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                return item
    raise PlannerError(f"model output {type(output).__name__} has no float tensor to compare")


def _run(model: nn.Module, args, kwargs) -> torch.Tensor:
    return _first_float(model(*args, **kwargs)).float()


def check_plan_dynamic(model: nn.Module, args, kwargs, plan: Plan, *, steps: int = 2,
                       graph: OpGraph | None = None) -> list[Check]:
    """Emit, compare fp32 outputs, prepare_qat, train ``steps`` SGD steps, convert, and compare int8 to fake-quant.

    A latency plan also gets its int8 forward timed against the prediction. The prediction is
    priced on ``graph``, the model traced on these inputs, which is traced here when not given.
    """
    emission = Check("emit")
    try:
        emitted = emit(model, plan)
    except PlannerError as exc:
        emission.fail("<model>", str(exc))
        return [emission]

    fp32 = Check("fp32 output unchanged by emit (before prepare_qat)")
    reference = copy.deepcopy(model).eval()
    emitted.eval()
    try:
        with torch.no_grad():
            difference = (_run(reference, args, kwargs) - _run(emitted, args, kwargs)).abs().max().item()
    except Exception as exc:  # an emitted model that cannot run is a failed check, not a crash
        fp32.fail(type(exc).__name__, (str(exc).strip().splitlines() or [""])[0][:300])
        return [emission, fp32]
    fp32.detail = f"max abs difference {difference:.3g} (limit {FP32_TOLERANCE})"
    if not difference <= FP32_TOLERANCE:
        fp32.fail("<output>", f"differs by {difference:.3g}")

    pipeline = Check("prepare_qat → train → eval → convert → int8 forward")
    try:
        emitted.train()
        tq.prepare_qat(emitted, inplace=True)
        _train(emitted, args, kwargs, steps)
        emitted.eval()
        recalibrate(emitted, lambda: _run(emitted, args, kwargs))
        with torch.no_grad():
            fake_quant = _run(emitted, args, kwargs)
        converted = tq.convert(copy.deepcopy(emitted), inplace=False)
        with torch.no_grad():
            int8 = _run(converted, args, kwargs)
    except Exception as exc:  # any failure here is what the validator exists to report
        pipeline.fail(type(exc).__name__, (str(exc).strip().splitlines() or [""])[0][:300])
        return [emission, fp32, pipeline]

    closeness = Check("int8 output close to fake-quant output")
    scale = fake_quant.abs().max().item()
    gap = (int8 - fake_quant).abs().max().item()
    closeness.detail = f"max abs difference {gap:.3g}, fake-quant range {scale:.3g} (limit {INT8_RELATIVE_TOLERANCE:.0%} of range)"
    if not gap <= INT8_RELATIVE_TOLERANCE * max(scale, 1e-6):
        closeness.fail("<output>", f"int8 differs from fake-quant by {gap:.3g}")

    swapped = Check("every int8 module is quantized after convert, with weight fake-quant during training")
    without_qat: list[str] = []
    for name in plan.int8_modules:
        before = _planned_module(emitted, name)
        after = _planned_module(converted, name)
        if before is None or after is None:
            continue  # a fused member, now Identity
        if any(True for _ in after.parameters(recurse=False)) and not type(after).__module__.startswith("torch.ao.nn.quantized"):
            swapped.fail(name, f"is {type(after).__name__} after convert, not a quantized module")
        if hasattr(_unwrap(model.get_submodule(name)), "weight") and not hasattr(before, "weight_fake_quant"):
            if type(before) in get_default_qat_module_mappings():
                swapped.fail(name, f"{type(before).__name__} has no weight_fake_quant after prepare_qat")
            else:
                without_qat.append(f"{name} ({type(before).__name__})")
    if without_qat:
        # torch.ao has no QAT module for these types (Conv1d, ConvTranspose, norms, embeddings in torch
        # 2.13), so their weights see no fake-quant in training and are quantized only at convert.
        swapped.detail = f"no QAT module in torch.ao, weights quantized only at convert: {', '.join(without_qat)}"
    checks = [emission, fp32, pipeline, closeness, swapped]
    if plan.cost_model is not None:
        checks.append(_check_latency(model, converted, args, kwargs, plan, graph or trace(model, args, kwargs)))
    return checks


def _check_latency(model: nn.Module, converted: nn.Module, args, kwargs, plan: Plan, graph: OpGraph) -> Check:
    """Time the int8 forward at the cost model's thread count and compare it with the prediction.

    The check has status "info" and does not fail validation, because a busy machine slows the
    measurement, not the plan.
    """
    check = Check(f"int8 forward time against the cost model (within {LATENCY_TOLERANCE:.0%} expected)")
    check.status = "info"
    predicted = predict_graph(graph, plan, plan.cost_model, model).total_ms
    threads = torch.get_num_threads()
    torch.set_num_threads(plan.cost_model.threads)
    try:
        with torch.no_grad():
            for _ in range(2):
                _run(converted, args, kwargs)
            times, faults = [], []
            for _ in range(5):
                faulted = _page_faults()
                started = time.perf_counter()
                _run(converted, args, kwargs)
                times.append((time.perf_counter() - started) * 1000)
                faults.append(_page_faults() - faulted)
    finally:
        torch.set_num_threads(threads)
    measured = statistics.median(times)
    error = predicted / measured - 1
    shapes = ", ".join(f"{name} {tuple(shape)}" for name, shape in _input_shapes(args, kwargs).items())
    check.detail = (f"predicted {predicted:.2f} ms, measured {measured:.2f} ms on {shapes} (median of 5, "
                    f"{plan.cost_model.threads} threads), prediction {error:+.0%}")
    if abs(error) > LATENCY_TOLERANCE:
        check.detail += ("; outside the expected range: recalibrate on an idle machine (`qat-planner calibrate`), "
                         "and note that small models spend most of their time in Python code the cost model does not price")
    fresh_mb = statistics.median(faults) * _PAGE_BYTES / 2**20
    if fresh_mb >= 1:
        # glibc hands buffers over 128 KiB to the OS when they are freed, then maps them again.
        check.detail += (f"; each forward page-faults on about {fresh_mb:.0f} MB of new memory, time the cost model "
                         "does not price: a caching allocator (jemalloc or tcmalloc through LD_PRELOAD) or "
                         "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 keeps freed buffers")
    return check


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _page_faults() -> int:
    """Minor page faults of this process so far; 0 where the platform does not count them."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def recalibrate(model: nn.Module, forward) -> None:
    """Reset every observer, observe one eval-mode ``forward()`` as a running min/max, then freeze them.

    A few training steps leave the moving-average observers behind the weights, and x86's
    reduce_range makes fake-quant clip activations at 128 levels where the converted int8 kernels use
    256. Observing the eval-mode ranges once before freezing keeps both forwards inside the observed
    range, so the comparison measures the conversion rather than observer lag. Each observer keeps
    the union of the ranges it observes, because a module called twice observes two tensors.
    """
    handles = []
    constants: list[tuple[nn.Module, float]] = []
    for module in model.modules():
        if not isinstance(module, tq.FakeQuantizeBase):
            continue
        observer = getattr(module, "activation_post_process", None)
        if observer is None or not hasattr(observer, "reset_min_max_vals"):
            continue
        observer.reset_min_max_vals()
        if hasattr(observer, "averaging_constant"):
            # With a constant of 1 the observer stores each call's own range; the hooks keep the union.
            # The hooks sit on the fake-quant module because the fused x86 fake-quant updates the
            # observer's buffers without calling the observer module.
            constants.append((observer, observer.averaging_constant))
            observer.averaging_constant = 1.0
            handles.append(module.register_forward_pre_hook(_remember_range))
            handles.append(module.register_forward_hook(_widen_range))
    model.apply(tq.enable_observer)
    try:
        with torch.no_grad():
            forward()
    finally:
        model.apply(tq.disable_observer)
        for handle in handles:
            handle.remove()
        for observer, constant in constants:
            observer.averaging_constant = constant


def _remember_range(fake_quant: nn.Module, _args) -> None:
    observer = fake_quant.activation_post_process
    fake_quant._range_before = (observer.min_val.clone(), observer.max_val.clone())


def _widen_range(fake_quant: nn.Module, _args, _output) -> None:
    observer = fake_quant.activation_post_process
    low, high = fake_quant.__dict__.pop("_range_before")
    if low.numel() and low.shape == observer.min_val.shape and torch.isfinite(low).all():
        observer.min_val.copy_(torch.minimum(low, observer.min_val))
        observer.max_val.copy_(torch.maximum(high, observer.max_val))
        scale, zero_point = fake_quant.calculate_qparams()
        fake_quant.scale.copy_(scale)
        fake_quant.zero_point.copy_(zero_point)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, StubWrapper) else module


def _planned_module(root: nn.Module, name: str) -> nn.Module | None:
    module = _unwrap(root.get_submodule(name))
    if isinstance(module, nn.Identity):
        return None
    return module


def _train(model: nn.Module, args, kwargs, steps: int) -> None:
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=1e-3) if parameters else None
    for _ in range(steps):
        loss = _run(model, args, kwargs).pow(2).mean()
        if optimizer is None:
            return
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
