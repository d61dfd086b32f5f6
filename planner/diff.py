"""Compare two plans: which nodes changed domain, which stubs and fusions appeared or went, and the cost.

A diff only reads the two plans. It reports and does not judge: neither side is taken as correct.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from .plan import Boundary, Plan

__all__ = [
    "QConfigChange","diff_plans", "render_diff", "PlanDiff", "DIFF_FORMATS"]

DiffFormat = Literal["text", "json", "markdown"]
DIFF_FORMATS: tuple[str, ...] = ("text", "json", "markdown")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlanSide(_Record):
    """The label, model, rules and objective of one side of a diff."""

    label: str
    model: str
    rules: str
    objective: str


class DomainChange(_Record):
    """A node present in both plans whose domain differs, with the rule that decided it on each side."""

    name: str
    kind: str
    before: str
    after: str
    rule_before: str | None
    rule_after: str | None


class BoundaryChange(_Record):
    """A stub at the same module and position in both plans whose element count or qconfig differs."""

    kind: Literal["quantize", "dequantize"]
    module: str
    position: Literal["input", "output"]
    elements_before: int
    elements_after: int
    qconfig_before: str
    qconfig_after: str


class QConfigChange(_Record):
    """A module whose qconfig preset differs between the plans (``None`` where it has none)."""

    module: str
    before: str | None
    after: str | None


class FusionRecord(_Record):
    modules: list[str]
    types: list[str]


class Change(_Record):
    """One total before and after. ``difference`` is after minus before."""

    before: int
    after: int
    difference: int


class PlanDiff(_Record):
    """The differences between plan ``before`` and plan ``after``. The lists keep the plans' node order."""

    before: PlanSide
    after: PlanSide
    domain_changes: list[DomainChange]
    boundaries_added: list[Boundary]
    boundaries_removed: list[Boundary]
    boundaries_changed: list[BoundaryChange]
    fusions_added: list[FusionRecord]
    fusions_removed: list[FusionRecord]
    qconfig_changes: list[QConfigChange] = []
    nodes_only_before: list[str]
    nodes_only_after: list[str]
    totals: dict[str, Change]  # cost, conversions, converted_elements
    notes: list[str]

    @property
    def identical(self) -> bool:
        """True when no node, stub, fusion or total differs."""
        return not (self.domain_changes or self.boundaries_added or self.boundaries_removed or self.boundaries_changed
                    or self.qconfig_changes or self.fusions_added or self.fusions_removed or self.nodes_only_before or self.nodes_only_after
                    or any(c.difference for c in self.totals.values()))


def diff_plans(before: Plan, after: Plan, *, labels: tuple[str, str] = ("before", "after")) -> PlanDiff:
    """Compare two plans node by node, stub by stub and fusion by fusion.

    Nodes and stubs are matched by name (fqn, or ``fqn:op#index`` for op nodes), so plans of one
    architecture under different rules or objectives compare directly. ``labels`` name the two sides
    in the report (the CLI passes the file names).

    Example:
        >>> import torch, planner
        >>> from planner.diff import diff_plans
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> a = planner.plan(model, (torch.randn(2, 4),))
        >>> b = planner.plan(model, (torch.randn(2, 4),), rules=planner.RuleSet(
        ...     name="all-float", extends=("default",),
        ...     rules=(planner.Rule(match=planner.Match(fqn="*"), action="float"),)))
        >>> [(c.name, c.before, c.after) for c in diff_plans(a, b).domain_changes]
        [('0', 'int8', 'fp32')]
    """
    domain_changes = [
        DomainChange(name=name, kind=node.kind, before=node.domain, after=after.nodes[name].domain,
                     rule_before=node.rule, rule_after=after.nodes[name].rule)
        for name, node in before.nodes.items()
        if name in after.nodes and node.domain != after.nodes[name].domain
    ]

    def key(b: Boundary) -> tuple[str, str, str]:
        return (b.kind, b.module, b.position)

    old = {key(b): b for b in before.boundaries}
    new = {key(b): b for b in after.boundaries}
    removed = [b.model_copy() for k, b in old.items() if k not in new]
    added = [b.model_copy() for k, b in new.items() if k not in old]
    changed = [
        BoundaryChange(kind=b.kind, module=b.module, position=b.position, elements_before=b.elements,
                       elements_after=new[k].elements, qconfig_before=b.qconfig, qconfig_after=new[k].qconfig)
        for k, b in old.items()
        if k in new and (b.elements, b.qconfig) != (new[k].elements, new[k].qconfig)
    ]

    old_fusions = [(tuple(f.modules), tuple(f.types)) for f in before.fusions]
    new_fusions = [(tuple(f.modules), tuple(f.types)) for f in after.fusions]
    fusions_removed = [FusionRecord(modules=list(m), types=list(t)) for m, t in old_fusions if (m, t) not in new_fusions]
    fusions_added = [FusionRecord(modules=list(m), types=list(t)) for m, t in new_fusions if (m, t) not in old_fusions]

    qconfig_changes = [
        QConfigChange(module=name, before=before.qconfigs.get(name), after=after.qconfigs.get(name))
        for name in dict.fromkeys([*before.qconfigs, *after.qconfigs])
        if name in before.nodes and name in after.nodes and before.qconfigs.get(name) != after.qconfigs.get(name)
    ]

    totals = {
        field: Change(before=getattr(before.stats, field), after=getattr(after.stats, field),
                      difference=getattr(after.stats, field) - getattr(before.stats, field))
        for field in ("cost", "conversions", "converted_elements")
    }
    notes = []
    if before.model != after.model:
        notes.append(f"the plans are of different models ({before.model} and {after.model}); only nodes with the same name are compared")
    if before.objective != after.objective:
        notes.append(f"the objectives differ ({before.objective} and {after.objective}), so the costs are in different units")
    if before.example_inputs != after.example_inputs:
        notes.append("the example input shapes differ, so element counts differ even where the stubs are the same")

    return PlanDiff(
        before=_side(before, labels[0]), after=_side(after, labels[1]),
        domain_changes=domain_changes, boundaries_added=added, boundaries_removed=removed, boundaries_changed=changed,
        fusions_added=fusions_added, fusions_removed=fusions_removed, qconfig_changes=qconfig_changes,
        nodes_only_before=[n for n in before.nodes if n not in after.nodes],
        nodes_only_after=[n for n in after.nodes if n not in before.nodes],
        totals=totals, notes=notes,
    )


def _side(plan: Plan, label: str) -> PlanSide:
    return PlanSide(label=label, model=plan.model, rules=plan.rules, objective=plan.objective)


_TOTAL_NAMES = {"cost": "cut cost", "conversions": "conversions", "converted_elements": "converted elements"}


def render_diff(diff: PlanDiff, format: DiffFormat = "text") -> str:
    """Return the diff as ``text``, ``markdown`` or ``json``.

    Raises:
        ValueError: ``format`` is not one of `DIFF_FORMATS`.
    """
    if format == "json":
        return diff.model_dump_json(indent=2)
    if format == "text":
        return "\n".join(_text(diff))
    if format == "markdown":
        return "\n".join(_markdown(diff))
    raise ValueError(f"unknown diff format {format!r}; accepted: {', '.join(DIFF_FORMATS)}")


def _stub(kind: str) -> str:
    return "QuantStub" if kind == "quantize" else "DeQuantStub"


def _rule(rule: str | None) -> str:
    return rule or "no rule"


def _signed(value: int) -> str:
    return f"{value:+d}"


def _describe_side(side: PlanSide) -> str:
    return f"{side.label}: {side.model.rsplit('.', 1)[-1]}, rules {side.rules}, objective {side.objective}"


def _text(diff: PlanDiff) -> list[str]:
    lines = [f"plan diff: {diff.before.label} → {diff.after.label}",
             f"  {_describe_side(diff.before)}", f"  {_describe_side(diff.after)}"]
    lines += [f"  note: {note}" for note in diff.notes]
    if diff.identical:
        lines.append("  the plans place the same stubs and fusions and give every node the same domain")

    def section(title: str, entries: list[str]) -> None:
        lines.extend(["", f"{title} ({len(entries)})"])
        lines.extend(f"  {entry}" for entry in entries or ["none"])

    section("Domain changes", [f"{c.name}: {c.before} → {c.after} (rule {_rule(c.rule_before)} → {_rule(c.rule_after)})"
                               for c in diff.domain_changes])
    section("Stubs gone", [f"{_stub(b.kind)} at {b.position} of {b.module}: {b.elements} elements, qconfig {b.qconfig}"
                           for b in diff.boundaries_removed])
    section("Stubs added", [f"{_stub(b.kind)} at {b.position} of {b.module}: {b.elements} elements, qconfig {b.qconfig}"
                            for b in diff.boundaries_added])
    if diff.boundaries_changed:
        section("Stubs changed", [f"{_stub(b.kind)} at {b.position} of {b.module}: {b.elements_before} → {b.elements_after} "
                                  f"elements, qconfig {b.qconfig_before} → {b.qconfig_after}" for b in diff.boundaries_changed])
    section("Fusions gone", [f"{' + '.join(f.types)}: {', '.join(f.modules)}" for f in diff.fusions_removed])
    section("Fusions added", [f"{' + '.join(f.types)}: {', '.join(f.modules)}" for f in diff.fusions_added])
    if diff.qconfig_changes:
        section("qconfig changes", [f"{c.module}: {c.before or 'none'} → {c.after or 'none'}" for c in diff.qconfig_changes])
    if diff.nodes_only_before or diff.nodes_only_after:
        section(f"Nodes only in {diff.before.label}", diff.nodes_only_before)
        section(f"Nodes only in {diff.after.label}", diff.nodes_only_after)
    lines.extend(["", "Totals"])
    for field, change in diff.totals.items():
        lines.append(f"  {_TOTAL_NAMES[field]}: {change.before} → {change.after} ({_signed(change.difference)})")
    return lines


def _markdown(diff: PlanDiff) -> list[str]:
    out = [f"# Plan diff: `{diff.before.label}` → `{diff.after.label}`", "",
           f"- {_describe_side(diff.before)}", f"- {_describe_side(diff.after)}"]
    out += [f"- note: {note}" for note in diff.notes]
    if diff.identical:
        out += ["", "The plans place the same stubs and fusions and give every node the same domain."]

    def table(title: str, header: list[str], rows: list[list[str]], counted: bool = True) -> None:
        out.extend(["", f"## {title} ({len(rows)})" if counted else f"## {title}", ""])
        if not rows:
            out.append("None.")
            return
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        out.extend("| " + " | ".join(row) + " |" for row in rows)

    table("Domain changes", ["node", "before", "after", "rule before", "rule after"],
          [[f"`{c.name}`", c.before, c.after, _rule(c.rule_before), _rule(c.rule_after)] for c in diff.domain_changes])
    stub_header = ["stub", "module", "position", "elements", "qconfig"]
    table("Stubs gone", stub_header, [[_stub(b.kind), f"`{b.module}`", b.position, str(b.elements), b.qconfig]
                                      for b in diff.boundaries_removed])
    table("Stubs added", stub_header, [[_stub(b.kind), f"`{b.module}`", b.position, str(b.elements), b.qconfig]
                                       for b in diff.boundaries_added])
    if diff.boundaries_changed:
        table("Stubs changed", ["stub", "module", "position", "elements", "qconfig"],
              [[_stub(b.kind), f"`{b.module}`", b.position, f"{b.elements_before} → {b.elements_after}",
                f"{b.qconfig_before} → {b.qconfig_after}"] for b in diff.boundaries_changed])
    table("Fusions gone", ["types", "modules"], [[" + ".join(f.types), ", ".join(f"`{m}`" for m in f.modules)]
                                                 for f in diff.fusions_removed])
    table("Fusions added", ["types", "modules"], [[" + ".join(f.types), ", ".join(f"`{m}`" for m in f.modules)]
                                                  for f in diff.fusions_added])
    if diff.nodes_only_before or diff.nodes_only_after:
        table("Nodes in one plan only", ["node", "only in"],
              [[f"`{n}`", diff.before.label] for n in diff.nodes_only_before]
              + [[f"`{n}`", diff.after.label] for n in diff.nodes_only_after])
    table("Totals", ["total", "before", "after", "difference"],
          [[_TOTAL_NAMES[field], str(c.before), str(c.after), _signed(c.difference)] for field, c in diff.totals.items()], counted=False)
    out.append("")
    return out
