"""A latency cost model of the running backend, measured once and used as the capacities of the cut.

Every node of the operator graph belongs to an op class (``linear``, ``gelu``, ``add``, ...) and has a
size in that class's unit: multiply-accumulates for ``linear``, ``conv``, ``matmul`` and ``attention``,
output elements for the rest. Calibration times each class in fp32 and, where eager mode has an int8
kernel, in int8, at a few sizes, and fits ``time = fixed + per_unit * units``. Quantize and dequantize
are timed the way an emitted model runs them: a stub inside a `StubWrapper`. The fitted model is
cached per torch version, quantized engine, thread count and CPU, because it is valid for nothing else.

The cut then minimises predicted latency: a node that may run in either domain pays its int8 or fp32
time, and a conversion pays its quantize or dequantize time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from .errors import PlanError, PlannerWarning
from .graph import Node, OpGraph

logger = logging.getLogger(__name__)

__all__ = ["OpCost", "CostModel", "LatencyCosts", "calibrate", "load_cost_model", "default_cost_model_path",
           "latency_costs", "plan_latency_costs", "op_class", "LatencyEstimate", "estimate", "predict"]

# Op classes whose unit is multiply-accumulates; every other class counts output elements.
MAC_CLASSES = ("linear", "conv", "matmul", "attention")
# Ops that only reinterpret or select from a tensor: their cost is one call, whatever the size.
_VIEW_OPS = {"view", "reshape", "transpose", "permute", "split", "chunk", "getitem", "alias", "expand", "slice",
             "select", "squeeze", "unsqueeze", "flatten", "unflatten", "detach", "dropout", "t", "narrow", "unbind"}
_COPY_OPS = {"contiguous", "to", "clone", "cat", "stack", "copy", "pad", "repeat", "masked_fill", "where", "tril", "triu"}
_ARITHMETIC_OPS = {"add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "mean", "sum", "exp", "tanh"}
_MODULE_CLASSES = (  # (substring of a class name in the module's MRO, op class); the first match wins
    ("Conv1D", "linear"), ("Linear", "linear"), ("Conv", "conv"), ("Embedding", "embedding"), ("Norm", "norm"),
    ("Softmax", "softmax"), ("GELU", "gelu"), ("Gelu", "gelu"), ("ReLU", "relu"), ("Dropout", "view"),
    ("Identity", "view"),
)
_OP_CLASSES = {"linear": "linear", "matmul": "matmul", "scaled_dot_product_attention": "attention",
               "softmax": "softmax", "layer_norm": "norm", "embedding": "embedding", "gelu": "gelu", "relu": "relu"}


class OpCost(BaseModel):
    """Fitted time of one op class in one domain: ``fixed_us`` per call plus ``ns_per_unit`` per unit."""

    model_config = ConfigDict(extra="forbid")

    fixed_us: float
    ns_per_unit: float

    def ns(self, units: float) -> float:
        return self.fixed_us * 1000.0 + self.ns_per_unit * units


class CostModel(BaseModel):
    """Calibrated costs of one backend; ``fp32`` and ``int8`` map op classes to their `OpCost`.

    A class missing from ``int8`` has no eager int8 kernel. A node of that class is priced at its fp32
    cost in either domain, so the cost model never pushes such a node into int8.
    """

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    torch: str
    engine: str
    cpu: str
    threads: int
    calibrated_at: str
    quantize: OpCost
    dequantize: OpCost
    fp32: dict[str, OpCost]
    int8: dict[str, OpCost]

    def describe(self) -> str:
        return f"torch {self.torch}, engine {self.engine}, {self.threads} threads, {self.cpu}"

    def node_ns(self, op: str, units: int, domain: str) -> float:
        table = self.int8 if domain == "int8" and op in self.int8 else self.fp32
        cost = table.get(op) or self.fp32["elementwise"]
        return cost.ns(units)

    def conversion_ns(self, kind: str, elements: int) -> float:
        return (self.quantize if kind == "quantize" else self.dequantize).ns(elements)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        temporary.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        """Read a cost model written by `save`.

        Raises:
            PlanError: the file cannot be read or is not a version-1 cost model.
        """
        try:
            return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise PlanError(f"{path}: cannot read cost model: {exc.strerror}; write one with "
                            f"`qat-planner calibrate --out {path}`") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            problem = f"{where}: {first['msg']}" if where else first["msg"]
            raise PlanError(f"{path}: not a qat-planner cost model ({problem}); write one with "
                            f"`qat-planner calibrate --out {path}`") from None


# ---------------------------------------------------------------- where the cost model lives


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _engine() -> str:
    return torch.backends.quantized.engine


def cache_dir() -> Path:
    """``$QAT_PLANNER_CACHE``, else ``$XDG_CACHE_HOME/qat-planner``, else ``~/.cache/qat-planner``."""
    if os.environ.get("QAT_PLANNER_CACHE"):
        return Path(os.environ["QAT_PLANNER_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qat-planner"


def default_cost_model_path(threads: int | None = None) -> Path:
    """The cache file of the cost model for this torch version, engine, CPU and thread count."""
    threads = threads or torch.get_num_threads()
    cpu = hashlib.sha256(f"{_cpu_name()}|{os.cpu_count()}".encode()).hexdigest()[:10]
    version = torch.__version__.replace("+", "-")
    return cache_dir() / f"costs-torch{version}-{_engine()}-{threads}t-{cpu}.json"


def load_cost_model(path: str | Path | None = None, *, calibrate_if_missing: bool = True) -> CostModel:
    """Return the cost model at ``path``, or the cached one for this machine, calibrating it if missing.

    Raises:
        PlanError: ``path`` names a file that cannot be read, or there is no cached model and
            ``calibrate_if_missing`` is false.
    """
    if path is not None:
        return CostModel.load(path)
    cached = default_cost_model_path()
    if cached.exists():
        return CostModel.load(cached)
    if not calibrate_if_missing:
        raise PlanError(f"no cost model for this machine at {cached}; run `qat-planner calibrate` first")
    logger.info("no cost model at %s; calibrating (a few seconds, once per torch version, engine, CPU and thread count)", cached)
    model = calibrate()
    model.save(cached)
    return model


# ---------------------------------------------------------------- calibration


def _seconds_per_call(function: Callable[[], object], budget: float) -> float:
    """Time of one call: the median of 5 batches of calls that together take about ``budget`` seconds.

    The median, as benchmarks report forward times; on a busy machine it measures the other
    processes too, so calibrate on an idle one.
    """
    with torch.no_grad():
        function()
        once = []
        for _ in range(3):
            started = time.perf_counter()
            function()
            once.append(time.perf_counter() - started)
        per_batch = max(1, int(budget / 5 / max(min(once), 1e-7)))
        samples = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(per_batch):
                function()
            samples.append((time.perf_counter() - started) / per_batch)
    return statistics.median(samples)


def _fit(points: list[tuple[float, float]]) -> OpCost:
    """Least-squares ``seconds = fixed + per_unit * units`` with both coefficients kept non-negative."""
    n = len(points)
    mean_u = sum(u for u, _ in points) / n
    mean_t = sum(t for _, t in points) / n
    spread = sum((u - mean_u) ** 2 for u, _ in points)
    slope = sum((u - mean_u) * (t - mean_t) for u, t in points) / spread if spread else 0.0
    fixed = mean_t - slope * mean_u
    if slope < 0:
        slope, fixed = 0.0, mean_t
    elif fixed < 0:
        slope, fixed = sum(u * t for u, t in points) / sum(u * u for u, _ in points), 0.0
    return OpCost(fixed_us=fixed * 1e6, ns_per_unit=slope * 1e9)


def _quantized(x: torch.Tensor) -> torch.Tensor:
    scale = float(x.abs().max()) / 127 or 1.0
    return torch.quantize_per_tensor(x, scale, 128, torch.quint8)


def _gelu_formula(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))


def _cases(quick: bool) -> dict[tuple[str, str], list[tuple[int, Callable[[], object]]]]:
    """Return the calls to time for each (class, domain), as (units of the call, the call) pairs."""
    import torch.ao.nn.quantized as nnq
    import torch.nn.functional as F

    from .emit import StubWrapper

    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    rows = (32, 128) if quick else (32, 128, 512)
    width = 768
    cases: dict[tuple[str, str], list] = {}

    def add(op: str, domain: str, units: int, call: Callable[[], object]) -> None:
        cases.setdefault((op, domain), []).append((units, call))

    # Square, widening and narrowing projections, and a vocabulary-sized head whose output does not
    # fit in cache: per-MAC time differs between them, and the fit must cover all.
    linear_shapes = [(m, width, n) for m in rows for n in (width, 4 * width)] + [(128, 4 * width, width)]
    if not quick:
        linear_shapes.append((128, width, 16384))
    for m, k, n in linear_shapes:
        x = randn(m, k)
        fp32 = nn.Linear(k, n).eval()
        int8 = nnq.Linear(k, n)
        weight = fp32.weight.detach()
        scales = weight.abs().amax(dim=1).clamp(min=1e-6) / 127
        int8.set_weight_bias(torch.quantize_per_channel(weight, scales, torch.zeros(n, dtype=torch.long), 0, torch.qint8),
                             fp32.bias.detach())
        int8.scale, int8.zero_point = 0.05, 128
        add("linear", "fp32", m * k * n, lambda f=fp32, x=x: f(x))
        add("linear", "int8", m * k * n, lambda f=int8, q=_quantized(x): f(q))
    for size in (14, 28):
        x = randn(1, 64, size, size)
        fp32 = nn.Conv2d(64, 64, 3, padding=1).eval()
        int8 = nnq.Conv2d(64, 64, 3, padding=1)
        macs = size * size * 64 * 64 * 9
        add("conv", "fp32", macs, lambda f=fp32, x=x: f(x))
        add("conv", "int8", macs, lambda f=int8, q=_quantized(x): f(q))
    for m in rows:
        q, k, v = randn(1, 12, m, 64), randn(1, 12, m, 64), randn(1, 12, m, 64)
        add("attention", "fp32", 12 * m * m * 64, lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        a, b = randn(12, m, 64), randn(12, 64, m)
        add("matmul", "fp32", 12 * m * m * 64, lambda a=a, b=b: torch.matmul(a, b))
        scores = randn(12, m, m)
        add("softmax", "fp32", scores.numel(), lambda s=scores: torch.softmax(s, -1))
    embedding = nn.Embedding(8192, width)
    norm = nn.LayerNorm(width)
    gelu = nn.GELU(approximate="tanh")
    relu = nn.ReLU()
    for m in rows:
        ids = torch.randint(0, 8192, (1, m), generator=generator)
        add("embedding", "fp32", m * width, lambda ids=ids: embedding(ids))
        x = randn(1, m, width)
        add("norm", "fp32", x.numel(), lambda x=x: norm(x))
        wide = randn(1, m, 4 * width)
        for op, module in (("gelu", gelu), ("relu", relu)):
            add(op, "fp32", wide.numel(), lambda f=module, x=wide: f(x))
            add(op, "int8", wide.numel(), lambda f=module, q=_quantized(wide): f(q))
        add("gelu_formula", "fp32", wide.numel(), lambda x=wide: _gelu_formula(x))
        y = randn(1, m, width)
        add("add", "fp32", x.numel(), lambda x=x, y=y: x + y)
        add("elementwise", "fp32", x.numel(), lambda x=x: torch.tanh(x))
        for domain, t in (("fp32", x), ("int8", _quantized(x))):
            add("copy", domain, t.numel(), lambda t=t: t.transpose(-1, -2).contiguous())
            add("view", domain, t.numel(), lambda t=t: t.view(-1))
    # Conversions of large tensors (a vocabulary-sized output) run from memory, not cache.
    for elements in [m * 4 * width for m in rows] + ([128 * 32768] if not quick else []):
        wide = randn(elements)
        quantize = StubWrapper(nn.Identity(), "quantize")
        setattr(quantize, quantize.input_name, nnq.Quantize(0.05, 128, torch.quint8))
        dequantize = StubWrapper(nn.Identity(), None, "dequantize")
        setattr(dequantize, dequantize.output_name, nnq.DeQuantize())
        add("quantize", "-", wide.numel(), lambda f=quantize, x=wide: f(x))
        add("dequantize", "-", wide.numel(), lambda f=dequantize, q=_quantized(wide): f(q))
    return cases


def calibrate(threads: int | None = None, *, quick: bool = False, budget: float = 0.08) -> CostModel:
    """Time every op class on this machine and return the fitted `CostModel` (about 10 s; 3 s with ``quick``).

    ``threads`` sets torch's thread count for the measurement (and is restored after); the model is
    valid for that thread count only. ``budget`` is the seconds spent timing one call size.
    """
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        # Other processes share the cores, so every timing includes their work.
        warnings.warn(f"the machine is busy (load average {load:.1f}); the cost model measures that load too. "
                      "Calibrate on an idle machine for a usable model", PlannerWarning, stacklevel=2)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        fp32: dict[str, OpCost] = {}
        int8: dict[str, OpCost] = {}
        conversions: dict[str, OpCost] = {}
        for (op, domain), calls in _cases(quick).items():
            fitted = _fit([(units, _seconds_per_call(call, budget)) for units, call in calls])
            {"fp32": fp32, "int8": int8, "-": conversions}[domain][op] = fitted
        return CostModel(
            torch=torch.__version__, engine=_engine(), cpu=_cpu_name(), threads=torch.get_num_threads(),
            calibrated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            quantize=conversions["quantize"], dequantize=conversions["dequantize"], fp32=fp32, int8=int8,
        )
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------- pricing a graph


def op_class(node: Node, graph: OpGraph, model: nn.Module | None = None, effective_type: str | None = None) -> tuple[str, int]:
    """Return the op class of ``node`` and its size in that class's unit (see the module docstring).

    ``effective_type`` is the qualified type a substitution will put in the module's place.
    ``model`` gives weight shapes for convolutions; without it a convolution counts as 9 MACs per
    output element per input channel.
    """
    if node.kind in ("input", "output", "constant"):
        return "view", 0
    outputs = node.output_elements
    if node.kind == "module":
        qualified = effective_type or node.module_type or ""
        names = [effective_type.rsplit(".", 1)[-1]] if effective_type else []
        names += [t.rsplit(".", 1)[-1] for t in (node.type_mro or [node.module_type or ""])]
        op = next((cls for name in names for key, cls in _MODULE_CLASSES if key in name), "elementwise")
        if op == "gelu" and not qualified.startswith("torch.nn"):
            # Model libraries write GELU as its formula in separate tensor ops, several times slower.
            op = "gelu_formula"
        if op == "linear":
            width = node.output_shape[-1] if node.output_shape else 1
            return op, node.input_elements * max(width, 1) * node.calls
        if op == "conv":
            return op, outputs * _conv_fan_in(node, model) * node.calls
        return op, outputs * node.calls
    name = node.op or ""
    if name in _OP_CLASSES:
        op = _OP_CLASSES[name]
        if op == "linear":
            width = node.output_shape[-1] if node.output_shape else 1
            return op, _largest_input(graph, node) * max(width, 1)
        if op in ("matmul", "attention"):
            return op, outputs * _contracted(graph, node, op)
        return op, outputs
    if name in _VIEW_OPS:
        return "view", outputs
    if name in _COPY_OPS:
        return "copy", outputs
    return ("add" if name in _ARITHMETIC_OPS else "elementwise"), outputs


def _inputs(graph: OpGraph, node: Node):
    for producer in graph.graph.predecessors(node.name):
        yield from graph.graph.edges[producer, node.name].get("tensors", [])


def _largest_input(graph: OpGraph, node: Node) -> int:
    return max((info.elements for info in _inputs(graph, node)), default=node.input_elements)


def _contracted(graph: OpGraph, node: Node, op: str) -> int:
    """Length of the summed dimension: keys for attention, K of ``(.., M, K) @ (.., K, N)`` for matmul."""
    shapes = [info.shape for info in _inputs(graph, node) if len(info.shape) >= 2]
    if op == "attention":
        return max((s[-2] for s in shapes), default=1)
    out = node.output_shape
    if len(shapes) >= 2 and out and len(out) >= 2:
        a, b = shapes[0], shapes[1]
        for left, right in ((a, b), (b, a)):
            if left[-1] == right[-2] and left[-2] == out[-2] and right[-1] == out[-1]:
                return left[-1]
    return max((s[-1] for s in shapes), default=1)


def _conv_fan_in(node: Node, model: nn.Module | None) -> int:
    if model is not None:
        try:
            weight = model.get_submodule(node.fqn).weight
            return int(weight[0].numel())
        except AttributeError:
            pass
    channels = node.input_elements // max(node.output_elements // max(node.output_shape[1], 1), 1) if node.output_shape else 1
    return max(channels, 1) * 9


@dataclass(frozen=True)
class LatencyCosts:
    """Integer nanosecond capacities of one graph: each node's (fp32, int8) time and the conversion prices."""

    nodes: dict[str, tuple[int, int]]
    classes: dict[str, str]
    model: CostModel

    def conversion(self, kind: str, elements: int) -> int:
        return max(int(round(self.model.conversion_ns(kind, elements))), 1)


def latency_costs(graph: OpGraph, cost_model: CostModel, model: nn.Module | None = None,
                  effective_types: dict[str, str] | None = None, fused: set[str] | frozenset = frozenset()) -> LatencyCosts:
    """Price every node of ``graph`` in both domains with ``cost_model``.

    ``fused`` names modules that a fusion folds into the module before them (the ReLU of
    Linear+ReLU): in int8 they become an Identity, so they cost one call.
    """
    nodes, classes = {}, {}
    for node in graph.nodes():
        op, units = op_class(node, graph, model, (effective_types or {}).get(node.name))
        classes[node.name] = op
        int8 = cost_model.node_ns("view", 0, "int8") if node.name in fused else cost_model.node_ns(op, units, "int8")
        nodes[node.name] = (int(round(cost_model.node_ns(op, units, "fp32"))), int(round(int8)))
    return LatencyCosts(nodes=nodes, classes=classes, model=cost_model)


def plan_latency_costs(graph: OpGraph, plan, cost_model: CostModel, model: nn.Module | None = None) -> LatencyCosts:
    """Price ``graph`` as ``plan`` emits it: with the plan's substitutions and fusions applied."""
    effective = {record.module: record.target for record in plan.substitutions}
    fused = {name for group in plan.fusions for name in group.modules[1:]}
    return latency_costs(graph, cost_model, model, effective, fused)


class LatencyEstimate(BaseModel):
    """Predicted time of one int8 forward: the total and its split by op class and domain, in ms."""

    model_config = ConfigDict(extra="forbid")

    total_ms: float
    by_class: dict[str, float]
    cost_model: str


def estimate(graph: OpGraph, domains: dict[str, str], conversions, costs: LatencyCosts) -> LatencyEstimate:
    """Predict the forward time of ``graph`` with ``domains`` and ``conversions`` (records with
    ``kind``, ``module`` and ``position``), every node priced in its domain."""
    parts: dict[str, float] = {}
    for name, domain in domains.items():
        if name not in costs.nodes or graph.node(name).kind in ("input", "output", "constant"):
            continue
        key = f"{costs.classes[name]} {domain}"
        parts[key] = parts.get(key, 0.0) + costs.nodes[name][domain == "int8"]
    for conversion in conversions:
        if conversion.module not in graph.graph:
            continue
        node = graph.node(conversion.module)
        elements = node.input_elements if conversion.position == "input" else node.output_elements
        parts[conversion.kind] = parts.get(conversion.kind, 0.0) + costs.conversion(conversion.kind, elements) * node.calls
    by_class = {key: round(ns / 1e6, 4) for key, ns in sorted(parts.items(), key=lambda item: -item[1])}
    return LatencyEstimate(total_ms=round(sum(parts.values()) / 1e6, 4), by_class=by_class, cost_model=costs.model.describe())


def predict(model: nn.Module, example_inputs, plan, cost_model: CostModel | None = None, *,
            example_kwargs: dict | None = None) -> LatencyEstimate:
    """Predict the int8 forward time of ``model`` emitted with ``plan``, on ``example_inputs``.

    The model is traced again on these inputs (meta tensors are enough), so one plan can be priced at
    other sequence lengths than it was planned at. ``cost_model`` defaults to the plan's own, then to
    this machine's cached one.
    """
    from .plan import _split_inputs
    from .trace import trace

    cost_model = cost_model or plan.cost_model or load_cost_model()
    args, kwargs = _split_inputs(model, example_inputs, example_kwargs)
    graph = trace(model, args, kwargs)
    missing = [n.name for n in graph.nodes() if n.name not in plan.nodes]
    if missing:
        raise PlanError(f"the plan does not cover {len(missing)} node(s) of this trace ({', '.join(missing[:3])}); "
                        "plan the model again on these inputs")
    costs = plan_latency_costs(graph, plan, cost_model, model)
    domains = {n.name: plan.nodes[n.name].domain for n in graph.nodes()}
    return estimate(graph, domains, plan.boundaries, costs)
