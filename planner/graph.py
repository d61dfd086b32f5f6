"""The operator graph that planning works on: leaf-module calls and tensor ops joined by float tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal

import networkx as nx

NodeKind = Literal["module", "op", "input", "output", "constant"]


@dataclass(frozen=True)
class TensorInfo:
    """Example shape and dtype of one float tensor that flows along an edge."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def elements(self) -> int:
        count = 1
        for size in self.shape:
            count *= int(size)
        return count


@dataclass
class Node:
    """One vertex of the operator graph.

    A ``module`` node stands for every call of one leaf module (a module reused at several call sites
    is one node, because eager-mode surgery can only wrap the module, not one of its calls). An ``op``
    node is one tensor op outside any leaf module. ``input``, ``output`` and ``constant`` nodes are the
    model's float inputs, its outputs, and float parameters or buffers read by op nodes.
    """

    name: str
    kind: NodeKind
    fqn: str
    order: int
    op: str | None = None
    module_type: str | None = None
    calls: int = 1
    input_elements: int = 0
    output_elements: int = 0
    output_shape: tuple[int, ...] | None = None
    aten_ops: list[str] = field(default_factory=list)
    type_mro: list[str] = field(default_factory=list)
    enclosing: list[tuple[str, str]] = field(default_factory=list)

    @property
    def rank(self) -> int | None:
        """Rank of the node's (first) float output tensor, ``None`` when it has none."""
        return len(self.output_shape) if self.output_shape is not None else None

    @property
    def type_name(self) -> str | None:
        """Short class name of a module node (``Linear``), ``None`` for other nodes."""
        return self.module_type.rsplit(".", 1)[-1] if self.module_type else None


@dataclass
class OpGraph:
    """A traced model: a `networkx.DiGraph` whose nodes carry a `Node` under the ``"node"`` key.

    Each edge ``u -> v`` means that ``v`` reads float tensors produced by ``u``; its ``"tensors"``
    attribute lists their `TensorInfo`, and ``"elements"`` is their total element count.
    """

    graph: nx.DiGraph
    model_type: str
    tracer: str
    trace_seconds: float

    def node(self, name: str) -> Node:
        try:
            return self.graph.nodes[name]["node"]
        except KeyError:
            raise KeyError(f"no node named {name!r} in the traced graph") from None

    def nodes(self, kind: NodeKind | None = None) -> Iterator[Node]:
        """Yield nodes in trace order, optionally only those of one kind."""
        for node in sorted((data["node"] for _, data in self.graph.nodes(data=True)), key=lambda n: n.order):
            if kind is None or node.kind == kind:
                yield node

    def module_nodes(self) -> Iterator[Node]:
        return self.nodes("module")

    def predecessors(self, name: str) -> list[str]:
        return sorted(self.graph.predecessors(name), key=lambda n: self.node(n).order)

    def successors(self, name: str) -> list[str]:
        return sorted(self.graph.successors(name), key=lambda n: self.node(n).order)

    def edge_elements(self, u: str, v: str) -> int:
        return self.graph.edges[u, v]["elements"]

    def __len__(self) -> int:
        return self.graph.number_of_nodes()
