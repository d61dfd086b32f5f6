"""Apply resolved rules to a traced graph: one decision per node, with the rule that made it."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Literal

from torch.ao.quantization.fuser_method_mappings import _DEFAULT_OP_LIST_TO_FUSER_METHOD
from torch.ao.quantization.quantization_mappings import get_default_static_quant_module_mappings

from .errors import PlanError, RuleError
from .graph import Node, OpGraph
from .rules import ResolvedRules, Rule, RuleOrigin, Substitution

Requirement = Literal["int8", "fp32", "any"]

_EMBEDDING_TYPES = {"torch.nn.modules.sparse.Embedding", "torch.nn.modules.sparse.EmbeddingBag"}
_TRANSPOSED_CONV_TYPES = {f"torch.nn.modules.conv.ConvTranspose{n}d" for n in (1, 2, 3)}
# Modules whose float forward also runs on quint8 tensors (torch 2.13 has quantized kernels for these
# ops), so a rule may place them in int8 without a module swap or qconfig.
RUNS_ON_INT8 = {
    f"torch.nn.modules.{path}" for path in (
        "activation.GELU", "activation.ReLU", "activation.ReLU6", "activation.Hardtanh", "dropout.Dropout",
        "linear.Identity", "flatten.Flatten", "pooling.MaxPool1d", "pooling.MaxPool2d", "pooling.MaxPool3d",
        "pooling.AdaptiveAvgPool1d", "pooling.AdaptiveAvgPool2d", "pooling.AdaptiveAvgPool3d",
        "pooling.AvgPool1d", "pooling.AvgPool2d", "pooling.AvgPool3d",
    )
}
_REPLACEMENT_TYPES = {"torch.nn.Linear": "torch.nn.modules.linear.Linear", "torch.nn.GELU": "torch.nn.modules.activation.GELU"}


@dataclass
class Decision:
    """Requirement the rules put on one node, with the deciding rule and reason."""

    requirement: Requirement
    reason: str
    rule: RuleOrigin | None = None
    overridden: list[RuleOrigin] = field(default_factory=list)
    qconfig: str | None = None
    substitution: Substitution | None = None
    effective_type: str | None = None
    note: str | None = None
    rule_specificity: int = 0


@dataclass
class Matching:
    """Decisions for every node plus the fusion chains found by type before solving."""

    decisions: dict[str, Decision]
    fusions: list[tuple[tuple[str, ...], tuple[str, ...]]]  # (module fqns, type names)
    unfused_reasons: list[str]
    dead_rules: list[RuleOrigin] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)


def type_aliases(qualified: str) -> set[str]:
    """Return the names a rule may use for a class: qualified, short, and ``torch.nn.X``/``nn.X`` for torch.nn."""
    short = qualified.rsplit(".", 1)[-1]
    aliases = {qualified, short}
    if qualified.startswith("torch.nn.modules."):
        aliases |= {f"torch.nn.{short}", f"nn.{short}"}
    return aliases


def _eager_int8_types() -> set[str]:
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in get_default_static_quant_module_mappings() if isinstance(cls, type)}


# A repeated block is a module path with a numeric index after a container name: "transformer.h.3",
# "model.layers.10", "encoder.layer.0", "blocks.2". Reports fold blocks by the same pattern.
BLOCK_PATTERN = re.compile(r"^(?P<prefix>(?:.*\.)?(?:h|layers|layer|blocks|block))\.(?P<index>\d+)(?=[.:]|$)")


def block_of(name: str) -> tuple[str, int] | None:
    """Return ``(container, index)`` of the repeated block a node name or fqn lies in, or ``None``."""
    found = BLOCK_PATTERN.match(name)
    return (found["prefix"], int(found["index"])) if found else None


def block_counts(graph: OpGraph) -> dict[str, int]:
    """Return the number of blocks of each container seen in the graph (largest index + 1)."""
    counts: dict[str, int] = {}
    for node in graph.nodes():
        block = block_of(node.name) or block_of(node.fqn)
        if block:
            counts[block[0]] = max(counts.get(block[0], 0), block[1] + 1)
    return counts


def _rule_matches(rule: Rule, node: Node, type_names: set[str], mro_names: set[str], counts: dict[str, int]) -> bool:
    match = rule.match
    if node.kind not in ("module", "op"):
        return False
    if match.type is not None:
        names = type_names | mro_names if match.subclasses else type_names
        if node.kind != "module" or not names & set(match.type):
            return False
    if match.op is not None and (node.kind != "op" or node.op not in match.op):
        return False
    if match.fqn is not None and not any(fnmatch.fnmatchcase(node.fqn, pattern) for pattern in match.fqn):
        return False
    if match.fqn_regex is not None and not re.fullmatch(match.fqn_regex, node.fqn):
        return False
    if match.within_type is not None:
        enclosing = set().union(*(type_aliases(t) for _, t in node.enclosing)) if node.enclosing else set()
        if not enclosing & set(match.within_type):
            return False
    if match.within_fqn is not None:
        if not any(fnmatch.fnmatchcase(fqn, pattern) for fqn, _ in node.enclosing for pattern in match.within_fqn):
            return False
    if match.layers is not None:
        block = block_of(node.name) or block_of(node.fqn)
        if block is None or not match.layers.covers(block[1], counts[block[0]]):
            return False
    if match.rank is not None and node.rank not in match.rank:
        return False
    if match.where is not None:
        try:
            selected = match.where(node)
        except Exception as exc:  # user code: name the rule and node, keep the cause
            raise RuleError(f"the where= predicate of a rule failed on node {node.name!r}: {type(exc).__name__}: {exc}") from exc
        if not selected:
            return False
    return True


def _substitution_for(node: Node, rules: ResolvedRules) -> Substitution | None:
    if node.kind != "module" or node.module_type is None:
        return None
    names = type_aliases(node.module_type)
    for substitution in reversed(rules.substitutions):
        if substitution.source in names:
            return substitution
    return None


def decide(graph: OpGraph, rules: ResolvedRules) -> Matching:
    """Decide every node's requirement from the rules, then find fusion chains.

    Precedence among matching rules: higher priority, then higher specificity, then the later rule.
    A node that no rule matches stays fp32. A quantize decision that eager mode cannot carry out (an
    op outside any module, or a module type with no eager int8 mapping) is kept fp32 with a note.

    Raises:
        PlanError: a rule gives an embedding an activation qconfig, or a float qconfig to a non-embedding.
    """
    int8_types = _eager_int8_types()
    counts = block_counts(graph)
    decisions: dict[str, Decision] = {}
    matched: set[int] = set()
    conflicts: list[str] = []
    for node in graph.nodes():
        if node.kind in ("input", "output", "constant"):
            decisions[node.name] = Decision("fp32", f"model {node.kind}s are fp32")
            continue
        substitution = _substitution_for(node, rules)
        effective = _REPLACEMENT_TYPES[substitution.target] if substitution else node.module_type
        names: set[str] = set()
        mro: set[str] = set()
        if node.module_type:
            names = type_aliases(node.module_type) | (type_aliases(effective) if effective else set())
            mro = set().union(*(type_aliases(t) for t in node.type_mro)) if node.type_mro else set()
        candidates = [(i, rule, origin) for i, (rule, origin) in enumerate(rules.rules)
                      if _rule_matches(rule, node, names, mro, counts)]
        matched.update(i for i, _, _ in candidates)
        conflicts += _conflicts(node, candidates)
        decisions[node.name] = _decide_node(node, candidates, rules, substitution, effective, int8_types)
    fusions, unfused = _find_fusions(graph, decisions, rules)
    dead = [origin for i, (_, origin) in enumerate(rules.rules) if i not in matched]
    return Matching(decisions=decisions, fusions=fusions, unfused_reasons=unfused, dead_rules=dead, conflicts=conflicts)


def _conflicts(node: Node, candidates) -> list[str]:
    """Describe the disagreement when the top rules tie on priority and specificity but differ in action."""
    if len(candidates) < 2:
        return []
    ranked = sorted(candidates, key=lambda c: (c[1].priority, c[1].match.specificity, c[0]))
    top = ranked[-1][1]
    tied = [c for c in ranked[:-1]
            if (c[1].priority, c[1].match.specificity) == (top.priority, top.match.specificity) and c[1].action != top.action]
    return [f"{node.name}: {origin} ({rule.action}) and {ranked[-1][2]} ({top.action}) have equal priority and "
            f"specificity; {ranked[-1][2]} wins as the later rule" for _, rule, origin in tied]


def _decide_node(node, candidates, rules, substitution, effective, int8_types) -> Decision:
    if not candidates:
        what = f"module type {node.type_name}" if node.kind == "module" else f"op {node.op!r}"
        return Decision("fp32", f"no rule matches {what}, so it stays fp32", effective_type=effective)
    ranked = sorted(candidates, key=lambda c: (c[1].priority, c[1].match.specificity, c[0]))
    _, rule, origin = ranked[-1]
    overridden = [o for _, _, o in reversed(ranked[:-1])]
    reason = rule.reason or f"{rule.action} by {origin}"
    decision = Decision(
        requirement={"quantize": "int8", "float": "fp32", "passthrough": "any"}[rule.action],
        reason=reason, rule=origin, overridden=overridden, effective_type=effective,
        rule_specificity=rule.match.specificity,
    )
    preset = rules.presets[rule.qconfig] if rule.qconfig else None
    is_embedding = effective in _EMBEDDING_TYPES
    if rule.action == "quantize":
        if is_embedding:
            raise PlanError(
                f"{origin}: rule quantizes embedding {node.fqn!r}, but eager mode quantizes embeddings only "
                "weight-only; use action 'float' with qconfig 'float_qparams_weight_only'"
            )
        if preset is not None and preset.scheme == "float_qparams_weight_only":
            raise PlanError(f"{origin}: qconfig {rule.qconfig!r} is weight-only for embeddings; module {node.fqn!r} is {node.type_name}")
        if node.kind == "op":
            decision.requirement = "fp32"
            decision.note = f"op {node.op!r} outside a module cannot be quantized in eager mode; kept fp32"
        elif effective in RUNS_ON_INT8:
            pass  # no module swap: the module runs on quint8 tensors as it is, so it needs no qconfig
        elif effective not in int8_types:
            decision.requirement = "fp32"
            decision.note = f"{node.type_name} has no eager int8 module mapping; kept fp32"
        else:
            decision.qconfig = rule.qconfig or rules.default_qconfig
            chosen = rules.presets[decision.qconfig]
            if effective in _TRANSPOSED_CONV_TYPES and chosen.weight == "per_channel" and chosen.backend != "qnnpack":
                raise PlanError(
                    f"{origin}: module {node.fqn!r} ({node.type_name}) cannot use qconfig {decision.qconfig!r}: "
                    "quantized transposed convolutions support only per-tensor weights; give this rule "
                    "\"qconfig\": \"x86_per_tensor\" (or another per-tensor preset), or keep the module fp32, because "
                    "torch 2.13's x86 int8 kernel for it differs from its fake-quant simulation (check with qat-planner validate)"
                )
    elif rule.action == "float" and rule.qconfig:
        if not is_embedding or preset is None or preset.scheme != "float_qparams_weight_only":
            raise PlanError(
                f"{origin}: a float rule may only give embeddings the weight-only qconfig "
                f"'float_qparams_weight_only'; got qconfig {rule.qconfig!r} for {node.fqn!r}"
            )
        decision.qconfig = rule.qconfig
    if decision.requirement == "int8" or (substitution and decision.requirement == "any"):
        decision.substitution = substitution
    return decision


def _fusion_patterns(rules: ResolvedRules) -> list[tuple[str, ...]]:
    if rules.fusions == "torch":
        patterns = [tuple(f"{t.__module__}.{t.__qualname__}" for t in key) for key in _DEFAULT_OP_LIST_TO_FUSER_METHOD]
    else:
        patterns = list(rules.fusions)
    return sorted(patterns, key=len, reverse=True)


def _find_fusions(graph: OpGraph, decisions: dict[str, Decision], rules: ResolvedRules):
    """Find chains matching a fusion pattern whose head is int8; their members then follow the head."""
    patterns = _fusion_patterns(rules)
    fused: set[str] = set()
    chains: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    for node in graph.module_nodes():
        head = decisions[node.name]
        if node.name in fused or head.requirement != "int8":
            continue
        for pattern in patterns:
            chain = _follow_chain(graph, node, pattern, decisions, fused)
            if chain is None:
                continue
            for member in chain[1:]:
                decision = decisions[member]
                decision.overridden = ([decision.rule] if decision.rule else []) + decision.overridden
                decision.requirement, decision.rule = "int8", head.rule
                decision.reason = f"fused into {node.fqn} ({' + '.join(p.rsplit('.', 1)[-1] for p in pattern)})"
                decision.qconfig = head.qconfig
            fused.update(chain)
            chains.append((chain, tuple(p.rsplit(".", 1)[-1] for p in pattern)))
            break
    unfused = []
    if not chains:
        unfused.append("no module chain in the model matches a fusion pattern (such as Linear+ReLU or Conv+BN+ReLU)")
    return chains, unfused


def _follow_chain(graph, node, pattern, decisions, fused) -> tuple[str, ...] | None:
    """Return the module names along ``pattern`` starting at ``node``, or ``None`` where the chain breaks.

    Every member but the last must have exactly one consumer, every member but the head exactly one
    producer and one call site, and no member may be kept fp32 by a rule more specific than a type rule.
    """
    names = [node.name]
    current = node
    for position, expected in enumerate(pattern):
        decision = decisions[current.name]
        if not decision.effective_type or expected not in type_aliases(decision.effective_type):
            return None
        if position > 0:
            blocked = decision.rule is not None and decision.requirement == "fp32" and _specific_rule(decision)
            if current.calls != 1 or current.name in fused or blocked or len(graph.predecessors(current.name)) != 1:
                return None
        if position == len(pattern) - 1:
            return tuple(names)
        successors = graph.successors(current.name)
        if len(successors) != 1:
            return None
        current = graph.node(successors[0])
        if current.kind != "module":
            return None
        names.append(current.name)
    return None


def _specific_rule(decision: Decision) -> bool:
    return decision.rule_specificity > 1
