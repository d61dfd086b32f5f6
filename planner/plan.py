"""The Plan: every decision of one planning run, as a JSON-serialisable Pydantic model."""

from __future__ import annotations

import gc
import inspect
import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from .costs import CostModel, LatencyEstimate, estimate, latency_costs, load_cost_model
from .errors import PlanError
from .graph import OpGraph
from .match import Matching, decide
from .rules import QConfigPreset, ResolvedRules, RuleSet, resolve_rules
from .solve import Objective, Solution, solve
from .trace import qualified_name, trace

logger = logging.getLogger(__name__)

__all__ = ["Plan", "NodeDecision", "Boundary", "FusionGroup", "SubstitutionRecord", "PlanStats", "plan"]

Domain = Literal["int8", "fp32"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeDecision(_Record):
    """The domain of one graph node and the rule that decided it."""

    kind: Literal["module", "op", "input", "output", "constant"]
    fqn: str
    type: str | None = None
    op: str | None = None
    domain: Domain
    requirement: Literal["int8", "fp32", "any"]
    rule: str | None = None
    rule_file: str | None = None
    reason: str
    overridden: list[str] = Field(default_factory=list)
    note: str | None = None
    calls: int = 1
    output_shape: list[int] | None = None


class Boundary(_Record):
    """One conversion: a QuantStub (``quantize``) or DeQuantStub (``dequantize``) at a module's input or output."""

    kind: Literal["quantize", "dequantize"]
    module: str
    position: Literal["input", "output"]
    elements: int
    qconfig: str


class FusionGroup(_Record):
    """Modules fused by ``fuse_modules_qat``; the first becomes the fused module, the rest ``Identity``."""

    modules: list[str]
    types: list[str]


class SubstitutionRecord(_Record):
    """A module replaced by an equivalent type before fusion and stubs."""

    module: str
    source: str
    target: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class Edge(_Record):
    """A float tensor flow between two graph nodes, kept so reports can draw the data path."""

    source: str
    target: str
    elements: int


class RuleSummary(_Record):
    """A rule as the plan records it, so reports and ``explain`` can show it without the rule files."""

    match: dict[str, Any]
    action: str
    reason: str | None = None
    priority: int = 0
    specificity: int
    file: str | None = None


class PlanStats(_Record):
    """Totals of a plan; ``cost`` is the cut value in the plan's objective."""

    conversions: int
    quantize: int
    dequantize: int
    converted_elements: int
    int8_modules: int
    fp32_modules: int
    cost: int


class Plan(_Record):
    """Placement of every stub, the fusions, substitutions and each module's qconfig, keyed by fqn.

    Plan once (on meta tensors) and apply to any instance of the same architecture with `emit`.
    """

    version: Literal[1] = 1
    model: str
    rules: str
    objective: Objective
    example_inputs: dict[str, list[int]] = Field(default_factory=dict)
    nodes: dict[str, NodeDecision]
    boundaries: list[Boundary]
    fusions: list[FusionGroup]
    not_fused: list[str] = Field(default_factory=list)
    substitutions: list[SubstitutionRecord]
    qconfigs: dict[str, str]
    presets: dict[str, QConfigPreset]
    notes: list[str] = Field(default_factory=list)
    dead_rules: list[str] = Field(default_factory=list)
    conflicts: list[str] = Field(default_factory=list)
    rule_table: dict[str, RuleSummary] = Field(default_factory=dict)
    edges: list[Edge]
    stats: PlanStats
    latency: LatencyEstimate | None = None
    cost_model: CostModel | None = None

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON (``"version": 1``)."""
        Path(path).write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan written by `save`.

        Raises:
            PlanError: the file is missing, not JSON, or not a version-1 plan.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise PlanError(f"{path}: cannot read plan file: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise PlanError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise PlanError(f"{path}: not a valid qat-planner plan: {where}: {first['msg']}") from None

    def boundaries_of(self, module: str) -> list[Boundary]:
        return [b for b in self.boundaries if b.module == module]

    @property
    def int8_modules(self) -> list[str]:
        return [name for name, n in self.nodes.items() if n.kind == "module" and n.domain == "int8"]


def plan(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | dict[str, Any] | Any = (),
    *,
    example_kwargs: dict[str, Any] | None = None,
    rules: str | Path | RuleSet | list[str | Path | RuleSet] = "default",
    objective: Objective = "bytes",
    strict: bool = False,
    cost_model: CostModel | str | Path | None = None,
) -> Plan:
    """Trace ``model``, apply ``rules`` and place the cheapest set of conversions.

    ``example_inputs`` is a tuple of positional inputs or a dict of keyword inputs; meta tensors are
    enough. For models whose ``forward`` takes ``use_cache`` (Hugging Face decoders) ``use_cache=False``
    is passed unless given, because the key/value cache is not part of the quantized data path.

    ``objective`` is what the cut minimises: converted elements (``"bytes"``), conversions
    (``"count"``), or predicted int8 forward time (``"latency"``). The latency objective prices every
    node and conversion with ``cost_model`` (a `CostModel` or its JSON file; by default this machine's
    cached one, calibrated on first use), records the prediction in ``Plan.latency``, and substitutes
    modules in both domains, because a substitution is an exact rewrite and its target is the one
    the cost model measured.

    Rules from your own files or Python objects that match no node are listed in ``Plan.dead_rules``.
    The built-in sets are written for many architectures, so their unmatched rules are not listed.
    ``strict=True`` makes a dead rule an error. Rules of equal priority and specificity that disagree
    on a node are listed in ``Plan.conflicts``; the later rule decides.

    Raises:
        TraceError: torch.export could not trace the model.
        RuleError: a rule set is invalid.
        PlanError: the objective is unknown, the rules cannot be met in eager mode, or ``strict`` is
            set and a rule matches nothing.

    Example:
        >>> import torch, planner
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> result = planner.plan(model, (torch.randn(2, 4),))
        >>> [(b.kind, b.module, b.position) for b in result.boundaries]
        [('quantize', '0', 'input'), ('dequantize', '0', 'output')]
    """
    # torch.export leaves hundreds of thousands of objects behind on a large model, and the first
    # full garbage collection after it scans them all (0.45 s on GPT-2 XL). Planning allocates enough
    # to trigger one, so the collector waits until the plan is made. Reference counting still frees
    # everything that is not in a cycle.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _plan(model, example_inputs, example_kwargs, rules, objective, strict, cost_model)
    finally:
        if collecting:
            gc.enable()


def _plan(model, example_inputs, example_kwargs, rules, objective, strict, cost_model) -> Plan:
    args, kwargs = _split_inputs(model, example_inputs, example_kwargs)
    resolved = resolve_rules(rules)
    graph = trace(model, args, kwargs)
    matching = decide(graph, resolved)
    requirements = {name: d.requirement for name, d in matching.decisions.items()}
    dead = [origin for origin in matching.dead_rules if not _is_builtin(origin.file)]
    if strict and dead:
        where = "; ".join(f"{o} in {o.file or 'a rule set built in Python'}" for o in dead)
        raise PlanError(f"rules match no node of {type(model).__name__} (strict mode): {where}; fix the match or remove the rule")
    costs = None
    if objective == "latency":
        if not isinstance(cost_model, CostModel):
            cost_model = load_cost_model(cost_model)
        effective = {name: d.substitution.target for name, d in matching.decisions.items() if d.substitution}
        fused = {name for modules, _types in matching.fusions for name in modules[1:]}
        costs = latency_costs(graph, cost_model, model, effective, fused)
    solution = solve(graph, requirements, objective=objective, costs=costs)
    result = _assemble(model, graph, resolved, matching, solution, objective, args, kwargs)
    if costs is not None:
        result.latency = estimate(graph, solution.domains, solution.conversions, costs)
        result.cost_model = costs.model
    result.dead_rules = [str(origin) for origin in dead]
    result.conflicts = list(matching.conflicts)
    result.rule_table = {
        str(origin): RuleSummary(match=rule.match.model_dump(mode="json", exclude_defaults=True), action=rule.action, reason=rule.reason,
                                 priority=rule.priority, specificity=rule.match.specificity, file=origin.file)
        for rule, origin in resolved.rules
    }
    return result


def _is_builtin(file: str | None) -> bool:
    from .rules import builtin_rule_sets

    return file is not None and Path(file) in set(builtin_rule_sets().values())


def _split_inputs(model, example_inputs, example_kwargs):
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    else:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        kwargs = {}
    kwargs.update(example_kwargs or {})
    if takes_keyword(model, "use_cache") and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def takes_keyword(model: nn.Module, name: str) -> bool:
    """Return whether ``model.forward`` has a parameter called ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _input_shapes(args, kwargs) -> dict[str, list[int]]:
    shapes = {f"arg{i}": list(a.shape) for i, a in enumerate(args) if hasattr(a, "shape")}
    shapes.update({k: list(v.shape) for k, v in kwargs.items() if hasattr(v, "shape")})
    return shapes


def _assemble(model, graph: OpGraph, rules: ResolvedRules, matching: Matching, solution: Solution, objective, args, kwargs) -> Plan:
    nodes: dict[str, NodeDecision] = {}
    notes: list[str] = []
    for node in graph.nodes():
        decision = matching.decisions[node.name]
        domain = solution.domains[node.name]
        if decision.note:
            notes.append(f"{node.name}: {decision.note}")
        nodes[node.name] = NodeDecision(
            kind=node.kind, fqn=node.fqn, type=node.module_type, op=node.op, domain=domain,
            requirement=decision.requirement, rule=str(decision.rule) if decision.rule else None,
            rule_file=decision.rule.file if decision.rule else None, reason=decision.reason,
            overridden=[str(o) for o in decision.overridden], note=decision.note, calls=node.calls,
            output_shape=list(node.output_shape) if node.output_shape else None,
        )
        if node.kind == "module" and node.calls > 1:
            notes.append(f"{node.name}: called {node.calls} times; every call shares one domain and one set of stubs")

    notes += _model_notes(model, nodes)
    qconfigs = {name: d.qconfig for name, d in matching.decisions.items()
                if d.qconfig and (solution.domains[name] == "int8" or d.requirement == "fp32")}
    boundaries = [
        Boundary(kind=c.kind, module=c.module, position=c.position, elements=c.elements,
                 qconfig=_stub_qconfig(graph, c, qconfigs, solution, rules.default_qconfig))
        for c in solution.conversions
    ]
    fusions = [FusionGroup(modules=list(m), types=list(t)) for m, t in matching.fusions
               if all(solution.domains[name] == "int8" for name in m)]
    substitutions = [
        SubstitutionRecord(module=name, source=graph.node(name).module_type, target=d.substitution.target,
                           kwargs=dict(d.substitution.kwargs))
        for name, d in matching.decisions.items()
        if d.substitution is not None and (solution.domains[name] == "int8" or objective == "latency")
    ]
    used_presets = set(qconfigs.values()) | {b.qconfig for b in boundaries}
    module_domains = [n for n in nodes.values() if n.kind == "module"]
    stats = PlanStats(
        conversions=len(boundaries),
        quantize=sum(b.kind == "quantize" for b in boundaries),
        dequantize=sum(b.kind == "dequantize" for b in boundaries),
        converted_elements=sum(b.elements for b in boundaries),
        int8_modules=sum(n.domain == "int8" for n in module_domains),
        fp32_modules=sum(n.domain == "fp32" for n in module_domains),
        cost=solution.cost,
    )
    return Plan(
        model=qualified_name(type(model)), rules=rules.name, objective=objective,
        example_inputs=_input_shapes(args, kwargs), nodes=nodes, boundaries=boundaries, fusions=fusions,
        not_fused=matching.unfused_reasons if not fusions else [], substitutions=substitutions,
        qconfigs=qconfigs, presets={k: v for k, v in rules.presets.items() if k in used_presets}, notes=notes,
        edges=[Edge(source=u, target=v, elements=e["elements"]) for u, v, e in graph.graph.edges(data=True)],
        stats=stats,
    )


def _model_notes(model: nn.Module, nodes: dict[str, NodeDecision]) -> list[str]:
    """Notes on what the user placed by hand, and on ops whose behaviour depends on eval()."""
    import torch.ao.nn.quantized as nnq
    import torch.ao.quantization as tq

    notes = []
    placed = [name for name, m in model.named_modules()
              if isinstance(m, (tq.QuantStub, tq.DeQuantStub, nnq.FloatFunctional))]
    if placed:
        notes.append(
            f"the model already contains QuantStub/DeQuantStub/FloatFunctional modules ({', '.join(placed[:5])}"
            f"{', ...' if len(placed) > 5 else ''}); emit clears their qconfig so they stay identities, and the "
            "plan's own stubs do the conversions"
        )
    dropout = [name for name, n in nodes.items() if n.kind == "op" and n.op == "dropout" and n.domain == "int8"]
    if dropout:
        notes.append(
            f"functional dropout runs on int8 tensors at {', '.join(dropout[:5])}; call eval() before convert, "
            "because dropout in training mode has no int8 kernel"
        )
    return notes


def _stub_qconfig(graph: OpGraph, conversion, qconfigs: dict[str, str], solution: Solution, default: str) -> str:
    """Return the qconfig of the quantized side of a conversion: the nearest int8 module with one."""
    if conversion.module in qconfigs and solution.domains[conversion.module] == "int8":
        return qconfigs[conversion.module]
    downstream = conversion.kind == "quantize"
    seen = {conversion.module}
    frontier = [conversion.module]
    while frontier:
        current = frontier.pop(0)
        neighbours = graph.successors(current) if downstream else graph.predecessors(current)
        for name in neighbours:
            if name in seen or solution.domains.get(name) != "int8":
                continue
            if name in qconfigs:
                return qconfigs[name]
            seen.add(name)
            frontier.append(name)
    return default
