"""Place quant/dequant conversions by a minimum s-t cut over the operator graph.

Labels: the source side of the cut is fp32, the sink side int8. A node the rules fix to fp32 is tied
to the source, one fixed to int8 to the sink, both with infinite capacity; ``any`` nodes are free.

Eager module surgery can only convert a tensor at a leaf module's input (a stub before the module) or
output (a stub after it). So each module node has an input port and an output port, each joined to
the module's core by an edge whose capacity is the cost of converting that tensor, in both directions.
A tensor flowing from one node to another joins the producer's output port to the consumer's input
port with infinite capacity, because nothing can be inserted between two functional ops. Op nodes
are their own ports, so a conversion never lands between two ops.

Min-cut is exact for this two-label problem. Among the minimum cuts the solver returns the one with
the largest fp32 side: a node is int8 only if every minimum cut puts it on the int8 side. That choice
is unique, so the result does not depend on node insertion order or on the max-flow algorithm.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

import networkx as nx
from networkx.algorithms.flow import preflow_push

from .errors import PlanError
from .graph import OpGraph

Domain = Literal["int8", "fp32"]
Objective = Literal["bytes", "count"]
OBJECTIVES: tuple[str, ...] = ("bytes", "count")

_SOURCE, _SINK = "__fp32__", "__int8__"


@dataclass(frozen=True)
class Conversion:
    """One QuantStub or DeQuantStub at a module's input or output."""

    kind: Literal["quantize", "dequantize"]
    module: str
    position: Literal["input", "output"]
    elements: int


@dataclass(frozen=True)
class Solution:
    """Domains of all nodes and the conversions the cut implies; ``cost`` is the cut value."""

    domains: dict[str, Domain]
    conversions: tuple[Conversion, ...]
    cost: int


def _port(name: str, side: str) -> tuple[str, str]:
    return (side, name)


def build_network(graph: OpGraph, requirements: dict[str, str], objective: Objective = "bytes") -> nx.DiGraph:
    """Build the flow network of the cut: cores, ports, capacities, and source/sink ties.

    Edges without a ``capacity`` attribute have infinite capacity (networkx's convention).
    """
    if objective not in OBJECTIVES:
        raise PlanError(f"unknown objective {objective!r}; accepted: {', '.join(OBJECTIVES)}")
    network = nx.DiGraph()
    network.add_nodes_from([_SOURCE, _SINK])

    def cost(elements: int) -> int:
        return 1 if objective == "count" else max(int(elements), 1)

    for node in graph.nodes():
        core = _port(node.name, "core")
        network.add_node(core)
        if node.kind == "module":
            if graph.graph.in_degree(node.name):
                _add_undirected(network, _port(node.name, "in"), core, cost(node.input_elements))
            if graph.graph.out_degree(node.name):
                _add_undirected(network, core, _port(node.name, "out"), cost(node.output_elements))
        requirement = requirements[node.name]
        if requirement == "fp32":
            network.add_edge(_SOURCE, core)
        elif requirement == "int8":
            network.add_edge(core, _SINK)

    for producer, consumer in graph.graph.edges:
        a = _port(producer, "out" if graph.node(producer).kind == "module" else "core")
        b = _port(consumer, "in" if graph.node(consumer).kind == "module" else "core")
        network.add_edge(a, b)
        network.add_edge(b, a)
    return network


def _add_undirected(network: nx.DiGraph, a, b, capacity: int) -> None:
    network.add_edge(a, b, capacity=capacity)
    network.add_edge(b, a, capacity=capacity)


def solve(graph: OpGraph, requirements: dict[str, str], *, objective: Objective = "bytes") -> Solution:
    """Return the cheapest domain assignment that meets ``requirements`` (``int8``/``fp32``/``any`` per node).

    Cost is the sum over conversions of the converted tensor's element count (``objective="bytes"``)
    or 1 per conversion (``objective="count"``). Ties go to fp32 as described in the module docstring.

    Raises:
        PlanError: the objective is unknown, or no finite cut exists (an int8 node joined to an fp32
            node with no module boundary between them where a conversion could go).
    """
    network = build_network(graph, requirements, objective)
    try:
        residual = preflow_push(network, _SOURCE, _SINK)
    except nx.NetworkXUnbounded:
        raise PlanError(
            "no valid plan: an int8 node and an fp32 node are joined by functional ops only, so eager mode "
            "has no module boundary where a stub could go; make one of them 'passthrough' or 'float'"
        ) from None

    int8_side = _reaching_sink(residual)
    domains: dict[str, Domain] = {}
    for node in graph.nodes():
        domains[node.name] = "int8" if _port(node.name, "core") in int8_side else "fp32"

    conversions = []
    cut_value = 0
    for node in graph.module_nodes():
        core_int8 = domains[node.name] == "int8"
        for side, position, elements in (("in", "input", node.input_elements), ("out", "output", node.output_elements)):
            port = _port(node.name, side)
            if port not in network or (port in int8_side) == core_int8:
                continue
            to_int8 = core_int8 if side == "in" else not core_int8
            conversions.append(Conversion("quantize" if to_int8 else "dequantize", node.name, position, elements))
            cut_value += network.edges[port, _port(node.name, "core")]["capacity"]
    # The cut read off the labels must equal the max-flow value; anything else is a bug in this module.
    assert cut_value == residual.graph["flow_value"], (cut_value, residual.graph["flow_value"])
    return Solution(domains=domains, conversions=tuple(conversions), cost=cut_value)


def _reaching_sink(residual: nx.DiGraph) -> set:
    """Return the nodes from which the sink is reachable through edges with residual capacity."""
    reached = {_SINK}
    queue = deque([_SINK])
    while queue:
        v = queue.popleft()
        for u in residual.predecessors(v):
            if u in reached:
                continue
            edge = residual.edges[u, v]
            if edge["capacity"] - edge["flow"] > 0:
                reached.add(u)
                queue.append(u)
    return reached
