"""Render a Plan as text, Markdown, JSON, Graphviz DOT or SVG. Reports only read the plan; they never recompute decisions."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Literal

from rich.markup import escape
from rich.text import Text

from .match import BLOCK_PATTERN
from .errors import PlanError
from .plan import Boundary, Plan

__all__ = ["render", "FORMATS"]

Format = Literal["text", "json", "markdown", "dot", "svg"]
FORMATS: tuple[str, ...] = ("text", "json", "markdown", "dot", "svg")

_BLOCK = BLOCK_PATTERN

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
    """Return the plan as a report in ``format``: ``text``, ``markdown``, ``json``, ``dot`` or ``svg``.

    ``markup=True`` keeps rich markup (colours) in the text report; the CLI uses it for terminals.
    ``dot`` is the data-path picture of the Markdown report as Graphviz DOT text, and ``svg`` that
    picture rendered by the Graphviz ``dot`` program.

    Raises:
        ValueError: ``format`` is not one of `FORMATS`.
        PlanError: ``format`` is ``svg`` and the ``dot`` program is not installed or fails.
    """
    if format == "json":
        return plan.model_dump_json(indent=2)
    if format == "text":
        lines = _text_lines(plan)
        text = "\n".join(lines)
        return text if markup else Text.from_markup(text).plain
    if format == "markdown":
        return _markdown(plan)
    if format == "dot":
        return _dot(_picture(plan, limit=None))
    if format == "svg":
        return _svg(_dot(_picture(plan, limit=None)))
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


_stub_index: tuple = (None, None, 0, {})


def _stubs_of(plan: Plan, module: str) -> list[Boundary]:
    """Return ``plan.boundaries_of(module)`` from an index built once per plan, because reports ask for every node.

    The index keeps a reference to its plan (not the plan's id, which Python reuses) and is rebuilt
    when the boundary list is replaced or changes length.
    """
    global _stub_index
    indexed_plan, indexed_list, count, index = _stub_index
    if indexed_plan is not plan or indexed_list is not plan.boundaries or count != len(plan.boundaries):
        index = {}
        for boundary in plan.boundaries:
            index.setdefault(boundary.module, []).append(boundary)
        _stub_index = (plan, plan.boundaries, len(plan.boundaries), index)
    return index.get(module, [])


def _signature(plan: Plan, block: _Block) -> tuple:
    """What must be equal for two blocks to share one line of the report."""
    items = []
    for name in block.names:
        node = plan.nodes[name]
        stubs = tuple((b.kind, b.position, b.qconfig) for b in _stubs_of(plan, name))
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


def _difference_notes(plan: Plan, groups: list[list[_Block]]) -> dict[int, str]:
    """Describe how each group of blocks that differs from the usual plan of its container differs.

    The usual plan of a container (``transformer.h``) is the block signature most of its blocks
    share (the earliest on a tie). Each group with another signature is compared with the nearest
    group that has the usual one. Returns a note per index of such a group.
    """
    signatures = [_signature(plan, group[0]) for group in groups]
    counts: dict[str, Counter] = defaultdict(Counter)
    for group, signature in zip(groups, signatures):
        counts[group[0].prefix][signature] += len(group)
    notes: dict[int, str] = {}
    for index, group in enumerate(groups):
        prefix = group[0].prefix
        # max returns the first of equal counts, so a tie goes to the earliest signature.
        usual = max(counts[prefix].items(), key=lambda item: item[1])[0]
        if signatures[index] == usual:
            continue
        candidates = [i for i, g in enumerate(groups) if g[0].prefix == prefix and signatures[i] == usual]
        nearest = min(candidates, key=lambda i: (abs(i - index), i))
        differences = _block_differences(plan, group[0], groups[nearest][0])
        notes[index] = f"differs from {_group_label(groups[nearest])}: {'; '.join(differences)}"
    return notes


def _repeats(plan: Plan, groups: list[list[_Block]]) -> dict[int, str]:
    """Map the index of each group that repeats an earlier, non-adjacent group's plan to that group's label."""
    first_with: dict[tuple, int] = {}
    repeats: dict[int, str] = {}
    for index, group in enumerate(groups):
        key = (group[0].prefix, _signature(plan, group[0]))
        if key in first_with:
            repeats[index] = _group_label(groups[first_with[key]])
        else:
            first_with[key] = index
    return repeats


def _block_differences(plan: Plan, block: _Block, reference: _Block, limit: int = 6) -> list[str]:
    """List what differs in ``block`` from ``reference`` ("here" and "there"), by names relative to each block."""

    def entries(of: _Block) -> dict[str, tuple]:
        return {_relative(name, of): (plan.nodes[name], _stubs_of(plan, name)) for name in of.names}

    mine, theirs = entries(block), entries(reference)
    parts: list[str] = []
    only_here = [name for name in mine if name not in theirs]
    only_there = [name for name in theirs if name not in mine]
    if only_here:
        parts.append(f"only here: {_some(only_here, limit)}")
    if only_there:
        parts.append(f"only there: {_some(only_there, limit)}")

    common = [name for name in mine if name in theirs]
    by_domain: dict[tuple[str, str, str], list[str]] = {}
    for name in common:
        node, other = mine[name][0], theirs[name][0]
        if node.domain != other.domain:
            by_domain.setdefault((node.domain, other.domain, node.rule or "no rule"), []).append(name)
    for (domain, other_domain, rule), names in by_domain.items():
        verb = "is" if len(names) == 1 else "are"
        parts.append(f"{_some(names, limit)} {verb} {domain} here ({other_domain} there), by {rule}")
    for name in common:
        node, other = mine[name][0], theirs[name][0]
        if node.type != other.type or node.op != other.op:
            parts.append(f"{name} is {_short_type(node.type) if node.type else node.op} here "
                         f"({_short_type(other.type) if other.type else other.op} there)")

    for name in common:
        stubs = {(b.kind, b.position): b.qconfig for b in mine[name][1]}
        other_stubs = {(b.kind, b.position): b.qconfig for b in theirs[name][1]}
        for kind, position in sorted(set(stubs) | set(other_stubs), key=lambda k: (k[1] != "input", k[0])):
            stub = "QuantStub" if kind == "quantize" else "DeQuantStub"
            qconfig, other_qconfig = stubs.get((kind, position)), other_stubs.get((kind, position))
            if qconfig is None:
                parts.append(f"no {stub} at {name} {position}")
            elif other_qconfig is None:
                parts.append(f"{stub} at {name} {position} (none there)")
            elif qconfig != other_qconfig:
                parts.append(f"{stub} at {name} {position} uses qconfig {qconfig} ({other_qconfig} there)")
    return parts or ["the same nodes, domains and stubs in another order"]


def _some(names: list[str], limit: int) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


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
        before = "".join(_stub_mark(b, color) + " " for b in _stubs_of(plan, name) if b.position == "input")
        after = "".join(" " + _stub_mark(b, color) for b in _stubs_of(plan, name) if b.position == "output")
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
    unit = {"bytes": "converted elements", "count": "conversions", "latency": "ns of conversions and free nodes"}[plan.objective]
    return f"cut cost {plan.stats.cost} {unit} (objective {plan.objective})"


def _latency_text(plan: Plan) -> str | None:
    """Return one sentence on the predicted int8 forward time and its largest parts, for latency plans."""
    if plan.latency is None:
        return None
    total = plan.latency.total_ms or 1.0
    parts = ", ".join(f"{name} {ms / total:.0%}" for name, ms in list(plan.latency.by_class.items())[:6])
    return (f"predicted int8 forward {plan.latency.total_ms:.1f} ms at the example input ({parts}); "
            f"cost model: {plan.latency.cost_model}. `qat-planner validate` measures it")


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
    groups = _fold(plan, blocks)
    differences = _difference_notes(plan, groups)
    repeats = _repeats(plan, groups)
    for index, group in enumerate(groups):
        first = group[0]
        notes = []
        if index in repeats:
            notes.append(f"same plan as {repeats[index]}")
        elif len(group) > 1:
            notes.append("same plan")
        if index in differences:
            notes.append(differences[index])
        lines.append(f"  {_group_label(group)}{': ' if notes else ''}{escape('; '.join(notes))}")
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
    summary = _fp32_summary(plan)
    for key, count, reason in summary:
        lines.append(f"  {count} × {escape(key)}: {escape(reason)}")
    if not summary:
        lines.append("  nothing")
    if plan.notes or plan.conflicts or plan.dead_rules:
        lines += ["", "[bold]Notes[/]"]
    for note in plan.notes:
        lines.append(f"  {escape(note)}")
    for origin in plan.dead_rules:
        lines.append(f"  rule {escape(origin)} matches no node")
    if plan.conflicts:
        lines.append(f"  {len(plan.conflicts)} conflicts between rules of equal priority and specificity; the first: "
                     f"{escape(plan.conflicts[0])}")

    stats = plan.stats
    lines += [
        "",
        f"[bold]Totals[/]: {stats.conversions} conversions ({stats.quantize} QuantStub, {stats.dequantize} DeQuantStub), "
        f"{stats.converted_elements} elements converted per forward; {stats.int8_modules} int8 modules, "
        f"{stats.fp32_modules} fp32 modules; {_cost_text(plan)}",
    ]
    if _latency_text(plan):
        lines.append(escape(_latency_text(plan)))
    return lines


def _representative_boundaries(plan: Plan, head, blocks, tail) -> list[tuple[Boundary, str]]:
    """Return the boundaries of the head, of the first block of each identical group, and of the tail."""
    chosen: list[tuple[Boundary, str]] = []
    for name in head:
        chosen += [(b, "") for b in _stubs_of(plan, name)]
    for group in _fold(plan, blocks):
        scope = f" (and {len(group) - 1} more blocks)" if len(group) > 1 else ""
        for name in group[0].names:
            chosen += [(b, scope) for b in _stubs_of(plan, name)]
    for name in tail:
        chosen += [(b, "") for b in _stubs_of(plan, name)]
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
    groups = _fold(plan, blocks)
    differences = _difference_notes(plan, groups)
    repeats = _repeats(plan, groups)
    for index, group in enumerate(groups):
        note = ""
        if index in repeats:
            note = f" (same plan as `{repeats[index]}`)"
        elif len(group) > 1:
            note = " (same plan)"
        out.append(f"- `{_group_label(group)}`{note}: {path(group[0].names, group[0].label + '.')}")
        if index in differences:
            out.append(f"  - {differences[index]}")
    if tail:
        out.append(f"- after the blocks: {path(tail)}")

    out += ["", "## Data path picture", ""] + _mermaid_section(plan)

    out += ["", "## Stubs", "", "| stub | module | position | elements | qconfig | why |", "|---|---|---|---|---|---|"]
    for boundary, scope in _representative_boundaries(plan, head, blocks, tail):
        kind = "QuantStub" if boundary.kind == "quantize" else "DeQuantStub"
        out.append(f"| {kind} | `{boundary.module}`{scope} | {boundary.position} | {boundary.elements} | {boundary.qconfig} | {_why(plan, boundary)} |")

    out += ["", "## Fusion", ""]
    out += [f"- fused {' + '.join(g.types)}: {', '.join(f'`{m}`' for m in g.modules)}" for g in plan.fusions]
    out += [f"- nothing fused: {reason}" for reason in plan.not_fused]

    out += ["", "## Substitutions", ""]
    out += [f"- {count} × `{source}` → `{target}`" for source, target, count in _substitution_summary(plan)] or ["- none"]

    out += ["", "## Kept fp32 by rule", ""]
    summary = _fp32_summary(plan)
    if summary:
        out += ["| what | count | why |", "|---|---|---|"]
        out += [f"| {key} | {count} | {reason} |" for key, count, reason in summary]
    else:
        out.append("Nothing.")
    notes = plan.notes + [f"rule {origin} matches no node" for origin in plan.dead_rules] + plan.conflicts
    if notes:
        out += ["", "## Notes", ""] + [f"- {note}" for note in notes]

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
    if _latency_text(plan):
        out += [_latency_text(plan) + ".", ""]
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


# ---------------------------------------------------------------- data-path picture: Mermaid, DOT, SVG

# Without repeated blocks, the Markdown picture shows the whole graph up to this many nodes.
PICTURE_LIMIT = 60

_COLOURS = {"int8": ("#c8e6c9", "#2e7d32"), "fp32": ("#e3f2fd", "#1565c0"), None: ("#f5f5f5", "#757575")}
_STUB_COLOURS = ("#fff59d", "#f9a825")


@dataclass
class _Shape:
    id: str
    lines: list[str]
    domain: str | None  # None for the block's input and output and for stub nodes
    kind: Literal["module", "op", "io", "stub"]


@dataclass
class _Picture:
    """The nodes, edges and fused groups of one block (or the whole graph) that Mermaid and DOT draw."""

    title: str
    shapes: list[_Shape]
    edges: list[tuple[str, str, str]]  # source id, target id, stub label ("", "Q", "DQ", "DQ Q")
    clusters: list[tuple[str, str, list[str]]]  # id, title, member ids
    omitted: str | None = None  # why nothing is drawn


def _picture(plan: Plan, limit: int | None = PICTURE_LIMIT) -> _Picture:
    """Lay out the data path of the first block of the largest group of identical blocks (the usual plan).

    A model without repeated blocks is drawn whole, unless it has more than ``limit`` nodes. Ops that
    only pick or alias a tensor (getitem, alias, to) are left out and their edges joined through.
    """
    _, blocks, _ = _blocks(plan)
    if blocks:
        groups = _fold(plan, blocks)
        group = max(groups, key=len)  # max keeps the first of equally large groups
        block = group[0]
        names, strip = block.names, block.label + "."
        title = block.label + (f" (blocks {_group_label(group)} have the same plan)" if len(group) > 1 else "")
    else:
        linked = {e.source for e in plan.edges} | {e.target for e in plan.edges}
        names = [n for n, node in plan.nodes.items() if node.kind != "constant" or n in linked]
        strip, title = "", _short_type(plan.model)
    drawn = [n for n in names if not _hidden(plan, n)]
    if not blocks and limit is not None and len(drawn) > limit:
        return _Picture(title, [], [], [], omitted=(
            f"The graph has {len(drawn)} nodes and no repeated blocks; the picture is drawn for at most "
            f"{limit}. `--format dot` or `--format svg` draws the whole graph."))

    ids = {name: f"n{i}" for i, name in enumerate(drawn)}
    shapes = [_shape(plan, name, ids[name], strip) for name in drawn]
    successors: dict[str, list[str]] = defaultdict(list)
    predecessors: dict[str, list[str]] = defaultdict(list)
    for edge in plan.edges:
        successors[edge.source].append(edge.target)
        predecessors[edge.target].append(edge.source)

    edges: list[tuple[str, str, str]] = []
    marked: set[tuple[str, str]] = set()  # (module, position) whose stubs are on a drawn edge
    for name in drawn:
        for source in _through(plan, name, predecessors):
            if source not in ids:
                edges.append(("n_in", ids[name], _edge_label(plan, None, name, marked)))
        for target in _through(plan, name, successors):
            if target in ids:
                edges.append((ids[name], ids[target], _edge_label(plan, name, target, marked)))
            else:
                edges.append((ids[name], "n_out", _edge_label(plan, name, None, marked)))
    edges = list(dict.fromkeys(edges))
    used = {end for edge in edges for end in edge[:2]}
    if "n_in" in used:
        shapes.insert(0, _Shape("n_in", ["block input"], None, "io"))
    if "n_out" in used:
        shapes.append(_Shape("n_out", ["block output"], None, "io"))

    # A stub no drawn edge carries (a module with no float producer or consumer) gets a node of its own.
    for name in drawn:
        for boundary in _stubs_of(plan, name):
            if (name, boundary.position) in marked:
                continue
            stub = f"s{len([s for s in shapes if s.kind == 'stub'])}"
            shapes.append(_Shape(stub, [_mark(boundary)], None, "stub"))
            edges.append((stub, ids[name], "") if boundary.position == "input" else (ids[name], stub, ""))

    clusters = []
    for fusion in plan.fusions:
        members = [ids[m] for m in fusion.modules if m in ids]
        if members:
            types = " + ".join(_short_type(t) for t in fusion.types)
            clusters.append((f"f{len(clusters)}", f"fused {types}", members))
    return _Picture(title, shapes, edges, clusters)


def _hidden(plan: Plan, name: str) -> bool:
    node = plan.nodes[name]
    return node.kind == "op" and node.op in _HIDDEN_OPS


def _through(plan: Plan, name: str, neighbours: dict[str, list[str]]) -> list[str]:
    """Neighbours of ``name`` in one direction, skipping hidden ops."""
    found: list[str] = []
    queue, seen = list(neighbours[name]), {name}
    while queue:
        current = queue.pop(0)
        if current in seen:
            continue
        seen.add(current)
        if _hidden(plan, current):
            queue += neighbours[current]
        else:
            found.append(current)
    return found


def _mark(boundary: Boundary) -> str:
    return "Q" if boundary.kind == "quantize" else "DQ"


def _edge_label(plan: Plan, source: str | None, target: str | None, marked: set[tuple[str, str]]) -> str:
    """Return the stub marks of an edge: those at the source's output, then those at the target's input."""
    marks = []
    for name, position in ((source, "output"), (target, "input")):
        if name is None:
            continue
        stubs = [b for b in _stubs_of(plan, name) if b.position == position]
        if stubs:
            marked.add((name, position))
            marks += [_mark(b) for b in stubs]
    return " ".join(marks)


def _shape(plan: Plan, name: str, id: str, strip: str) -> _Shape:
    node = plan.nodes[name]
    if node.kind == "module":
        label = name[len(strip):] if strip and name.startswith(strip) else name
        substituted = next((s for s in plan.substitutions if s.module == name), None)
        kind = _short_type(node.type) + (f" as {_short_type(substituted.target)}" if substituted else "")
        return _Shape(id, [label, kind], node.domain, "module")
    if node.kind == "op":
        return _Shape(id, [_OP_SYMBOLS.get(node.op or "?", node.op or "?")], node.domain, "op")
    return _Shape(id, [name], None, "io")


def _legend(picture: _Picture, fused: str) -> str:
    return (f"{picture.title}: green nodes run int8, blue ones fp32; Q on an edge is a QuantStub, DQ a DeQuantStub"
            + (f"; {fused} are fused modules" if picture.clusters else ""))


def _mermaid_section(plan: Plan) -> list[str]:
    picture = _picture(plan)
    if picture.omitted:
        return [picture.omitted]
    return [_legend(picture, "boxes") + ".", "", *_mermaid(picture)]


def _mermaid(picture: _Picture) -> list[str]:
    # NOTE: the tests check this text's structure (ids, edges, classes) but run no Mermaid renderer on it.
    def text(s: str) -> str:
        return s.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")

    brackets = {"module": ('["', '"]'), "op": ('("', '")'), "io": ('(["', '"])'), "stub": ('(("', '"))')}

    def define(shape: _Shape) -> str:
        start, end = brackets[shape.kind]
        return f"{shape.id}{start}{'<br/>'.join(text(line) for line in shape.lines)}{end}"

    clustered = {member: cluster for cluster in picture.clusters for member in cluster[2]}
    lines = ["```mermaid", "flowchart LR"]
    lines += [f"  {define(s)}" for s in picture.shapes if s.id not in clustered]
    shapes = {s.id: s for s in picture.shapes}
    for cluster_id, title, members in picture.clusters:
        lines.append(f'  subgraph {cluster_id}["{text(title)}"]')
        lines += [f"    {define(shapes[m])}" for m in members]
        lines.append("  end")
    for source, target, label in picture.edges:
        lines.append(f"  {source} -->|{label}| {target}" if label else f"  {source} --> {target}")
    for name, (fill, stroke) in (("int8", _COLOURS["int8"]), ("fp32", _COLOURS["fp32"]), ("io", _COLOURS[None]), ("stub", _STUB_COLOURS)):
        lines.append(f"  classDef {name} fill:{fill},stroke:{stroke},color:#000")
    for name in ("int8", "fp32"):
        members = [s.id for s in picture.shapes if s.domain == name]
        if members:
            lines.append(f"  class {','.join(members)} {name}")
    for kind in ("io", "stub"):
        members = [s.id for s in picture.shapes if s.kind == kind]
        if members:
            lines.append(f"  class {','.join(members)} {kind}")
    lines.append("```")
    return lines


def _dot(picture: _Picture) -> str:
    def quoted(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    shapes_of = {"module": "box", "op": "ellipse", "io": "plaintext", "stub": "circle"}

    def define(shape: _Shape) -> str:
        fill, stroke = _STUB_COLOURS if shape.kind == "stub" else _COLOURS[shape.domain]
        label = quoted("\n".join(shape.lines)).replace("\n", "\\n")
        style = "" if shape.kind == "io" else f', style="filled,rounded", fillcolor="{fill}", color="{stroke}"'
        return f"{shape.id} [label={label}, shape={shapes_of[shape.kind]}{style}];"

    legend = picture.omitted or _legend(picture, "dashed boxes")
    lines = [
        "digraph plan {",
        f'  graph [rankdir=LR, fontname="Helvetica", fontsize=12, labelloc=t, label={quoted(legend)}];',
        '  node [fontname="Helvetica", fontsize=11];',
        '  edge [fontname="Helvetica", fontsize=10];',
    ]
    clustered = {member for cluster in picture.clusters for member in cluster[2]}
    shapes = {s.id: s for s in picture.shapes}
    lines += [f"  {define(s)}" for s in picture.shapes if s.id not in clustered]
    for cluster_id, title, members in picture.clusters:
        lines.append(f"  subgraph cluster_{cluster_id} {{")
        lines.append(f"    label={quoted(title)}; style=dashed;")
        lines += [f"    {define(shapes[m])}" for m in members]
        lines.append("  }")
    for source, target, label in picture.edges:
        lines.append(f"  {source} -> {target}" + (f' [label="{label}", color="{_STUB_COLOURS[1]}", fontcolor="#e65100", penwidth=2];' if label else ";"))
    lines.append("}")
    return "\n".join(lines)


def _svg(dot: str) -> str:
    """Run Graphviz ``dot -Tsvg`` on DOT text."""
    program = shutil.which("dot")
    if program is None:
        raise PlanError('the "dot" program (Graphviz) is not installed; install it (for example '
                        "`apt-get install graphviz`) or use --format dot and render elsewhere")
    try:
        completed = subprocess.run([program, "-Tsvg"], input=dot, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise PlanError('the "dot" program (Graphviz) timed out after 300 s; use --format dot and render elsewhere') from None
    if completed.returncode != 0:
        detail = completed.stderr.strip().splitlines()
        reason = f": {detail[0]}" if detail else ""
        raise PlanError(f'the "dot" program (Graphviz) failed with exit code {completed.returncode}{reason}; '
                        "use --format dot and render elsewhere")
    return completed.stdout
