"""Helpers for users' own test suites: `assert_plan_valid`, a brute-force oracle and hypothesis strategies.

Example, in a pytest file::

    from planner.testing import assert_plan_valid

    def test_my_model_plans():
        assert_plan_valid(MyModel(), (torch.randn(2, 16),), rules="my_rules.json")

The strategies need ``hypothesis`` (install ``qat-planner[test]``).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from torch import nn

from .costs import CostModel, LatencyCosts, OpCost
from .graph import Node, OpGraph
from .plan import Plan, plan
from .rules import RuleSet
from .validate import ValidationReport, validate

__all__ = ["assert_plan_valid", "brute_force_cost", "random_latency_costs", "make_graph", "placement_problems",
           "generated_models", "GeneratedNet"]


def assert_plan_valid(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | dict[str, Any] | Any,
    rules: str | Path | RuleSet | list[str | Path | RuleSet] = "default",
    *,
    objective: str = "bytes",
    dynamic: bool = True,
) -> Plan:
    """Plan ``model`` and run every validator check; raise `AssertionError` listing the failed checks.

    Returns the plan so a test can assert more about it. ``model`` needs real weights when
    ``dynamic=True``; it is not modified.
    """
    result = plan(model, example_inputs, rules=rules, objective=objective)
    report: ValidationReport = validate(model, example_inputs, result, dynamic=dynamic)
    if not report.passed:
        raise AssertionError("plan failed validation:\n" + report.render())
    return result


def make_graph(nodes: list[tuple[str, str, int, int]], edges: list[tuple[str, str]]) -> OpGraph:
    """Build an `OpGraph` from ``(name, kind, input_elements, output_elements)`` tuples and edges.

    ``kind`` is ``"module"`` or ``"op"``; a model input ``"in"`` and output ``"out"`` are added, so
    edges may start at ``"in"`` and end at ``"out"``.
    """
    graph = nx.DiGraph()
    graph.add_node("in", node=Node("in", "input", "", 0, output_elements=1))
    for order, (name, kind, inputs, outputs) in enumerate(nodes, start=1):
        graph.add_node(name, node=Node(name, kind, name, order, op=None if kind == "module" else "op",
                                       input_elements=inputs, output_elements=outputs))
    graph.add_node("out", node=Node("out", "output", "", len(nodes) + 1))
    for u, v in edges:
        graph.add_edge(u, v, elements=1)
    return OpGraph(graph=graph, model_type="generated", tracer="generated", trace_seconds=0.0)


def brute_force_cost(graph: OpGraph, requirements: dict[str, str], objective: str = "bytes",
                     costs: LatencyCosts | None = None) -> int | None:
    """Return the minimum cut cost by enumerating every labelling of the nodes.

    For each labelling the ports are priced exactly: tensors join a producer's output port to its
    consumers' input ports (an op node is its own port), so each connected group of ports shares one
    label; a group containing an op, input or output takes that node's label, any other group takes
    the cheaper label. A port whose label differs from its module's costs one conversion, and with
    ``objective="latency"`` every free node adds its time in its domain (from ``costs``). Exponential
    in the node count: use it on graphs of about a dozen nodes. ``None`` means no labelling is valid.
    """
    names = [n.name for n in graph.nodes()]
    groups = _port_groups(graph)
    best: int | None = None
    for labels in itertools.product(("fp32", "int8"), repeat=len(names)):
        domain = dict(zip(names, labels))
        if any(requirements[n] not in ("any", domain[n]) for n in names):
            continue
        cost = 0
        if objective == "latency":
            cost = sum(costs.nodes[n][domain[n] == "int8"] for n in names if requirements[n] == "any")
        for fixed, ports in groups:
            forced = {domain[name] for name in fixed}
            if len(forced) > 1:
                cost = None
                break
            options = forced or {"fp32", "int8"}
            cost += min(sum(_port_cost(graph, port, label, objective, costs) for port in ports if domain[port[0]] != label)
                        for label in options)
        if cost is not None and (best is None or cost < best):
            best = cost
    return best


def _port_cost(graph: OpGraph, port: tuple[str, str], label: str, objective: str, costs: LatencyCosts | None) -> int:
    if objective == "count":
        return 1
    node = graph.node(port[0])
    elements = node.input_elements if port[1] == "in" else node.output_elements
    if objective == "latency":
        # An fp32 tensor entering an int8 module, or an fp32 module's output leaving as int8, is quantized.
        quantize = (label == "fp32") if port[1] == "in" else (label == "int8")
        return costs.conversion("quantize" if quantize else "dequantize", elements) * node.calls
    return elements


def random_latency_costs(graph: OpGraph, rng) -> LatencyCosts:
    """Latency capacities with random conversion prices and random per-node times, for property tests.

    ``rng`` is a `random.Random`. The quantize and dequantize prices differ, so the direction of
    each conversion matters, as it does on real backends.
    """
    def cost() -> OpCost:
        return OpCost(fixed_us=rng.randint(0, 5), ns_per_unit=rng.choice([0.0, 0.5, 1.0, 7.0]))

    model = CostModel(torch="test", engine="test", cpu="test", threads=1, calibrated_at="test",
                      quantize=cost(), dequantize=cost(), fp32={"elementwise": cost()}, int8={})
    nodes = {n.name: (rng.randint(0, 20_000), rng.randint(0, 20_000)) for n in graph.nodes()}
    return LatencyCosts(nodes=nodes, classes={name: "elementwise" for name in nodes}, model=model)


def _port_groups(graph: OpGraph) -> list[tuple[set[str], list[tuple[str, str]]]]:
    """Return the connected groups of ports: (non-module nodes in the group, module ports in the group)."""
    links = nx.Graph()

    def endpoint(name: str, side: str):
        return (name, side) if graph.node(name).kind == "module" else (name, "core")

    for node in graph.nodes():
        if node.kind == "module":
            if graph.predecessors(node.name):
                links.add_node((node.name, "in"))
            if graph.successors(node.name):
                links.add_node((node.name, "out"))
        else:
            links.add_node((node.name, "core"))
    for u, v in graph.graph.edges:
        links.add_edge(endpoint(u, "out"), endpoint(v, "in"))
    groups = []
    for component in nx.connected_components(links):
        fixed = {name for name, side in component if side == "core"}
        ports = sorted(p for p in component if p[1] != "core")
        groups.append((fixed, ports))
    return groups


def placement_problems(max_nodes: int = 6):
    """Hypothesis strategy of ``(graph, requirements)``: modules and ops with fan-out, fan-in and random sizes.

    Op nodes are never required int8, as in real plans (the planner keeps such a request fp32).
    """
    from hypothesis import strategies as st

    @st.composite
    def problems(draw):
        count = draw(st.integers(1, max_nodes))
        nodes = []
        for i in range(count):
            kind = draw(st.sampled_from(["module", "module", "op"]))
            nodes.append((f"n{i}", kind, draw(st.integers(1, 64)), draw(st.integers(1, 64))))
        names = ["in"] + [n[0] for n in nodes]
        edges = set()
        for i, (name, *_rest) in enumerate(nodes):
            producers = draw(st.lists(st.sampled_from(names[: i + 1]), min_size=1, max_size=3, unique=True))
            edges.update((p, name) for p in producers)
        sinks = [n for n in names[1:] if not any(u == n for u, _ in edges)]
        extra = draw(st.lists(st.sampled_from(names[1:]), max_size=2, unique=True))
        edges.update((n, "out") for n in set(sinks) | set(extra))
        requirements = {"in": "fp32", "out": "fp32"}
        for name, kind, *_ in nodes:
            options = ["int8", "fp32", "any"] if kind == "module" else ["fp32", "any"]
            requirements[name] = draw(st.sampled_from(options))
        return make_graph(nodes, sorted(edges)), requirements

    return problems()


class MyLinear(nn.Linear):
    """A user subclass of `nn.Linear`; type rules match classes by name, so it is not quantized by ``Linear``."""


class MyConv2d(nn.Conv2d):
    """A user subclass of `nn.Conv2d`."""


SEQUENCE_STEPS = ("linear", "relu", "gelu", "layer_norm", "softmax", "dropout", "residual", "cat", "attention",
                  "reshape", "shared_twice", "my_linear", "linear_relu")
IMAGE_STEPS = ("conv", "batch_norm", "relu", "conv_bn_relu", "residual_conv", "my_conv", "max_pool", "cat_channels")


class GeneratedNet(nn.Module):
    """A model assembled from named steps, for property tests over the planner and emitter.

    ``family="sequence"`` takes token ids ``(batch, tokens)`` (an embedding first) and keeps the width
    ``width``; ``family="image"`` takes ``(batch, width, 8, 8)`` images and ends with a Linear head.
    """

    def __init__(self, family: str, steps: list[str], width: int = 8):
        super().__init__()
        self.family, self.steps, self.width = family, list(steps), width
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same steps give the same weights, so a failure replays exactly
            self.layers = nn.ModuleList(self._build(step) for step in steps)
            if family == "sequence":
                self.embed = nn.Embedding(32, width)
            else:
                self.head = nn.Linear(width * 4, 4)

    def _build(self, step: str) -> nn.Module:
        d = self.width
        builders = {
            "linear": lambda: nn.Linear(d, d), "my_linear": lambda: MyLinear(d, d), "relu": nn.ReLU, "gelu": nn.GELU,
            "layer_norm": lambda: nn.LayerNorm(d), "softmax": lambda: nn.Softmax(-1), "dropout": lambda: nn.Dropout(0.1),
            "residual": lambda: nn.Linear(d, d), "cat": lambda: nn.Linear(2 * d, d), "attention": lambda: nn.Linear(d, d),
            "reshape": nn.Identity, "shared_twice": lambda: nn.Linear(d, d),
            "linear_relu": lambda: nn.Sequential(nn.Linear(d, d), nn.ReLU()),
            "conv": lambda: nn.Conv2d(d, d, 3, padding=1), "my_conv": lambda: MyConv2d(d, d, 3, padding=1),
            "batch_norm": lambda: nn.BatchNorm2d(d),
            "conv_bn_relu": lambda: nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.BatchNorm2d(d), nn.ReLU()),
            "residual_conv": lambda: nn.Conv2d(d, d, 3, padding=1), "max_pool": lambda: nn.MaxPool2d(3, 1, 1),
            "cat_channels": lambda: nn.Conv2d(2 * d, d, 1),
        }
        return builders[step]()

    def forward(self, x):
        if self.family == "sequence":
            x = self.embed(x)
        for step, layer in zip(self.steps, self.layers):
            if step in ("residual", "residual_conv"):
                x = x + layer(x)
            elif step in ("cat", "cat_channels"):
                x = layer(torch.cat([x, x * 0.5], dim=-1 if step == "cat" else 1))
            elif step == "attention":
                scores = torch.softmax(x @ x.transpose(-1, -2), dim=-1)
                x = layer(scores @ x)
            elif step == "reshape":
                x = layer(x.reshape(x.shape[0], -1)).reshape(x.shape)
            elif step == "shared_twice":
                x = layer(torch.relu(layer(x)))
            else:
                x = layer(x)
        if self.family == "image":
            x = nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
            x = self.head(x)
        return x

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor]:
        if self.family == "sequence":
            return (torch.randint(0, 32, (batch, 6), generator=torch.Generator().manual_seed(0)),)
        return (torch.randn(batch, self.width, 8, 8, generator=torch.Generator().manual_seed(0)),)


def generated_models(max_steps: int = 5):
    """Hypothesis strategy of `GeneratedNet` models built from `SEQUENCE_STEPS` or `IMAGE_STEPS`."""
    from hypothesis import strategies as st

    sequence = st.lists(st.sampled_from(SEQUENCE_STEPS), min_size=1, max_size=max_steps).map(
        lambda steps: GeneratedNet("sequence", steps))
    image = st.lists(st.sampled_from(IMAGE_STEPS), min_size=1, max_size=max_steps).map(
        lambda steps: GeneratedNet("image", steps))
    return st.one_of(sequence, image)
