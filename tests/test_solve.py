"""The min-cut placement against brute force, and its tie-breaking and determinism."""

from __future__ import annotations

import itertools
import random

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.errors import PlanError
from planner.graph import Node, OpGraph
from planner.solve import solve


def make_graph(nodes: list[tuple[str, str, int, int]], edges: list[tuple[str, str]]) -> OpGraph:
    """Build an OpGraph from (name, kind, input_elements, output_elements) and edges; a model input and output are added."""
    graph = nx.DiGraph()
    graph.add_node("in", node=Node("in", "input", "", 0, output_elements=1))
    for order, (name, kind, inputs, outputs) in enumerate(nodes, start=1):
        graph.add_node(name, node=Node(name, kind, name, order, op=None if kind == "module" else "op",
                                       input_elements=inputs, output_elements=outputs))
    graph.add_node("out", node=Node("out", "output", "", len(nodes) + 1))
    for u, v in edges:
        graph.add_edge(u, v, elements=1)
    return OpGraph(graph=graph, model_type="test", tracer="test", trace_seconds=0.0)


def brute_force(graph: OpGraph, requirements: dict[str, str], objective: str) -> int:
    """Minimum cost over all labellings of cores and ports, the port model spelled out by enumeration."""
    names = [n.name for n in graph.nodes()]
    best = None
    for labels in itertools.product(("fp32", "int8"), repeat=len(names)):
        domain = dict(zip(names, labels))
        if any(requirements[n] not in ("any", domain[n]) for n in names):
            continue
        # Ports: a module's output port takes the label its consumers force; an op has no ports.
        cost = 0
        feasible = True
        for name in names:
            node = graph.node(name)
            if node.kind != "module":
                continue
            outs = {domain[v] if graph.node(v).kind != "module" else None for v in graph.successors(name)}
            ins = {domain[u] if graph.node(u).kind != "module" else None for u in graph.predecessors(name)}
            outs.discard(None)
            ins.discard(None)
            if len(outs) > 1 or len(ins) > 1:
                feasible = False
                break
        if not feasible:
            continue
        cost = _port_cost(graph, domain, objective)
        if cost is not None and (best is None or cost < best):
            best = cost
    return best


def _port_cost(graph: OpGraph, domain: dict[str, str], objective: str) -> int | None:
    """Cheapest port labelling for fixed core labels: each port takes one label shared with its neighbours."""
    ports = []
    for node in graph.nodes():
        if node.kind == "module":
            if graph.predecessors(node.name):
                ports.append((node.name, "in"))
            if graph.successors(node.name):
                ports.append((node.name, "out"))
    best = None
    for labels in itertools.product(("fp32", "int8"), repeat=len(ports)):
        port = dict(zip(ports, labels))

        def side(name, direction):
            node = graph.node(name)
            return port[(name, direction)] if node.kind == "module" else domain[name]

        if any(side(u, "out") != side(v, "in") for u, v in graph.graph.edges):
            continue
        cost = 0
        for (name, direction), label in port.items():
            if label != domain[name]:
                node = graph.node(name)
                size = node.input_elements if direction == "in" else node.output_elements
                cost += 1 if objective == "count" else size
        best = cost if best is None else min(best, cost)
    return best


@st.composite
def small_problems(draw):
    count = draw(st.integers(2, 5))
    nodes = []
    for i in range(count):
        kind = draw(st.sampled_from(["module", "module", "op"]))
        nodes.append((f"n{i}", kind, draw(st.integers(1, 9)), draw(st.integers(1, 9))))
    names = ["in"] + [n[0] for n in nodes]
    edges = set()
    for i, (name, *_rest) in enumerate(nodes):
        producers = draw(st.lists(st.sampled_from(names[: i + 1]), min_size=1, max_size=2, unique=True))
        edges.update((p, name) for p in producers)
    consumers_needed = [n for n in names[1:] if not any(u == n for u, _ in edges)]
    edges.update((n, "out") for n in consumers_needed)
    requirements = {"in": "fp32", "out": "fp32"}
    for name, kind, *_ in nodes:
        options = ["int8", "fp32", "any"] if kind == "module" else ["fp32", "any"]
        requirements[name] = draw(st.sampled_from(options))
    return nodes, sorted(edges), requirements


@settings(max_examples=150, deadline=None)
@given(small_problems(), st.sampled_from(["bytes", "count"]))
def test_cut_cost_equals_brute_force(problem, objective):
    nodes, edges, requirements = problem
    graph = make_graph(nodes, edges)
    solution = solve(graph, requirements, objective=objective)
    assert solution.cost == brute_force(graph, requirements, objective)
    for name, requirement in requirements.items():
        if requirement != "any":
            assert solution.domains[name] == requirement


@settings(max_examples=60, deadline=None)
@given(small_problems())
def test_plan_independent_of_insertion_order(problem):
    nodes, edges, requirements = problem
    first = solve(make_graph(nodes, edges), requirements)
    shuffled_edges = list(edges)
    random.Random(1).shuffle(shuffled_edges)
    second = solve(make_graph(list(reversed(nodes)), shuffled_edges), requirements)
    assert first.domains == second.domains
    assert sorted(first.conversions, key=str) == sorted(second.conversions, key=str)


def test_tie_breaks_toward_fp32():
    # lin (int8) -> drop (any) -> ln (fp32): the dequantize costs 4 at lin's output or at drop's output.
    graph = make_graph([("lin", "module", 4, 4), ("drop", "module", 4, 4), ("ln", "module", 4, 4)],
                       [("in", "lin"), ("lin", "drop"), ("drop", "ln"), ("ln", "out")])
    solution = solve(graph, {"in": "fp32", "lin": "int8", "drop": "any", "ln": "fp32", "out": "fp32"})
    assert solution.domains["drop"] == "fp32"
    assert [(c.kind, c.module, c.position) for c in solution.conversions] == [
        ("quantize", "lin", "input"), ("dequantize", "lin", "output")]


def test_wide_tensor_stays_int8_between_modules():
    # fc1 (int8) -> act (any) -> fc2 (int8): the 4x wide activation is never converted.
    graph = make_graph([("fc1", "module", 2, 8), ("act", "module", 8, 8), ("fc2", "module", 8, 2)],
                       [("in", "fc1"), ("fc1", "act"), ("act", "fc2"), ("fc2", "out")])
    solution = solve(graph, {"in": "fp32", "fc1": "int8", "act": "any", "fc2": "int8", "out": "fp32"})
    assert solution.domains["act"] == "int8"
    assert solution.cost == 4


def test_unknown_objective_rejected():
    graph = make_graph([("lin", "module", 1, 1)], [("in", "lin"), ("lin", "out")])
    with pytest.raises(PlanError, match="unknown objective 'latency'; accepted: bytes, count"):
        solve(graph, {"in": "fp32", "lin": "int8", "out": "fp32"}, objective="latency")
