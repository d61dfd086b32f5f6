"""Trace a model with torch.export into an `OpGraph` of leaf-module calls and tensor ops."""

from __future__ import annotations

import logging
import contextlib
import io
import os
import sys
import sysconfig
import time
import traceback
from collections import defaultdict
from typing import Any

import networkx as nx
import torch
from torch import nn
from torch.export.graph_signature import InputKind

from .errors import TraceError
from .graph import Node, OpGraph, TensorInfo
from .ops import IGNORED_OPS, canonical_op_name

logger = logging.getLogger(__name__)

__all__ = ["trace", "qualified_name"]


def qualified_name(cls: type) -> str:
    """Return ``module.QualName`` of a class, the form rules and plans use for module types."""
    return f"{cls.__module__}.{cls.__qualname__}"


def trace(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | Any = (),
    example_kwargs: dict[str, Any] | None = None,
) -> OpGraph:
    """Trace ``model`` with ``torch.export.export(strict=False)`` and collapse it into an `OpGraph`.

    Every aten node inside one leaf-module call becomes part of one ``module`` node named by the
    module's fqn. A leaf module is one that calls no other module during the trace (so
    `nn.MultiheadAttention`, whose ``out_proj`` is only read as weights, is a leaf). Ops outside leaf
    modules become ``op`` nodes named ``"{enclosing fqn}:{op}#{i}"`` (``"{op}#{i}"`` at the root), with
    ``i`` counting that op within its enclosing module in trace order. Only floating-point tensors are
    edges; integer and boolean tensors (token ids, masks, positions) and nodes that touch no float
    tensor are left out.

    The model is traced in eval mode (so dropout is recorded but inactive) and its training flag is
    restored afterwards. A model and inputs on ``torch.device("meta")`` trace without weights.

    Raises:
        TraceError: torch.export failed; the message names the failing module (when one was running)
            and the source line torch reported, with suggestions.
    """
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    example_kwargs = dict(example_kwargs or {})

    started = time.perf_counter()
    exported = _export(model, example_inputs, example_kwargs)
    elapsed = time.perf_counter() - started
    logger.debug("torch.export of %s took %.2f s", type(model).__name__, elapsed)

    graph = _collapse(exported, model)
    return OpGraph(graph=graph, model_type=qualified_name(type(model)), tracer="torch.export", trace_seconds=elapsed)


def _export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.export.ExportedProgram:
    """Run torch.export in eval mode, tracking which module is running so a failure can name it."""
    running: list[str] = []
    names = {id(module): fqn for fqn, module in model.named_modules()}
    handles = []
    for module in model.modules():
        fqn = names[id(module)]
        handles.append(module.register_forward_pre_hook(lambda _m, _a, fqn=fqn: running.append(fqn)))
        handles.append(module.register_forward_hook(lambda _m, _a, _o: _pop(running)))

    was_training = model.training
    model.eval()
    # On a failed guard torch.export prints the partial graph to stderr with print(). It is captured
    # here and dropped, because the TraceError names the module and source line instead.
    captured = io.StringIO()
    # torch also logs the failing op's traceback at ERROR level; the TraceError replaces both.
    noisy = [logging.getLogger(name) for name in ("torch.fx.experimental.symbolic_shapes", "torch._subclasses.fake_tensor")]
    levels = [logger.level for logger in noisy]
    for logger_ in noisy:
        logger_.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(captured):
            exported = torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # torch.export raises many unrelated types; all become one TraceError
        partial = str(getattr(exc, "partial_fx_graph", "")) or None
        rest = captured.getvalue().replace(partial, "") if partial else captured.getvalue()
        if rest.strip():
            sys.stderr.write(rest)
        raise TraceError(_describe_trace_failure(model, exc, list(running))) from exc
    finally:
        for logger_, level in zip(noisy, levels):
            logger_.setLevel(level)
        model.train(was_training)
        for handle in handles:
            handle.remove()
    sys.stderr.write(captured.getvalue())
    return exported


def _pop(running: list[str]) -> None:
    # A forward hook that returns a value replaces the module's output, so this must return None.
    if running:
        running.pop()


def _describe_trace_failure(model: nn.Module, exc: Exception, running: list[str]) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    where = [f"module {running[-1]!r} ({type(model.get_submodule(running[-1])).__name__})"] if running and running[-1] else []
    source = _user_source_line(exc)
    if source:
        where.append(source)
    location = f" in {', '.join(where)}" if where else ""
    hint = "check that the example inputs match forward()'s signature, shapes and dtypes"
    if "data-dependent" in str(exc) or "GuardOnDataDependent" in type(exc).__name__:
        hint = (
            "forward() branches on a tensor's value, which torch.export cannot follow; make the branch "
            "depend on shapes or configuration, or move it outside the model"
        )
    return f"torch.export could not trace {type(model).__name__}{location}: {type(exc).__name__}: {first_line}. To fix: {hint}."


def _user_source_line(exc: BaseException) -> str | None:
    """Return ``file:line`` of the innermost traceback frame outside torch, or ``None``."""
    skipped = (os.path.dirname(torch.__file__), sysconfig.get_paths()["stdlib"], os.path.dirname(__file__))
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if not frame.filename.startswith(skipped):
            return f"{frame.filename}:{frame.lineno} ({frame.line.strip() if frame.line else frame.name})"
    return None


def _mro_names(cls: type) -> list[str]:
    """Return the qualified names of ``cls`` and its module base classes, most derived first."""
    return [qualified_name(base) for base in cls.__mro__ if issubclass(base, nn.Module) and base is not nn.Module]


class _TypeNames(dict):
    """Qualified type name of ``model``'s submodules by fqn, each looked up on first use.

    The nodes of a large model share a few thousand module paths, so this replaces one
    ``get_submodule`` per node and stack entry by one per path.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def __missing__(self, fqn: str) -> str:
        name = self[fqn] = qualified_name(type(self.model.get_submodule(fqn)))
        return name


def _enclosing(stack: list[str], type_names: dict[str, str], skip_last: bool) -> list[tuple[str, str]]:
    """Return ``(fqn, qualified type)`` of the modules on a node's module stack, outermost first, root excluded."""
    fqns = [fqn for fqn in stack if fqn]
    if skip_last:
        fqns = fqns[:-1]
    return [(fqn, type_names[fqn]) for fqn in fqns]


def _stack_fqns(fx_node: torch.fx.Node) -> list[str]:
    stack = fx_node.meta.get("nn_module_stack") or {}
    return [path for path, _type in stack.values()]


def _float_tensors(value: Any) -> list[tuple[int | None, torch.Tensor]]:
    """Return ``(index, tensor)`` for each floating-point tensor in a node's example value."""
    if isinstance(value, torch.Tensor):
        return [(None, value)] if value.is_floating_point() else []
    if isinstance(value, (list, tuple)):
        return [(i, v) for i, v in enumerate(value) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return []


def _tensor_info(tensor: torch.Tensor) -> TensorInfo:
    return TensorInfo(shape=tuple(int(s) for s in tensor.shape), dtype=str(tensor.dtype).replace("torch.", ""))


def _collapse(exported: torch.export.ExportedProgram, model: nn.Module) -> nx.DiGraph:
    """Group aten nodes into leaf-module and op nodes and connect them by float tensors."""
    fx_nodes = list(exported.graph.nodes)
    stacks = {n: _stack_fqns(n) for n in fx_nodes if n.op == "call_function"}
    non_leaf = {fqn for fqns in stacks.values() for fqn in fqns[:-1]}
    input_kinds = {spec.arg.name: spec.kind for spec in exported.graph_signature.input_specs if hasattr(spec.arg, "name")}
    type_names = _TypeNames(model)

    graph = nx.DiGraph()
    group_of: dict[torch.fx.Node, str] = {}
    op_counters: dict[tuple[str, str], int] = defaultdict(int)
    order = 0

    def add_node(node: Node) -> None:
        if node.name not in graph:
            graph.add_node(node.name, node=node)

    # Step 1: one graph node per user input, per leaf module and per op outside leaf modules.
    for fx_node in fx_nodes:
        order += 1
        if fx_node.op == "placeholder":
            if input_kinds.get(fx_node.name) == InputKind.USER_INPUT:
                name = f"input:{fx_node.name}"
                add_node(Node(name=name, kind="input", fqn="", order=order))
            else:
                name = f"constant:{fx_node.name}"
                add_node(Node(name=name, kind="constant", fqn="", order=order))
            group_of[fx_node] = name
        elif fx_node.op == "call_function":
            op = canonical_op_name(fx_node.target)
            if op in IGNORED_OPS:
                continue
            fqns = stacks[fx_node]
            innermost = fqns[-1] if fqns else ""
            if innermost and innermost not in non_leaf:
                if innermost not in graph:
                    module = model.get_submodule(innermost)
                    add_node(Node(name=innermost, kind="module", fqn=innermost, order=order,
                                  module_type=type_names[innermost], type_mro=_mro_names(type(module)),
                                  enclosing=_enclosing(fqns, type_names, skip_last=True)))
                graph.nodes[innermost]["node"].aten_ops.append(op)
                group_of[fx_node] = innermost
            else:
                index = op_counters[(innermost, op)]
                op_counters[(innermost, op)] += 1
                name = f"{innermost}:{op}#{index}" if innermost else f"{op}#{index}"
                add_node(Node(name=name, kind="op", fqn=innermost, order=order, op=op, aten_ops=[op],
                              enclosing=_enclosing(fqns, type_names, skip_last=False)))
                group_of[fx_node] = name
    add_node(Node(name="output", kind="output", fqn="", order=order + 1))

    # Step 2: float tensors that cross group borders become edges.
    call_outputs = _call_outputs(fx_nodes)
    leaf_groups = {name for name, data in graph.nodes(data=True) if data["node"].kind == "module"}
    edge_tensors: dict[tuple[str, str], dict[tuple[str, int | None], TensorInfo]] = defaultdict(dict)
    for fx_node in fx_nodes:
        consumer = "output" if fx_node.op == "output" else group_of.get(fx_node)
        if consumer is None:
            continue
        for arg in _flatten_node_args(fx_node):
            arg = _through_inner_aliases(arg, consumer, group_of, call_outputs, leaf_groups)
            producer = group_of.get(arg)
            if producer is None or producer == consumer:
                continue
            if graph.nodes[producer]["node"].kind == "constant" and graph.nodes[consumer]["node"].kind == "module":
                continue  # a parameter read inside a leaf module is part of that module, not an activation
            tensors = _float_tensors(arg.meta.get("val"))
            if fx_node.op == "call_function" and canonical_op_name(fx_node.target) == "getitem" and len(tensors) > 1:
                tensors = [(i, t) for i, t in tensors if i == fx_node.args[1]]
            for index, tensor in tensors:
                edge_tensors[(producer, consumer)][(arg.name, index)] = _tensor_info(tensor)
    for (producer, consumer), tensors in edge_tensors.items():
        infos = list(tensors.values())
        graph.add_edge(producer, consumer, ids=list(tensors), tensors=infos, elements=sum(i.elements for i in infos))

    # Step 3: port sizes count each distinct tensor once, then nodes that touch no float tensor go.
    for name, data in graph.nodes(data=True):
        node: Node = data["node"]
        inputs = {key: info for _, _, e in graph.in_edges(name, data=True) for key, info in zip(e["ids"], e["tensors"])}
        outputs = {key: info for _, _, e in graph.out_edges(name, data=True) for key, info in zip(e["ids"], e["tensors"])}
        node.input_elements = sum(info.elements for info in inputs.values())
        node.output_elements = sum(info.elements for info in outputs.values())
        if outputs:
            node.output_shape = next(iter(outputs.values())).shape
    graph.remove_nodes_from([n for n in list(graph) if graph.degree(n) == 0 and n != "output"])
    calls = _count_calls(stacks)
    for _, data in graph.nodes(data=True):
        if data["node"].kind == "module":
            data["node"].calls = max(1, calls.get(data["node"].fqn, 0))
    return graph


# Ops that return their input object itself when nothing changes (``x.to(torch.float32)`` on a float32
# tensor, ``contiguous`` on a contiguous one, dropout in eval mode). torch.export then maps every later
# use of that Python object to the op's node, even uses outside the module that ran the op.
_ALIAS_OPS = frozenset({"to", "alias", "contiguous", "dropout", "type_as"})


def _call_outputs(fx_nodes: list[torch.fx.Node]) -> set[torch.fx.Node]:
    """Return the last node of each module call, the one a call most likely returns."""
    last: dict[str, torch.fx.Node] = {}
    for fx_node in fx_nodes:
        stack = fx_node.meta.get("nn_module_stack") if fx_node.op == "call_function" else None
        if stack:
            last[list(stack.keys())[-1]] = fx_node
    return set(last.values())


def _through_inner_aliases(arg, consumer: str, group_of: dict, call_outputs: set, leaf_groups: set) -> torch.fx.Node:
    """Follow an aliasing op back to its input when the consumer reads the object that entered a module.

    RMSNorm's ``hidden_states.to(torch.float32)`` returns the residual tensor itself, so the residual
    add appears to read the norm's node. An aliasing op that is not the last op of its module call
    did not produce the call's output, so a reader outside that module is reading the op's input.
    Only ops inside leaf modules are followed: an op node outside them is its own graph node, so a read
    of it is already attributed to the right place.
    """
    while (
        isinstance(arg, torch.fx.Node)
        and arg.op == "call_function"
        and arg not in call_outputs
        and group_of.get(arg) not in (None, consumer)
        and group_of.get(arg) in leaf_groups
        and canonical_op_name(arg.target) in _ALIAS_OPS
        and arg.args
        and isinstance(arg.args[0], torch.fx.Node)
        and group_of.get(arg.args[0]) != group_of.get(arg)
    ):
        arg = arg.args[0]
    return arg


def _count_calls(stacks: dict[torch.fx.Node, list[str]]) -> dict[str, int]:
    """Count the distinct calls of each innermost module from the per-call keys of ``nn_module_stack``."""
    keys: dict[str, set[str]] = defaultdict(set)
    for fx_node, fqns in stacks.items():
        if fqns:
            keys[fqns[-1]].add(list(fx_node.meta["nn_module_stack"].keys())[-1])
    return {fqn: len(call_keys) for fqn, call_keys in keys.items()}


def _flatten_node_args(fx_node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((fx_node.args, fx_node.kwargs), found.append)
    return found
