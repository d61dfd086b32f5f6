"""Place quant/dequant conversions by a minimum s-t cut over the operator graph.

Labels: the source side of the cut is fp32, the sink side int8. A node the rules fix to fp32 is tied
to the source, one fixed to int8 to the sink, both with infinite capacity; ``any`` nodes are free.

Eager module surgery can only convert a tensor at a leaf module's input (a stub before the module) or
output (a stub after it). So each module node has an input port and an output port, each joined to
the module's core by an edge whose capacity is the cost of converting that tensor, in both directions.
A tensor flowing from one node to another joins the producer's output port to the consumer's input
port with infinite capacity, because nothing can be inserted between two functional ops. Op nodes
are their own ports, so a conversion never lands between two ops.

With ``objective="latency"`` the capacities are predicted nanoseconds (see `planner.costs`): a port
edge costs a quantize in the direction fp32 -> int8 and a dequantize in the other, and a node free to
run in either domain is joined to the source with its int8 time and to the sink with its fp32 time,
so the cut pays the time of the domain each node ends up in.

Min-cut is exact for this two-label problem. Among the minimum cuts the solver returns the one with
the largest fp32 side: a node is int8 only if every minimum cut puts it on the int8 side. That choice
is unique, so the result does not depend on node insertion order or on the max-flow algorithm.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import networkx as nx
from networkx.algorithms.flow import boykov_kolmogorov

from .errors import PlanError
from .graph import OpGraph

if TYPE_CHECKING:
    from .costs import LatencyCosts

Domain = Literal["int8", "fp32"]
Objective = Literal["bytes", "count", "latency"]
OBJECTIVES: tuple[str, ...] = ("bytes", "count", "latency")

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


def build_network(graph: OpGraph, requirements: dict[str, str], objective: Objective = "bytes",
                  costs: LatencyCosts | None = None) -> nx.DiGraph:
    """Build the flow network of the cut: cores, ports, capacities, and source/sink ties.

    Edges without a ``capacity`` attribute have infinite capacity (networkx's convention).
    """
    if objective not in OBJECTIVES:
        raise PlanError(f"unknown objective {objective!r}; accepted: {', '.join(OBJECTIVES)}")
    if objective == "latency" and costs is None:
        raise PlanError("objective 'latency' needs a cost model; pass costs=planner.costs.latency_costs(...)")
    network = nx.DiGraph()
    network.add_nodes_from([_SOURCE, _SINK])

    def join(a, b, elements: int, calls: int) -> None:
        """Join an fp32-side ``a`` to an int8-side ``b``: cutting a -> b quantizes, b -> a dequantizes."""
        if objective == "latency":
            network.add_edge(a, b, capacity=costs.conversion("quantize", elements) * calls)
            network.add_edge(b, a, capacity=costs.conversion("dequantize", elements) * calls)
        else:
            capacity = 1 if objective == "count" else max(int(elements), 1)
            network.add_edge(a, b, capacity=capacity)
            network.add_edge(b, a, capacity=capacity)

    for node in graph.nodes():
        core = _port(node.name, "core")
        network.add_node(core)
        if node.kind == "module":
            # fp32 input port -> int8 core quantizes at the input; fp32 core -> int8 output port
            # quantizes at the output. The reverse directions dequantize.
            if graph.graph.in_degree(node.name):
                join(_port(node.name, "in"), core, node.input_elements, node.calls)
            if graph.graph.out_degree(node.name):
                join(core, _port(node.name, "out"), node.output_elements, node.calls)
        requirement = requirements[node.name]
        if requirement == "fp32":
            network.add_edge(_SOURCE, core)
        elif requirement == "int8":
            network.add_edge(core, _SINK)
        elif objective == "latency":
            fp32_ns, int8_ns = costs.nodes[node.name]
            network.add_edge(_SOURCE, core, capacity=int8_ns)
            network.add_edge(core, _SINK, capacity=fp32_ns)

    for producer, consumer in graph.graph.edges:
        a = _port(producer, "out" if graph.node(producer).kind == "module" else "core")
        b = _port(consumer, "in" if graph.node(consumer).kind == "module" else "core")
        network.add_edge(a, b)
        network.add_edge(b, a)
    return network


def solve(graph: OpGraph, requirements: dict[str, str], *, objective: Objective = "bytes",
          costs: LatencyCosts | None = None) -> Solution:
    """Return the cheapest domain assignment that meets ``requirements`` (``int8``/``fp32``/``any`` per node).

    Cost is the sum over conversions of the converted tensor's element count (``objective="bytes"``),
    1 per conversion (``objective="count"``), or the predicted nanoseconds of the conversions and of
    the free nodes in their domains (``objective="latency"``, priced by ``costs``). Ties go to fp32 as
    described in the module docstring.

    Raises:
        PlanError: the objective is unknown, ``latency`` is asked without ``costs``, or no finite cut
            exists (an int8 node joined to an fp32 node with no module boundary between them where a
            conversion could go).
    """
    network = build_network(graph, requirements, objective, costs)
    try:
        residual = boykov_kolmogorov(network, _SOURCE, _SINK)
    except nx.NetworkXUnbounded:
        raise PlanError(
            "no valid plan: an int8 node and an fp32 node are joined by functional ops only, so eager mode "
            "has no module boundary where a stub could go; make one of them 'passthrough' or 'float'"
        ) from None

    int8_side = _reaching_sink(residual)
    domains: dict[str, Domain] = {}
    for node in graph.nodes():
        domains[node.name] = "int8" if _port(node.name, "core") in int8_side else "fp32"
    conversions = conversions_of(graph, domains, lambda port: port in int8_side, network)
    cut_value = price(graph, domains, conversions, requirements, objective, costs)
    # The cut read off the labels must equal the max-flow value; anything else is a bug in this module.
    assert cut_value == residual.graph["flow_value"], (cut_value, residual.graph["flow_value"])
    return Solution(domains=domains, conversions=tuple(conversions), cost=cut_value)


def conversions_of(graph: OpGraph, domains: dict[str, str], port_is_int8, network: nx.DiGraph) -> list[Conversion]:
    """Return the conversions implied by the core domains and the side of each module port."""
    conversions = []
    for node in graph.module_nodes():
        core_int8 = domains[node.name] == "int8"
        for side, position, elements in (("in", "input", node.input_elements), ("out", "output", node.output_elements)):
            port = _port(node.name, side)
            if port not in network or port_is_int8(port) == core_int8:
                continue
            to_int8 = core_int8 if side == "in" else not core_int8
            conversions.append(Conversion("quantize" if to_int8 else "dequantize", node.name, position, elements))
    return conversions


def price(graph: OpGraph, domains: dict[str, str], conversions, requirements: dict[str, str],
          objective: Objective, costs: LatencyCosts | None = None) -> int:
    """The cut value of an assignment: what its conversions, and for ``latency`` its free nodes, cost.

    ``conversions`` are `Conversion` records or anything with ``kind``, ``module`` and ``position``.
    Element counts come from ``graph``, so a plan can be priced on a trace of other example inputs.
    """
    total = 0
    for conversion in conversions:
        if conversion.module not in graph.graph:
            continue
        node = graph.node(conversion.module)
        elements = node.input_elements if conversion.position == "input" else node.output_elements
        if objective == "count":
            total += 1
        elif objective == "latency":
            total += costs.conversion(conversion.kind, elements) * node.calls
        else:
            total += max(int(elements), 1)
    if objective == "latency":
        for name, domain in domains.items():
            if requirements.get(name) == "any" and name in costs.nodes:
                total += costs.nodes[name][domain == "int8"]
    return total


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
