"""Explain one node of a plan: the candidate rules in precedence order, its neighbours and its stubs."""

from __future__ import annotations

import difflib
import json

from .errors import PlanError
from .plan import Plan
from .report import _fixed_neighbour

__all__ = ["explain"]


def explain(plan: Plan, name: str) -> str:
    """Return a one-screen explanation of node ``name`` (a module fqn or an op node name) in ``plan``.

    Raises:
        PlanError: the plan has no such node; the message suggests close names.
    """
    node = plan.nodes.get(name)
    if node is None:
        close = difflib.get_close_matches(name, list(plan.nodes), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; run `qat-planner plan MODEL --format json` to list node names"
        raise PlanError(f"no node named {name!r} in the plan of {plan.model}{hint}")

    what = f"module {node.type}" if node.kind == "module" else f"op {node.op}"
    lines = [f"{name}: {what}", f"  domain: {node.domain} (rules require {node.requirement})"]
    if node.requirement == "any":
        lines.append(f"  why {node.domain}: {_passthrough_reason(plan, name)}")
    if name in plan.qconfigs:
        lines.append(f"  qconfig: {plan.qconfigs[name]}")
    if node.calls > 1:
        lines.append(f"  called {node.calls} times; all calls share one domain and one set of stubs")

    lines.append("  candidate rules, in precedence order (priority, then specificity, then the later rule):")
    candidates = ([node.rule] if node.rule else []) + node.overridden
    if node.reason.startswith("fused into"):
        # A fused member follows its chain's head; the head's rule is recorded as the deciding rule.
        lines.append(f"    WON  fusion: {node.reason}, decided by the head's rule {node.rule}")
        candidates = node.overridden
        verdicts = ["lost"] * len(candidates)
    else:
        verdicts = ["WON "] + ["lost"] * (len(candidates) - 1)
    if not candidates and not node.reason.startswith("fused into"):
        lines.append("    none: no rule matches this node, so it stays fp32")
    for origin, verdict in zip(candidates, verdicts):
        summary = plan.rule_table.get(origin)
        if summary is None:
            lines.append(f"    {verdict} {origin}")
            continue
        match = json.dumps(summary.match, separators=(", ", ": "))
        lines.append(f"    {verdict} {origin}: {summary.action} {match} (priority {summary.priority}, specificity {summary.specificity})")
        if summary.reason:
            lines.append(f"         reason: {summary.reason}")
    if node.rule and node.reason and (plan.rule_table.get(node.rule) is None or plan.rule_table[node.rule].reason != node.reason):
        lines.append(f"  decision: {node.reason}")
    if node.note:
        lines.append(f"  note: {node.note}")
    for conflict in plan.conflicts:
        if conflict.startswith(f"{name}: "):
            lines.append(f"  conflict: {conflict[len(name) + 2:]}")

    lines.append("  neighbours:")
    producers = [e.source for e in plan.edges if e.target == name]
    consumers = [e.target for e in plan.edges if e.source == name]
    for label, names in (("from", producers), ("to", consumers)):
        for other in names:
            other_node = plan.nodes[other]
            kind = other_node.type.rsplit(".", 1)[-1] if other_node.type else (other_node.op or other_node.kind)
            lines.append(f"    {label} {other} ({kind}): {other_node.domain}")
    if not producers and not consumers:
        lines.append("    none")

    boundaries = plan.boundaries_of(name)
    if boundaries:
        for boundary in boundaries:
            stub = "QuantStub" if boundary.kind == "quantize" else "DeQuantStub"
            lines.append(f"  stub: {stub} at its {boundary.position}, {boundary.elements} elements, qconfig {boundary.qconfig}")
    else:
        lines.append("  stubs: none on this node")
    fused = next((g for g in plan.fusions if name in g.modules), None)
    if fused:
        lines.append(f"  fused: {' + '.join(fused.types)} ({', '.join(fused.modules)})")
    substituted = next((s for s in plan.substitutions if s.module == name), None)
    if substituted:
        lines.append(f"  substituted: {substituted.source} -> {substituted.target}")
    return "\n".join(lines)


def _passthrough_reason(plan: Plan, name: str) -> str:
    """Explain the domain of a passthrough node: the nearest rule-fixed node it must agree with."""
    domain = plan.nodes[name].domain
    if plan.objective == "latency":
        other = "int8" if domain == "fp32" else "fp32"
        return (f"the latency cut priced it lower in {domain}: its predicted time there, with the conversions "
                f"that placement needs, is below its time in {other} (the plan's latency line gives the split)")
    for position, verb in (("output", "leads to"), ("input", "comes from")):
        fixed = _fixed_neighbour(plan, name, position)
        if fixed is None or fixed == name:
            continue
        node = plan.nodes[fixed]
        reason = f"it {verb} {fixed}, which is {domain} by {node.rule or node.reason}"
        if plan.nodes[name].kind == "op":
            return f"{reason}; an op has no module boundary where a stub could go, so it shares that domain"
        return (f"{reason}; converting on this module's other side instead would cost at least as much "
                "(on a tie the plan keeps more nodes fp32)")
    return "either domain costs the same here, and ties go to fp32" if domain == "fp32" else "int8 is cheaper here"
