"""A latency cost model of the running backend, measured once and used as the capacities of the cut.

Every node of the operator graph belongs to an op class (``linear``, ``gelu``, ``add``, ...) and has a
size in that class's unit: multiply-accumulates for ``linear``, ``conv``, ``matmul`` and ``attention``,
output elements for the rest. Calibration times each class in fp32 and, where eager mode has an int8
kernel, in int8, at a few sizes, and fits ``time = fixed + per_unit * units + per_weight * weights``.
The weight term matters for linears at short sequences: a model's weights do not fit in cache, so
every projection streams its weight from memory, and at a few tokens that takes longer than the
arithmetic. Linears are therefore timed the way a model runs them, in turn over more distinct
modules than the last-level cache holds. The fit minimises relative error, so small calls are priced
as well as large ones. Quantize and dequantize are timed the way an emitted model runs them: a stub
inside a `StubWrapper`. Last, a forward of small reference transformer blocks is timed against the
sum of its ops' fitted times; the difference per op (``overhead_us``: the Python between ops, which
a loop of one op does not run) is charged to every op and conversion. The fitted
model is cached per torch version, quantized engine, thread count and CPU, because it is valid for
nothing else.

The cut then minimises predicted latency: a node that may run in either domain pays its int8 or fp32
time, and a conversion pays its quantize or dequantize time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from .errors import PlanError, PlannerWarning
from .graph import Node, OpGraph

logger = logging.getLogger(__name__)

__all__ = ["OpCost", "CostModel", "LatencyCosts", "calibrate", "load_cost_model", "default_cost_model_path",
           "latency_costs", "plan_latency_costs", "op_class", "weight_elements", "LatencyEstimate", "estimate", "predict",
           "predict_graph"]

# Format of the saved cost model; version 2 added the per-weight-element term.
COST_MODEL_VERSION = 2
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
    """Fitted time of one op class in one domain: ``fixed_us`` per call, ``ns_per_unit`` per unit and
    ``ns_per_weight`` per weight element read."""

    model_config = ConfigDict(extra="forbid")

    fixed_us: float = Field(ge=0)
    ns_per_unit: float = Field(ge=0)
    ns_per_weight: float = Field(default=0.0, ge=0)

    def ns(self, units: float, weights: float = 0) -> float:
        return self.fixed_us * 1000.0 + self.ns_per_unit * units + self.ns_per_weight * weights


class CostModel(BaseModel):
    """Calibrated costs of one backend; ``fp32`` and ``int8`` map op classes to their `OpCost`.

    A class missing from ``int8`` has no eager int8 kernel. A node of that class is priced at its fp32
    cost in either domain, so the cost model never pushes such a node into int8.
    """

    model_config = ConfigDict(extra="forbid")

    version: Literal[2] = COST_MODEL_VERSION
    torch: str
    engine: str
    cpu: str
    threads: int
    calibrated_at: str
    quantize: OpCost
    dequantize: OpCost
    fp32: dict[str, OpCost]
    int8: dict[str, OpCost]
    # What each op and conversion takes in a model's forward beyond its time in a loop of its own:
    # the Python between ops.
    overhead_us: float = Field(default=0.0, ge=0)

    def describe(self) -> str:
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        return f"torch {self.torch}, engine {self.engine}, {threads}, {self.cpu}"

    def mismatches(self) -> list[str]:
        """Return how this process differs from the setting the model was measured in (torch, engine, threads)."""
        found = []
        if self.torch != torch.__version__:
            found.append(f"torch {self.torch}, not {torch.__version__}")
        if self.engine != _engine():
            found.append(f"engine {self.engine}, not {_engine()}")
        if self.threads != torch.get_num_threads():
            found.append(f"{self.threads} threads, not {torch.get_num_threads()}")
        return found

    def node_ns(self, op: str, units: int, domain: str, weights: int = 0) -> float:
        table = self.int8 if domain == "int8" and op in self.int8 else self.fp32
        cost = table.get(op) or self.fp32["elementwise"]
        return cost.ns(units, weights) + self.overhead_us * 1000.0

    def conversion_ns(self, kind: str, elements: int) -> float:
        return (self.quantize if kind == "quantize" else self.dequantize).ns(elements) + self.overhead_us * 1000.0

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
            PlanError: the file cannot be read or is not a cost model of this format version.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise PlanError(f"{path}: cannot read cost model: {exc.strerror}; write one with "
                            f"`qat-planner calibrate --out {path}`") from None
        version = re.search(r'"version"\s*:\s*(\d+)', text)
        if version and int(version.group(1)) != COST_MODEL_VERSION:
            raise PlanError(f"{path}: cost model format {version.group(1)} is from another qat-planner version "
                            f"(this one reads format {COST_MODEL_VERSION}); calibrate again with "
                            f"`qat-planner calibrate --out {path}`")
        try:
            return cls.model_validate_json(text)
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
    return cache_dir() / f"costs-v{COST_MODEL_VERSION}-torch{version}-{_engine()}-{threads}t-{cpu}.json"


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
    busy = _load_average() > BUSY_LOAD
    model = calibrate()
    if busy:
        # Timings taken while other processes ran would be reused by every later plan.
        warnings.warn(f"the machine was busy while calibrating, so the cost model is used for this plan only and not "
                      f"cached; run `qat-planner calibrate` on an idle machine to cache one at {cached}",
                      PlannerWarning, stacklevel=2)
    else:
        model.save(cached)
    return model


# ---------------------------------------------------------------- calibration

# One-minute load average above which calibration warns that other processes skew its timings.
BUSY_LOAD = 0.5


def _load_average() -> float:
    """Return the one-minute load average, or 0 where the platform does not report it."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


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


def _fit(points: list[tuple[float, float, float]]) -> OpCost:
    """Fit ``seconds = fixed + per_unit * units + per_weight * weights`` to (units, weights, seconds).

    The fit minimises the squared relative error, so that a call of a few microseconds is priced as
    closely as one of many milliseconds. It keeps every coefficient non-negative: of the fits on each
    subset of the terms, the best one with no negative coefficient wins. A term that does not vary
    between the points cannot be separated from the fixed cost and is left out.
    """
    terms = ["fixed"] + [name for name, index in (("units", 0), ("weights", 1)) if len({p[index] for p in points}) > 1]
    values = {"fixed": lambda u, w: 1.0, "units": lambda u, w: u, "weights": lambda u, w: w}
    design = torch.tensor([[values[term](u, w) / t for term in terms] for u, w, t in points], dtype=torch.float64)
    ones = torch.ones(len(points), 1, dtype=torch.float64)
    best_error, best = float("inf"), {}
    for mask in range(1, 2 ** len(terms)):
        chosen = [i for i in range(len(terms)) if mask >> i & 1]
        solution = torch.linalg.lstsq(design[:, chosen], ones).solution.flatten()
        if (solution < 0).any():
            continue
        error = float((design[:, chosen] @ solution - 1.0).square().sum())
        if error < best_error:
            best_error, best = error, {terms[i]: float(value) for i, value in zip(chosen, solution)}
    return OpCost(fixed_us=best.get("fixed", 0.0) * 1e6, ns_per_unit=best.get("units", 0.0) * 1e9,
                  ns_per_weight=best.get("weights", 0.0) * 1e9)


def _last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache, from Linux sysfs; 32 MiB where it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        match = re.fullmatch(r"(\d+)([KMG]?)", entry.read_text().strip())
        if match:
            sizes.append(int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)])
    return max(sizes, default=32 << 20)


def _quantized(x: torch.Tensor) -> torch.Tensor:
    scale = float(x.abs().max()) / 127 or 1.0
    return torch.quantize_per_tensor(x, scale, 128, torch.quint8)


def _gelu_formula(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))


# A timed call: its size in the class's unit, the weight elements it reads, and a function that
# builds the call (so that large inputs and module pools exist only while they are timed).
Case = tuple[int, int, Callable[[], Callable[[], object]]]


def _linear_pool(k: int, n: int, kind: str, cache_bytes: int) -> Callable[[torch.Tensor], object]:
    """Return a function that applies, in turn, distinct (k -> n) linears of ``kind`` whose weights
    together exceed the cache by half, so each call reads its weight from memory as in a model.

    The linears share their weight values (only the memory has to differ), which keeps building
    the pool fast.
    """
    import itertools

    import torch.ao.nn.quantized as nnq

    from .optimize import Int8LinearFloatOutput

    source = nn.Linear(k, n).eval()
    weight, bias = source.weight.detach(), source.bias.detach()
    scales = weight.abs().amax(dim=1).clamp(min=1e-6) / 127
    qweight = torch.quantize_per_channel(weight, scales, torch.zeros(n, dtype=torch.long), 0, torch.qint8)
    weight_bytes = k * n * (4 if kind == "fp32" else 1)
    pool: list[nn.Module] = []
    for _ in range(max(2, -(-3 * cache_bytes // (2 * weight_bytes)))):
        if kind == "fp32":
            linear = nn.Linear(k, n, device="meta").to_empty(device="cpu").eval()
            with torch.no_grad():
                linear.weight.copy_(weight)
                linear.bias.copy_(bias)
        elif kind == "int8":
            linear = nnq.Linear(k, n)
            linear.set_weight_bias(qweight, bias)
            linear.scale, linear.zero_point = 0.05, 128
        else:
            gelu = "tanh" if kind == "int8 fp32 output gelu" else None
            linear = Int8LinearFloatOutput.from_weight(qweight, bias, 0.05, 128, gelu)
        pool.append(linear)
    turns = itertools.cycle(pool)
    return lambda x: next(turns)(x)


def _cases(quick: bool) -> dict[tuple[str, str], list[Case]]:
    """Return the calls to time for each (class, domain)."""
    import torch.ao.nn.quantized as nnq
    import torch.nn.functional as F

    from .emit import StubWrapper
    from .optimize import can_merge_dequantize

    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    rows = (1, 32, 128) if quick else (1, 32, 128, 512)
    width = 768
    cache_bytes = _last_level_cache_bytes()
    cases: dict[tuple[str, str], list[Case]] = {}

    def add(op: str, domain: str, units: int, build: Callable[[], Callable[[], object]], weights: int = 0) -> None:
        cases.setdefault((op, domain), []).append((units, weights, build))

    # Square, widening and narrowing projections and a vocabulary-sized head, at one token (where
    # reading the weight dominates) up to hundreds (where the arithmetic does).
    linear_shapes = [((width, width), rows), ((width, 4 * width), rows)]
    if not quick:
        linear_shapes.append(((width, 16384), (1, 128)))
    kinds = [("linear", "fp32", "fp32"), ("linear", "int8", "int8")]
    if can_merge_dequantize():
        kinds += [("linear_fp32_output", "int8", "int8 fp32 output"), ("linear_fp32_output_gelu", "int8", "int8 fp32 output gelu")]
    pools: dict[tuple[int, int, str], Callable] = {}

    def pool(k: int, n: int, kind: str) -> Callable:
        # One pool at a time: the calls of one shape and kind are timed one after another.
        if (k, n, kind) not in pools:
            pools.clear()
            pools[k, n, kind] = _linear_pool(k, n, kind, cache_bytes)
        return pools[k, n, kind]

    for op, domain, kind in kinds:
        for (k, n), lengths in linear_shapes:
            for m in lengths:
                def build(m=m, k=k, n=n, kind=kind):
                    x, call = randn(m, k), pool(k, n, kind)
                    x = x if kind == "fp32" else _quantized(x)
                    return lambda: call(x)
                add(op, domain, m * k * n, build, weights=k * n)
    for size in (14, 28):
        x = randn(1, 64, size, size)
        fp32 = nn.Conv2d(64, 64, 3, padding=1).eval()
        int8 = nnq.Conv2d(64, 64, 3, padding=1)
        macs = size * size * 64 * 64 * 9
        add("conv", "fp32", macs, lambda f=fp32, x=x: lambda: f(x), weights=64 * 64 * 9)
        add("conv", "int8", macs, lambda f=int8, q=_quantized(x): lambda: f(q), weights=64 * 64 * 9)
    for m in rows:
        q, k, v = randn(1, 12, m, 64), randn(1, 12, m, 64), randn(1, 12, m, 64)
        add("attention", "fp32", 12 * m * m * 64,
            lambda q=q, k=k, v=v: lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        a, b = randn(12, m, 64), randn(12, 64, m)
        add("matmul", "fp32", 12 * m * m * 64, lambda a=a, b=b: lambda: torch.matmul(a, b))
        scores = randn(12, m, m)
        add("softmax", "fp32", scores.numel(), lambda s=scores: lambda: torch.softmax(s, -1))
    embedding = nn.Embedding(8192, width)
    norm = nn.LayerNorm(width)
    gelu = nn.GELU(approximate="tanh")
    relu = nn.ReLU()
    for m in rows:
        ids = torch.randint(0, 8192, (1, m), generator=generator)
        add("embedding", "fp32", m * width, lambda ids=ids: lambda: embedding(ids))
        x = randn(1, m, width)
        add("norm", "fp32", x.numel(), lambda x=x: lambda: norm(x))
        wide = randn(1, m, 4 * width)
        for op, module in (("gelu", gelu), ("relu", relu)):
            add(op, "fp32", wide.numel(), lambda f=module, x=wide: lambda: f(x))
            add(op, "int8", wide.numel(), lambda f=module, q=_quantized(wide): lambda: f(q))
        add("gelu_formula", "fp32", wide.numel(), lambda x=wide: lambda: _gelu_formula(x))
        y = randn(1, m, width)
        add("add", "fp32", x.numel(), lambda x=x, y=y: lambda: x + y)
        add("elementwise", "fp32", x.numel(), lambda x=x: lambda: torch.tanh(x))
        for domain, t in (("fp32", x), ("int8", _quantized(x))):
            add("copy", domain, t.numel(), lambda t=t: lambda: t.transpose(-1, -2).contiguous())
            add("view", domain, t.numel(), lambda t=t: lambda: t.view(-1))
    # Conversions of large tensors (a vocabulary-sized output) run from memory, not cache.
    for elements in [m * 4 * width for m in rows] + ([128 * 32768] if not quick else []):
        wide = randn(elements)
        quantize = StubWrapper(nn.Identity(), "quantize")
        setattr(quantize, quantize.input_name, nnq.Quantize(0.05, 128, torch.quint8))
        dequantize = StubWrapper(nn.Identity(), None, "dequantize")
        setattr(dequantize, dequantize.output_name, nnq.DeQuantize())
        add("quantize", "-", wide.numel(), lambda f=quantize, x=wide: lambda: f(x))
        add("dequantize", "-", wide.numel(), lambda f=dequantize, q=_quantized(wide): lambda: f(q))
    return cases


class _ReferenceBlock(nn.Module):
    """A pre-norm transformer block written as model code usually is, to measure what ops cost in a forward."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.act, self.out = nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.out(self.act(self.fc(self.ln_2(x))))


def _overhead_us(cost_model: CostModel, budget: float) -> float:
    """Time of a forward of reference blocks beyond the sum of their ops' calibrated times, per op.

    The blocks are 64 wide at 32 tokens, so the ops' own time is small and the difference is the
    overhead, not an error of the fit. Each op pays it once, whatever its size. Ops this small run
    on one thread, so the wake-up of idle worker threads, which larger ops pay, is not included.
    """
    from .trace import trace

    model = nn.Sequential(*[_ReferenceBlock(width=64, heads=2) for _ in range(4)]).eval()
    x = torch.randn(1, 32, 64, generator=torch.Generator().manual_seed(0))
    graph = trace(model, (x,))
    costs = latency_costs(graph, cost_model, model)
    ops = [n.name for n in graph.nodes() if n.kind in ("module", "op")]
    predicted = sum(costs.nodes[name][0] for name in ops) / 1e9
    measured = _seconds_per_call(lambda: model(x), budget * 4)
    return max(0.0, (measured - predicted) / len(ops) * 1e6)


def calibrate(threads: int | None = None, *, quick: bool = False, budget: float = 0.08) -> CostModel:
    """Time every op class on this machine and return the fitted `CostModel` (about 18 s; 12 s with ``quick``).

    ``threads`` sets torch's thread count for the measurement (and is restored after); the model is
    valid for that thread count only. ``budget`` is the seconds spent timing one call size.
    """
    load = _load_average()
    if load > BUSY_LOAD:
        # Other processes share the cores, so every timing includes their work.
        warnings.warn(f"the machine is busy (load average {load:.1f}); the cost model measures that load too. "
                      "Calibrate on an idle machine for a usable model", PlannerWarning, stacklevel=2)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        fitted: dict[str, dict[str, OpCost]] = {"fp32": {}, "int8": {}, "-": {}}
        for (op, domain), calls in _cases(quick).items():
            fitted[domain][op] = _fit([(units, weights, _seconds_per_call(build(), budget)) for units, weights, build in calls])
        model = CostModel(
            torch=torch.__version__, engine=_engine(), cpu=_cpu_name(), threads=torch.get_num_threads(),
            calibrated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            quantize=fitted["-"]["quantize"], dequantize=fitted["-"]["dequantize"], fp32=fitted["fp32"], int8=fitted["int8"],
        )
        model.overhead_us = _overhead_us(model, budget)
        return model
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


def weight_elements(node: Node, graph: OpGraph, op: str, model: nn.Module | None = None) -> int:
    """Weight elements that ``node`` reads per forward (every call reads its weight again); 0 unless
    ``op`` is ``linear`` or ``conv``.

    A linear's weight is (output width) x (input width), found from its output shape and sizes. A
    convolution's comes from ``model`` where given.
    """
    if op not in ("linear", "conv") or not node.output_shape or not node.output_elements:
        return 0
    calls = node.calls if node.kind == "module" else 1
    if op == "conv":
        if model is not None and node.kind == "module":
            try:
                return int(model.get_submodule(node.fqn).weight.numel()) * calls
            except AttributeError:
                pass
        return _conv_fan_in(node, model) * node.output_shape[1] * calls
    width = node.output_shape[-1]
    if node.kind == "module":
        # input (M, K) and output (M, N) share M, so K = input elements * N / output elements.
        return node.input_elements * width * width // node.output_elements * calls
    shapes = [info.shape for info in _inputs(graph, node) if info.shape]
    return (shapes[0][-1] if shapes else 1) * width


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
    # int8 time of each Linear module that `merge_dequantize` can merge with a dequantize after it,
    # without and with a GELU folded in
    merged: dict[str, int] = field(default_factory=dict)
    merged_gelu: dict[str, int] = field(default_factory=dict)

    def conversion(self, kind: str, elements: int) -> int:
        return max(int(round(self.model.conversion_ns(kind, elements))), 1)


def latency_costs(graph: OpGraph, cost_model: CostModel, model: nn.Module | None = None,
                  effective_types: dict[str, str] | None = None, fused: set[str] | frozenset = frozenset()) -> LatencyCosts:
    """Price every node of ``graph`` in both domains with ``cost_model``.

    ``fused`` names modules that a fusion folds into the module before them (the ReLU of
    Linear+ReLU): in int8 they become an Identity, so they cost one call.
    """
    nodes, classes, merged, merged_gelu = {}, {}, {}, {}
    for node in graph.nodes():
        op, units = op_class(node, graph, model, (effective_types or {}).get(node.name))
        weights = weight_elements(node, graph, op, model)
        classes[node.name] = op
        if node.name in fused:
            int8 = cost_model.node_ns("view", 0, "int8")
        else:
            int8 = cost_model.node_ns(op, units, "int8", weights)
        nodes[node.name] = (int(round(cost_model.node_ns(op, units, "fp32", weights))), int(round(int8)))
        if op == "linear" and node.kind == "module" and "linear_fp32_output" in cost_model.int8:
            merged[node.name] = int(round(cost_model.node_ns("linear_fp32_output", units, "int8", weights)))
        if op == "linear" and node.kind == "module" and "linear_fp32_output_gelu" in cost_model.int8:
            merged_gelu[node.name] = int(round(cost_model.node_ns("linear_fp32_output_gelu", units, "int8", weights)))
    return LatencyCosts(nodes=nodes, classes=classes, model=cost_model, merged=merged, merged_gelu=merged_gelu)


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


def estimate(graph: OpGraph, domains: dict[str, str], conversions, costs: LatencyCosts, *,
             merged: bool = False, folds: dict[str, str] | None = None) -> LatencyEstimate:
    """Predict the forward time of ``graph`` with ``domains`` and ``conversions`` (records with
    ``kind``, ``module`` and ``position``), every node priced in its domain.

    With ``merged``, price the model after `merge_dequantize` with the same cost model: an int8
    Linear module with a dequantize at its own output runs as one call with fp32 output where that
    is cheaper, and that dequantize is gone; ``folds`` maps such Linears to a GELU folded into them,
    which then costs one Identity call.
    """
    merges, folds = set(), folds or {}
    if merged:
        merges = {c.module for c in conversions if c.kind == "dequantize" and c.position == "output"
                  and c.module in costs.merged and domains.get(c.module) == "int8"}
    folds = {linear: gelu for linear, gelu in folds.items() if linear in merges and linear in costs.merged_gelu}
    identity = costs.model.node_ns("view", 0, "fp32")
    for name in sorted(merges):
        # merge_dequantize keeps the separate calls where the cost model prices them lower.
        node = graph.node(name)
        separate = costs.nodes[name][1] + costs.conversion("dequantize", node.output_elements) * node.calls
        together = costs.merged[name]
        if name in folds:
            separate += costs.nodes[folds[name]][0]
            together = costs.merged_gelu[name] + identity
        if together > separate:
            merges.discard(name)
            folds.pop(name, None)
    folded = set(folds.values())
    parts: dict[str, float] = {}
    for name, domain in domains.items():
        if name not in costs.nodes or graph.node(name).kind in ("input", "output", "constant"):
            continue
        key = f"{costs.classes[name]} {domain}"
        if name in merges:
            ns = costs.merged_gelu[name] if name in folds else costs.merged[name]
        elif name in folded:
            ns = identity
        else:
            ns = costs.nodes[name][domain == "int8"]
        parts[key] = parts.get(key, 0.0) + ns
    for conversion in conversions:
        if conversion.module not in graph.graph:
            continue
        if conversion.module in merges and conversion.kind == "dequantize" and conversion.position == "output":
            continue
        node = graph.node(conversion.module)
        elements = node.input_elements if conversion.position == "input" else node.output_elements
        parts[conversion.kind] = parts.get(conversion.kind, 0.0) + costs.conversion(conversion.kind, elements) * node.calls
    by_class = {key: round(ns / 1e6, 4) for key, ns in sorted(parts.items(), key=lambda item: -item[1])}
    return LatencyEstimate(total_ms=round(sum(parts.values()) / 1e6, 4), by_class=by_class, cost_model=costs.model.describe())


def predict(model: nn.Module, example_inputs, plan, cost_model: CostModel | None = None, *,
            example_kwargs: dict | None = None, merged: bool = False) -> LatencyEstimate:
    """Predict the int8 forward time of ``model`` emitted with ``plan``, on ``example_inputs``.

    The model is traced again on these inputs (meta tensors are enough), so one plan can be priced at
    other sequence lengths than it was planned at. ``cost_model`` defaults to the plan's own, then to
    this machine's cached one. ``merged`` prices the converted model after
``merge_dequantize(converted, plan=plan)``.
    """
    from .plan import _split_inputs
    from .trace import trace

    args, kwargs = _split_inputs(model, example_inputs, example_kwargs)
    return predict_graph(trace(model, args, kwargs), plan, cost_model, model, merged=merged)


def predict_graph(graph: OpGraph, plan, cost_model: CostModel | None = None, model: nn.Module | None = None, *,
                  merged: bool = False) -> LatencyEstimate:
    """Predict the int8 forward time of ``plan`` on an already traced ``graph``; see `predict`.

    Raises:
        PlanError: the plan does not cover every node of ``graph``.
    """
    from .optimize import gelu_folds

    cost_model = cost_model or plan.cost_model or load_cost_model()
    missing = [n.name for n in graph.nodes() if n.name not in plan.nodes]
    if missing:
        raise PlanError(f"the plan does not cover {len(missing)} node(s) of this trace ({', '.join(missing[:3])}); "
                        "plan the model again on these inputs")
    costs = plan_latency_costs(graph, plan, cost_model, model)
    domains = {n.name: plan.nodes[n.name].domain for n in graph.nodes()}
    folds = gelu_folds(plan) if merged else {}
    return estimate(graph, domains, plan.boundaries, costs, merged=merged, folds=folds)
