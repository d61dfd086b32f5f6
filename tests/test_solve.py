"""The min-cut placement against brute force, and its tie-breaking and determinism."""

from __future__ import annotations

import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from planner.costs import CostModel, LatencyCosts, OpCost
from planner.errors import PlanError
from planner.solve import price, solve
from planner.testing import brute_force_cost, make_graph, placement_problems, random_latency_costs


def _problem(nodes, edges, requirements):
    return make_graph(nodes, edges), requirements


@settings(max_examples=500, deadline=None)
@given(placement_problems(max_nodes=12))
@example(_problem([("a", "module", 3, 5), ("b", "op", 5, 5)], [("in", "a"), ("a", "b"), ("b", "out")],
                  {"in": "fp32", "a": "int8", "b": "any", "out": "fp32"}))
def test_cut_cost_equals_brute_force(problem):
    graph, requirements = problem
    for objective in ("bytes", "count"):
        solution = solve(graph, requirements, objective=objective)
        assert solution.cost == brute_force_cost(graph, requirements, objective), objective
        for name, requirement in requirements.items():
            if requirement != "any":
                assert solution.domains[name] == requirement


@settings(max_examples=300, deadline=None)
@given(placement_problems(max_nodes=11), st.randoms(use_true_random=False))
def test_latency_cut_equals_brute_force(problem, rng):
    graph, requirements = problem
    costs = random_latency_costs(graph, rng)
    solution = solve(graph, requirements, objective="latency", costs=costs)
    assert solution.cost == brute_force_cost(graph, requirements, "latency", costs)
    assert solution.cost == price(graph, solution.domains, solution.conversions, requirements, "latency", costs)


def test_latency_runs_free_node_where_faster_despite_conversions():
    # fc1 (int8) -> act (any) -> fc2 (int8). Every conversion costs 1000 ns plus 1 ns per element, so
    # running act in fp32 adds a dequantize and a quantize of its 8 elements: 2 * 1008 ns.
    graph = make_graph([("fc1", "module", 2, 8), ("act", "module", 8, 8), ("fc2", "module", 8, 2)],
                       [("in", "fc1"), ("fc1", "act"), ("act", "fc2"), ("fc2", "out")])
    one_us = OpCost(fixed_us=1.0, ns_per_unit=1.0)
    model = CostModel(torch="t", engine="t", cpu="t", threads=1, calibrated_at="t", quantize=one_us, dequantize=one_us,
                      fp32={"elementwise": one_us}, int8={})
    nodes = {n.name: (0, 0) for n in graph.nodes()}
    requirements = {"in": "fp32", "fc1": "int8", "act": "any", "fc2": "int8", "out": "fp32"}

    nodes["act"] = (1000, 9000)
    solution = solve(graph, requirements, objective="latency", costs=LatencyCosts(nodes, {}, model))
    assert solution.domains["act"] == "fp32"
    assert solution.cost == 1000 + 2 * 1002 + 2 * 1008  # act, the stubs at the model's ends, the two around act

    nodes["act"] = (1000, 3000)  # now int8 is faster: 3000 < 1000 + 2 * 1008
    solution = solve(graph, requirements, objective="latency", costs=LatencyCosts(nodes, {}, model))
    assert solution.domains["act"] == "int8"
    assert [(c.kind, c.module, c.position) for c in solution.conversions] == [
        ("quantize", "fc1", "input"), ("dequantize", "fc2", "output")]


def test_latency_without_costs_is_an_error():
    graph = make_graph([("a", "module", 1, 1)], [("in", "a"), ("a", "out")])
    with pytest.raises(PlanError, match="objective 'latency' needs a cost model"):
        solve(graph, {"in": "fp32", "a": "any", "out": "fp32"}, objective="latency")


@settings(max_examples=100, deadline=None)
@given(placement_problems(max_nodes=12))
def test_plan_independent_of_insertion_order(problem):
    graph, requirements = problem
    first = solve(graph, requirements)
    nodes = [(n.name, n.kind, n.input_elements, n.output_elements) for n in graph.nodes() if n.kind in ("module", "op")]
    edges = list(graph.graph.edges)
    random.Random(1).shuffle(edges)
    second = solve(make_graph(list(reversed(nodes)), edges), requirements)
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


def test_objectives_place_dequantize_differently():
    # wide (int8, output 10) -> narrow (any, output 1): bytes dequantizes after narrow (1 element),
    # count sees two equal one-stub plans and breaks the tie toward fp32, after wide.
    graph = make_graph([("wide", "module", 1, 10), ("narrow", "module", 10, 1)],
                       [("in", "wide"), ("wide", "narrow"), ("narrow", "out")])
    requirements = {"in": "fp32", "wide": "int8", "narrow": "any", "out": "fp32"}
    by_bytes = solve(graph, requirements, objective="bytes")
    by_count = solve(graph, requirements, objective="count")
    assert [(c.module, c.position) for c in by_bytes.conversions] == [("wide", "input"), ("narrow", "output")]
    assert [(c.module, c.position) for c in by_count.conversions] == [("wide", "input"), ("wide", "output")]
    assert (by_bytes.cost, by_count.cost) == (2, 2)


def test_unknown_objective_rejected():
    graph = make_graph([("lin", "module", 1, 1)], [("in", "lin"), ("lin", "out")])
    with pytest.raises(PlanError, match="unknown objective 'speed'; accepted: bytes, count, latency"):
        solve(graph, {"in": "fp32", "lin": "int8", "out": "fp32"}, objective="speed")
