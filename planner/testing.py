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
from torch import nn

from .graph import Node, OpGraph
from .plan import Plan, plan
from .rules import RuleSet
from .validate import ValidationReport, validate

__all__ = ["assert_plan_valid", "brute_force_cost", "make_graph", "placement_problems"]


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


def brute_force_cost(graph: OpGraph, requirements: dict[str, str], objective: str = "bytes") -> int | None:
    """Return the minimum conversion cost by enumerating every labelling of the nodes.

    For each labelling the ports are priced exactly: tensors join a producer's output port to its
    consumers' input ports (an op node is its own port), so each connected group of ports shares one
    label; a group containing an op, input or output takes that node's label, any other group takes
    the cheaper label. A port whose label differs from its module's costs one conversion. Exponential
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
        for fixed, ports in groups:
            forced = {domain[name] for name in fixed}
            if len(forced) > 1:
                cost = None
                break
            options = forced or {"fp32", "int8"}
            cost += min(sum(_port_cost(graph, port, objective) for port in ports if domain[port[0]] != label) for label in options)
        if cost is not None and (best is None or cost < best):
            best = cost
    return best


def _port_cost(graph: OpGraph, port: tuple[str, str], objective: str) -> int:
    if objective == "count":
        return 1
    node = graph.node(port[0])
    return node.input_elements if port[1] == "in" else node.output_elements


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
