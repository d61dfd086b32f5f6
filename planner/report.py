"""Render a Plan as text, Markdown or JSON. Reports only read the plan; they never recompute decisions."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Literal

from rich.markup import escape
from rich.text import Text

from .plan import Boundary, Plan

__all__ = ["render", "FORMATS"]

Format = Literal["text", "json", "markdown"]
FORMATS: tuple[str, ...] = ("text", "json", "markdown")

# A repeated block is a module path with a numeric index after a container name: "transformer.h.3.",
# "model.layers.10.", "encoder.layer.0.", "blocks.2.".
_BLOCK = re.compile(r"^(?P<prefix>(?:.*\.)?(?:h|layers|layer|blocks|block))\.(?P<index>\d+)(?=[.:]|$)")

_OP_SYMBOLS = {"add": "+", "mul": "*", "matmul": "@"}
_HIDDEN_OPS = {"getitem", "alias", "to"}


@dataclass
class _Block:
    prefix: str
    index: int
    names: list[str]

    @property
    def label(self) -> str:
        return f"{self.prefix}.{self.index}"


def render(plan: Plan, format: Format = "text", *, markup: bool = False) -> str:
    """Return the plan as a report in ``format`` (``text``, ``markdown`` or ``json``).

    ``markup=True`` keeps rich markup (colours) in the text report; the CLI uses it for terminals.

    Raises:
        ValueError: ``format`` is not one of `FORMATS`.
    """
    if format == "json":
        return plan.model_dump_json(indent=2)
    if format == "text":
        lines = _text_lines(plan)
        text = "\n".join(lines)
        return text if markup else Text.from_markup(text).plain
    if format == "markdown":
        return _markdown(plan)
    raise ValueError(f"unknown report format {format!r}; accepted: {', '.join(FORMATS)}")


# ---------------------------------------------------------------- structure shared by text and Markdown


def _blocks(plan: Plan) -> tuple[list[str], list[_Block], list[str]]:
    """Split node names (in trace order) into those before the blocks, the blocks, and those after."""
    head: list[str] = []
    tail: list[str] = []
    blocks: dict[tuple[str, int], _Block] = {}
    for name, node in plan.nodes.items():
        if node.kind in ("input", "output", "constant"):
            continue
        found = _BLOCK.match(name) or _BLOCK.match(node.fqn)
        if found:
            key = (found["prefix"], int(found["index"]))
            blocks.setdefault(key, _Block(found["prefix"], int(found["index"]), [])).names.append(name)
        elif blocks:
            tail.append(name)
        else:
            head.append(name)
    ordered = sorted(blocks.values(), key=lambda b: (b.prefix, b.index))
    return head, ordered, tail


def _relative(name: str, block: _Block) -> str:
    return name[len(block.label) + 1:] if name.startswith(block.label) else name


def _signature(plan: Plan, block: _Block) -> tuple:
    """What must be equal for two blocks to share one line of the report."""
    items = []
    for name in block.names:
        node = plan.nodes[name]
        stubs = tuple((b.kind, b.position, b.qconfig) for b in plan.boundaries_of(name))
        items.append((_relative(name, block), node.domain, node.type, node.op, stubs))
    return tuple(items)


def _fold(plan: Plan, blocks: list[_Block]) -> list[list[_Block]]:
    """Group consecutive blocks of one container whose plans are identical."""
    groups: list[list[_Block]] = []
    for block in blocks:
        if groups and groups[-1][-1].prefix == block.prefix and _signature(plan, groups[-1][-1]) == _signature(plan, block):
            groups[-1].append(block)
        else:
            groups.append([block])
    return groups


def _group_label(group: list[_Block]) -> str:
    first, last = group[0], group[-1]
    short = first.prefix.rsplit(".", 1)[-1]
    if len(group) == 1:
        return f"{short}.{first.index}"
    return f"{short}.{first.index}–{short}.{last.index}"


def _path_tokens(plan: Plan, names: list[str], strip: str = "", color: bool = True) -> list[str]:
    """Render nodes in trace order, each module with its stubs, runs of ops folded into one token."""
    tokens: list[str] = []
    run: list[str] = []
    run_domain = None

    def flush() -> None:
        nonlocal run, run_domain
        if run:
            shown = [op for op in dict.fromkeys(run) if op not in _HIDDEN_OPS] or run[:1]
            body = ", ".join(_OP_SYMBOLS.get(op, op) for op in shown)
            tokens.append(_paint(f"({body})", run_domain, color))
        run, run_domain = [], None

    for name in names:
        node = plan.nodes[name]
        if node.kind == "op":
            if run and run_domain != node.domain:
                flush()
            run.append(node.op or "?")
            run_domain = node.domain
            continue
        flush()
        label = name[len(strip):] if strip and name.startswith(strip) else name
        before = "".join(_stub_mark(b, color) + " " for b in plan.boundaries_of(name) if b.position == "input")
        after = "".join(" " + _stub_mark(b, color) for b in plan.boundaries_of(name) if b.position == "output")
        tokens.append(f"{before}{_paint(label, node.domain, color)}{after}")
    flush()
    return tokens


def _paint(text: str, domain: str | None, color: bool) -> str:
    if not color:
        return text
    style = "bold green" if domain == "int8" else "cyan"
    return f"[{style}]{escape(text)}[/]"


def _stub_mark(boundary: Boundary, color: bool) -> str:
    mark = "[Q]" if boundary.kind == "quantize" else "[DQ]"
    return f"[bold yellow]{escape(mark)}[/]" if color else mark


def _why(plan: Plan, boundary: Boundary) -> str:
    """Explain a stub: the module's own domain and what fixes the domain on the other side of it."""
    node = plan.nodes[boundary.module]
    neighbours = _neighbours(plan, boundary.module, boundary.position)
    other = next((n for n in neighbours if plan.nodes[n].domain != node.domain), None)
    substituted = next((s for s in plan.substitutions if s.module == boundary.module), None)
    kind = f"{_short_type(node.type)} (as {_short_type(substituted.target)})" if substituted else _short_type(node.type)
    own = f"{kind} is {node.domain} ({node.rule or 'no rule'})"
    if other is None:
        return f"{own}; the model {'input' if boundary.position == 'input' else 'output'} is fp32"
    side = "producer" if boundary.position == "input" else "consumer"
    text = f"{own}; {side} {_describe(plan, other)} is {plan.nodes[other].domain}"
    fixed = _fixed_neighbour(plan, other, boundary.position)
    if fixed is None or fixed == other:
        other_node = plan.nodes[other]
        return f"{text} ({other_node.rule or other_node.reason})"
    return f"{text} because it {'comes from' if boundary.position == 'input' else 'leads to'} {_describe(plan, fixed)} ({plan.nodes[fixed].rule or plan.nodes[fixed].reason})"


def _describe(plan: Plan, name: str) -> str:
    node = plan.nodes[name]
    what = _short_type(node.type) if node.kind == "module" else (node.op or node.kind)
    return f"{what} {name}" if what != name else name


def _fixed_neighbour(plan: Plan, start: str, position: str) -> str | None:
    """Follow passthrough nodes of one domain away from a stub to the first node a rule fixes."""
    domain = plan.nodes[start].domain
    queue, seen = [start], {start}
    while queue:
        current = queue.pop(0)
        if plan.nodes[current].requirement != "any":
            return current
        for name in _neighbours(plan, current, position):
            if name not in seen and plan.nodes[name].domain == domain:
                seen.add(name)
                queue.append(name)
    return None


def _neighbours(plan: Plan, name: str, position: str) -> list[str]:
    if position == "input":
        return [e.source for e in plan.edges if e.target == name]
    return [e.target for e in plan.edges if e.source == name]


def _short_type(qualified: str | None) -> str:
    return qualified.rsplit(".", 1)[-1] if qualified else "?"


def _fp32_summary(plan: Plan) -> list[tuple[str, int, str]]:
    """Count what stays fp32 by a rule, per module type or op and deciding rule, with that rule's reason."""
    counts: Counter[tuple[str, str]] = Counter()
    reasons: dict[tuple[str, str], str] = {}
    for node in plan.nodes.values():
        if node.domain != "fp32" or node.kind not in ("module", "op") or node.requirement != "fp32":
            continue
        key = (_short_type(node.type) if node.kind == "module" else f"op {node.op}", node.rule or "no rule")
        counts[key] += 1
        reasons.setdefault(key, f"{node.reason} [{node.rule or 'no rule matches'}]")
    ordered = sorted(counts, key=lambda k: (-counts[k], k))
    return [(what, counts[(what, rule)], reasons[(what, rule)]) for what, rule in ordered]


def _substitution_summary(plan: Plan) -> list[tuple[str, str, int]]:
    counts: Counter[tuple[str, str]] = Counter()
    for record in plan.substitutions:
        target = _short_type(record.target)
        if record.kwargs:
            target += "(" + ", ".join(f"{k}={v!r}" for k, v in record.kwargs.items()) + ")"
        counts[(_short_type(record.source), target)] += 1
    return [(source, target, count) for (source, target), count in sorted(counts.items())]


def _cost_text(plan: Plan) -> str:
    unit = "converted elements" if plan.objective == "bytes" else "conversions"
    return f"cut cost {plan.stats.cost} {unit} (objective {plan.objective})"


def _example_shapes(plan: Plan) -> str:
    return ", ".join(f"{name} {shape}" for name, shape in plan.example_inputs.items()) or "none"


# ---------------------------------------------------------------- text


def _text_lines(plan: Plan) -> list[str]:
    head, blocks, tail = _blocks(plan)
    lines = [
        f"[bold]qat-planner plan[/] for {escape(_short_type(plan.model))} ({escape(plan.model)})",
        f"rules: {escape(plan.rules)}   objective: {plan.objective}   example inputs: {escape(_example_shapes(plan))}",
        "",
        "[bold]Data path[/] ([bold green]int8[/], [cyan]fp32[/]; [bold yellow]\\[Q][/] QuantStub, [bold yellow]\\[DQ][/] DeQuantStub)",
    ]
    if head:
        lines.append(("  before the blocks: " if blocks else "  ") + " → ".join(_path_tokens(plan, head)))
    for group in _fold(plan, blocks):
        first = group[0]
        note = ": same plan" if len(group) > 1 else ""
        lines.append(f"  {_group_label(group)}{note}")
        lines.append("    " + " → ".join(_path_tokens(plan, first.names, strip=first.label + ".")))
    if tail:
        lines.append("  after the blocks: " + " → ".join(_path_tokens(plan, tail)))

    lines += ["", "[bold]Stubs[/]" + (" (blocks shown once per group of identical blocks)" if blocks else "")]
    shown = _representative_boundaries(plan, head, blocks, tail)
    for boundary, scope in shown:
        kind = "QuantStub  " if boundary.kind == "quantize" else "DeQuantStub"
        lines.append(
            f"  {kind} at {boundary.position:6} of {escape(boundary.module)}{scope}: {boundary.elements} elements, "
            f"qconfig {boundary.qconfig}"
        )
        lines.append(f"      why: {escape(_why(plan, boundary))}")

    lines += ["", "[bold]Fusion[/]"]
    if plan.fusions:
        for group in plan.fusions:
            lines.append(f"  fused {' + '.join(group.types)}: {escape(', '.join(group.modules))}")
    for reason in plan.not_fused:
        lines.append(f"  nothing fused: {escape(reason)}")

    lines += ["", "[bold]Substitutions[/]"]
    for source, target, count in _substitution_summary(plan) or []:
        lines.append(f"  {count} × {escape(source)} → {escape(target)}")
    if not plan.substitutions:
        lines.append("  none")

    lines += ["", "[bold]Kept fp32 by rule[/]"]
    for key, count, reason in _fp32_summary(plan):
        lines.append(f"  {count} × {escape(key)}: {escape(reason)}")
    for note in plan.notes:
        lines.append(f"  note: {escape(note)}")

    stats = plan.stats
    lines += [
        "",
        f"[bold]Totals[/]: {stats.conversions} conversions ({stats.quantize} QuantStub, {stats.dequantize} DeQuantStub), "
        f"{stats.converted_elements} elements converted per forward; {stats.int8_modules} int8 modules, "
        f"{stats.fp32_modules} fp32 modules; {_cost_text(plan)}",
    ]
    return lines


def _representative_boundaries(plan: Plan, head, blocks, tail) -> list[tuple[Boundary, str]]:
    """Return the boundaries of the head, of the first block of each identical group, and of the tail."""
    chosen: list[tuple[Boundary, str]] = []
    for name in head:
        chosen += [(b, "") for b in plan.boundaries_of(name)]
    for group in _fold(plan, blocks):
        scope = f" (and {len(group) - 1} more blocks)" if len(group) > 1 else ""
        for name in group[0].names:
            chosen += [(b, scope) for b in plan.boundaries_of(name)]
    for name in tail:
        chosen += [(b, "") for b in plan.boundaries_of(name)]
    return chosen


# ---------------------------------------------------------------- Markdown


def _markdown(plan: Plan) -> str:
    head, blocks, tail = _blocks(plan)
    out = [
        f"# Quantization plan for `{_short_type(plan.model)}`",
        "",
        f"Model `{plan.model}`, rules `{plan.rules}`, objective `{plan.objective}`, example inputs {_example_shapes(plan)}.",
        "",
        "## Data path",
        "",
        "`[Q]` is a QuantStub, `[DQ]` a DeQuantStub; **bold** runs in int8, the rest in fp32.",
        "",
    ]

    def path(names: list[str], strip: str = "") -> str:
        tokens = _path_tokens(plan, names, strip=strip, color=False)
        return " → ".join(_md_token(t, plan, names, strip) for t in tokens)

    if head:
        out.append(f"- {'before the blocks: ' if blocks else ''}{path(head)}")
    for group in _fold(plan, blocks):
        note = " (same plan)" if len(group) > 1 else ""
        out.append(f"- `{_group_label(group)}`{note}: {path(group[0].names, group[0].label + '.')}")
    if tail:
        out.append(f"- after the blocks: {path(tail)}")

    out += ["", "## Stubs", "", "| stub | module | position | elements | qconfig | why |", "|---|---|---|---|---|---|"]
    for boundary, scope in _representative_boundaries(plan, head, blocks, tail):
        kind = "QuantStub" if boundary.kind == "quantize" else "DeQuantStub"
        out.append(f"| {kind} | `{boundary.module}`{scope} | {boundary.position} | {boundary.elements} | {boundary.qconfig} | {_why(plan, boundary)} |")

    out += ["", "## Fusion", ""]
    out += [f"- fused {' + '.join(g.types)}: {', '.join(f'`{m}`' for m in g.modules)}" for g in plan.fusions]
    out += [f"- nothing fused: {reason}" for reason in plan.not_fused]

    out += ["", "## Substitutions", ""]
    out += [f"- {count} × `{source}` → `{target}`" for source, target, count in _substitution_summary(plan)] or ["- none"]

    out += ["", "## Kept fp32 by rule", "", "| what | count | why |", "|---|---|---|"]
    out += [f"| {key} | {count} | {reason} |" for key, count, reason in _fp32_summary(plan)]
    if plan.notes:
        out += ["", "Notes:", ""] + [f"- {note}" for note in plan.notes]

    stats = plan.stats
    out += [
        "",
        "## Totals",
        "",
        f"{stats.conversions} conversions ({stats.quantize} QuantStub, {stats.dequantize} DeQuantStub), "
        f"{stats.converted_elements} elements converted per forward; {stats.int8_modules} int8 modules, "
        f"{stats.fp32_modules} fp32 modules; {_cost_text(plan)}.",
        "",
    ]
    return "\n".join(out)


def _md_token(token: str, plan: Plan, names: list[str], strip: str) -> str:
    """Bold a path token whose module or op run is int8."""
    core = token.replace("[Q] ", "").replace(" [DQ]", "").replace("[DQ] ", "").replace(" [Q]", "")
    full = strip + core if strip and not core.startswith("(") else core
    node = plan.nodes.get(full)
    int8 = node.domain == "int8" if node else False
    if core.startswith("("):
        int8 = False
    escaped = token.replace("[", "\\[").replace("]", "\\]")
    return f"**{escaped}**" if int8 else escaped
