"""The full rule language: match fields, Python predicates, presets, provenance, dead rules and conflicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import planner
from planner.explain import explain
from planner.models import resolve_model
from planner.rules import Layers, Match, Rule, RuleSet, builtin_rule_sets, load_rules
from planner.errors import RuleError


@pytest.fixture(scope="module")
def gpt2_small():
    spec = resolve_model("gpt2")
    return spec.model("meta"), spec.example_inputs("meta", 128, None)


@pytest.fixture(scope="module")
def gpt2_tiny():
    spec = resolve_model("gpt2-tiny")
    return spec.model("meta"), spec.example_inputs("meta", 16, None)


def projections(plan: planner.Plan, domain: str) -> list[str]:
    return [name for name, node in plan.nodes.items()
            if node.kind == "module" and node.domain == domain and node.type.endswith(("Conv1D", ".Linear"))]


def test_accuracy_first_keeps_first_last_and_head(gpt2_small):
    model, inputs = gpt2_small
    plan = planner.plan(model, inputs, rules="accuracy-first")
    kept = [f"transformer.h.{i}.{m}" for i in (0, 11) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert projections(plan, "fp32") == kept + ["lm_head"]
    assert len(projections(plan, "int8")) == 40
    text = explain(plan, "transformer.h.0.mlp.c_fc")
    assert "    WON  accuracy-first:rules[0]: float {\"layers\": {\"first\": 1}}" in text
    assert "    lost default:rules[0]: quantize {\"type\": [\"Linear\", \"Conv1d\", \"Conv2d\", \"Conv3d\"]}" in text
    assert "  domain: fp32 (rules require fp32)" in text


def test_explain_shows_stub_and_neighbours(gpt2_tiny):
    plan = planner.plan(*gpt2_tiny)
    text = explain(plan, "transformer.h.1.attn.c_proj")
    assert "    from transformer.h.1.attn:reshape#1 (reshape): fp32" in text
    assert "    to transformer.h.1.attn.resid_dropout (Dropout): fp32" in text
    assert "  stub: QuantStub at its input, 2048 elements, qconfig x86" in text
    assert "  stub: DeQuantStub at its output, 2048 elements, qconfig x86" in text


def test_explain_unknown_node_suggests_names(gpt2_tiny):
    plan = planner.plan(*gpt2_tiny)
    with pytest.raises(planner.PlanError) as info:
        explain(plan, "transformer.h.0.mlp.cfc")
    assert str(info.value).startswith("no node named 'transformer.h.0.mlp.cfc' in the plan of "
                                      "transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel; did you mean transformer.h.0.mlp.c_fc")


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        pytest.param({"first": 2}, [0, 1], id="first"),
        pytest.param({"last": 1}, [3], id="last"),
        pytest.param({"range": [1, 2]}, [1, 2], id="range"),
        pytest.param({"index": [0, 3]}, [0, 3], id="index"),
    ],
)
def test_layers_select_blocks(gpt2_tiny, layers, expected):
    rules = RuleSet(name="py", extends=("default",), rules=(
        Rule(match=Match(type="Conv1D", fqn="*.mlp.c_fc", layers=Layers(**layers)), action="float"),))
    plan = planner.plan(*gpt2_tiny, rules=rules)
    kept = [i for i in range(4) if plan.nodes[f"transformer.h.{i}.mlp.c_fc"].domain == "fp32"]
    assert kept == expected


def test_layers_need_exactly_one_selector():
    with pytest.raises(ValueError, match="set exactly one of 'first', 'last', 'range' or 'index'; got \\['first', 'last'\\]"):
        Layers(first=1, last=1)


def test_within_type_and_rank_match(gpt2_tiny):
    rules = RuleSet(name="py", extends=("default",), rules=(
        Rule(match=Match(type="Conv1D", within_type="GPT2Attention"), action="float", reason="attention in fp32"),
        Rule(match=Match(op="view", rank=2), action="float"),
    ))
    plan = planner.plan(*gpt2_tiny, rules=rules)
    assert plan.nodes["transformer.h.0.attn.c_attn"].domain == "fp32"
    assert plan.nodes["transformer.h.0.attn.c_attn"].reason == "attention in fp32"
    assert plan.nodes["transformer.h.0.mlp.c_fc"].domain == "int8"


class MyLinear(nn.Linear):
    pass


class Sub(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = MyLinear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


def test_subclasses_match_only_when_asked():
    inputs = (torch.randn(2, 4),)
    assert planner.plan(Sub(), inputs).nodes["a"].domain == "fp32"
    rules = RuleSet(name="py", extends=("default",), rules=(Rule(match=Match(type="Linear", subclasses=True), action="quantize"),))
    plan = planner.plan(Sub(), inputs, rules=rules)
    assert plan.nodes["a"].rule == "py:rules[0]"
    # MyLinear has no eager int8 mapping of its own (torch maps exact types), so the planner keeps it fp32 and records a note.
    assert plan.nodes["a"].domain == "fp32"
    assert plan.nodes["a"].note == "MyLinear has no eager int8 module mapping; kept fp32"


def test_where_predicate_in_python():
    rules = RuleSet(name="py", extends=("default",), rules=(
        Rule(match=Match(type="Linear", where=lambda node: node.output_shape[-1] == 4 and node.fqn == "b"), action="float"),))
    plan = planner.plan(Sub(), (torch.randn(2, 4),), rules=rules)
    assert plan.nodes["b"].domain == "fp32"
    assert plan.nodes["b"].rule == "py:rules[0]"


def test_where_predicate_cannot_be_saved(tmp_path):
    rules = RuleSet(name="py", rules=(
        Rule(match=Match(type="Linear"), action="quantize"),
        Rule(match=Match(where=lambda node: True), action="float"),
    ))
    with pytest.raises(RuleError) as info:
        rules.save(tmp_path / "py.json")
    assert str(info.value) == (
        "rule set 'py' cannot be saved as JSON: rules[1] has a Python where= predicate; express it with JSON match "
        "fields (fqn, fqn_regex, layers, within_type, ...) or keep this set in Python"
    )
    assert not (tmp_path / "py.json").exists()


def test_dead_rule_reported_and_strict_fails(tmp_path, gpt2_tiny):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"name": "typo", "extends": ["default"],
                                "rules": [{"match": {"type": "LayerNrom"}, "action": "float"}]}))
    plan = planner.plan(*gpt2_tiny, rules=str(path))
    assert plan.dead_rules == ["typo:rules[0]"]
    with pytest.raises(planner.PlanError) as info:
        planner.plan(*gpt2_tiny, rules=str(path), strict=True)
    assert str(info.value) == (
        f"rules match no node of GPT2LMHeadModel (strict mode): typo:rules[0] in {path}; fix the match or remove the rule"
    )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_strict_plan_exits_1_naming_rule_and_file(tmp_path):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"name": "typo", "extends": ["default"],
                                "rules": [{"match": {"type": "LayerNrom"}, "action": "float"}]}))
    completed = run_cli("plan", "gpt2-tiny", "--rules", str(path), "--strict")
    assert completed.returncode == 1
    assert completed.stderr.strip() == (
        f"error: rules match no node of GPT2LMHeadModel (strict mode): typo:rules[0] in {path}; fix the match or remove the rule"
    )
    relaxed = run_cli("plan", "gpt2-tiny", "--rules", str(path), "--format", "json")
    assert relaxed.returncode == 0
    assert f'warning: rule typo:rules[0] ({path}) matches no node: float {{"type": ["LayerNrom"]}}' in relaxed.stderr


def test_conflict_is_reported(gpt2_tiny):
    rules = RuleSet(name="py", extends=("default",), rules=(
        Rule(match=Match(fqn="transformer.h.0.mlp.c_fc"), action="float"),
        Rule(match=Match(fqn="transformer.h.0.mlp.c_fc"), action="quantize"),
    ))
    plan = planner.plan(*gpt2_tiny, rules=rules)
    assert plan.nodes["transformer.h.0.mlp.c_fc"].domain == "int8"
    assert plan.conflicts == [
        "transformer.h.0.mlp.c_fc: py:rules[0] (float) and py:rules[1] (quantize) have equal priority and "
        "specificity; py:rules[1] wins as the later rule"
    ]


def test_shipped_rule_files_match_schema():
    schema = RuleSet.model_json_schema()
    for name, path in builtin_rule_sets().items():
        data = json.loads(path.read_text())
        jsonschema.validate(data, schema)
        loaded = load_rules(name)
        assert RuleSet.model_validate_json(loaded.to_json()) == loaded


def test_rules_check_lists_every_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rules": [{"match": {"type": "Linear"}, "action": "int8"}, {"match": {"opp": "add"}, "action": "float"}]}))
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"extends": ["default"], "rules": [{"match": {"op": "add"}, "action": "float"}]}))
    completed = run_cli("rules", "check", str(good), str(bad))
    assert completed.returncode == 1
    assert completed.stdout.splitlines() == [
        f"OK    {good}: 8 rules after extends (default+good)",
        f"FAIL  {bad}: rules[0].action: invalid value; input should be 'quantize', 'float' or 'passthrough' (got 'int8')",
        f"FAIL  {bad}: rules[1].match.opp: unknown key; accepted keys: type, subclasses, fqn, fqn_regex, op, within_type, "
        "within_fqn, layers, rank (got 'add')",
    ]


def test_rules_schema_and_show():
    schema = json.loads(run_cli("rules", "schema").stdout)
    assert set(schema["$defs"]) >= {"Rule", "Match", "Layers", "QConfigPreset", "Fusion", "Substitution"}
    shown = json.loads(run_cli("rules", "show", "accuracy-first").stdout)
    assert shown["name"] == "default+accuracy-first"
    assert len(shown["rules"]) == 10
    assert "extends" not in shown


# ---- property tests over generated rule sets ---------------------------------------------------------

TYPES = ["Linear", "LayerNorm", "Conv1D", "Dropout", "GELU", "Embedding"]
FQNS = ["transformer.h.0.*", "transformer.h.*.mlp.*", "lm_head", "*.attn.*", "transformer.h.1.mlp.c_fc"]


@st.composite
def rule_sets(draw):
    rules = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["type", "fqn", "both", "layers"]))
        match = {}
        if kind in ("type", "both"):
            match["type"] = draw(st.sampled_from(TYPES))
        if kind in ("fqn", "both"):
            match["fqn"] = draw(st.sampled_from(FQNS))
        if kind == "layers":
            match["layers"] = {"first": draw(st.integers(1, 3))}
        action = draw(st.sampled_from(["quantize", "float", "passthrough"]))
        if match.get("type") == "Embedding" and action == "quantize":
            action = "float"
        rules.append(Rule(match=Match(**match), action=action, priority=draw(st.integers(0, 3))))
    return RuleSet(name="generated", extends=("default",), rules=tuple(rules))


@settings(max_examples=50, deadline=None)
@given(rule_sets())
def test_generated_rule_set_round_trips(ruleset):
    assert RuleSet.model_validate_json(ruleset.to_json()) == ruleset


def reference_winner(node, node_types: set[str], candidates: list[tuple[int, Rule, str]]) -> str | None:
    """Precedence written out plainly: highest priority, then highest specificity, then the latest rule."""
    best = None
    for index, rule, origin in candidates:
        key = (rule.priority, rule.match.specificity, index)
        if best is None or key > best[0]:
            best = (key, origin)
    return best[1] if best else None


@pytest.fixture(scope="module")
def tiny_graph():
    from planner.rules import resolve_rules  # noqa: F401 - imported for the fixture's users
    from planner.trace import trace

    spec = resolve_model("gpt2-tiny")
    model = spec.model("meta")
    return model, spec.example_inputs("meta", 16, None), trace(model, (), {**spec.example_inputs("meta", 16, None), "use_cache": False})


@settings(max_examples=12, deadline=None)
@given(rule_sets(), st.randoms(use_true_random=False))
def test_precedence_matches_reference_and_ignores_order(tiny_graph, ruleset, rng):
    from planner.match import _rule_matches, block_counts, type_aliases
    from planner.rules import resolve_rules

    model, inputs, graph = tiny_graph
    plan = planner.plan(model, inputs, rules=ruleset)
    resolved = resolve_rules(ruleset)
    counts = block_counts(graph)
    for node in graph.nodes():
        if node.kind not in ("module", "op"):
            continue
        names = type_aliases(node.module_type) if node.module_type else set()
        substitution = next((s for s in reversed(resolved.substitutions) if node.module_type and s.source in names), None)
        if substitution is not None:
            names |= type_aliases({"torch.nn.Linear": "torch.nn.modules.linear.Linear",
                                   "torch.nn.GELU": "torch.nn.modules.activation.GELU"}[substitution.target])
        candidates = [(i, rule, str(origin)) for i, (rule, origin) in enumerate(resolved.rules)
                      if _rule_matches(rule, node, names, set(), counts)]
        expected = reference_winner(node, names, candidates)
        if "fused into" not in plan.nodes[node.name].reason:
            assert plan.nodes[node.name].rule == expected, node.name

    # Rules of distinct priorities decide the same way in any order.
    by_priority = {}
    for rule in ruleset.rules:
        by_priority.setdefault(rule.priority, rule)
    distinct = list(by_priority.values())
    shuffled = distinct[:]
    rng.shuffle(shuffled)
    first = planner.plan(model, inputs, rules=RuleSet(name="a", extends=("default",), rules=tuple(distinct)))
    second = planner.plan(model, inputs, rules=RuleSet(name="a", extends=("default",), rules=tuple(shuffled)))
    assert {n: d.domain for n, d in first.nodes.items()} == {n: d.domain for n, d in second.nodes.items()}
    assert first.boundaries == second.boundaries


def test_schema_accepts_what_loader_accepts(tmp_path):
    schema = RuleSet.model_json_schema()
    document = {"$schema": "rules.schema.json", "extends": "default",
                "rules": [{"match": {"type": "Linear", "fqn": "lm_head", "rank": 3}, "action": "float"}]}
    jsonschema.validate(document, schema)
    path = tmp_path / "single.json"
    path.write_text(json.dumps(document))
    loaded = load_rules(str(path))
    assert loaded.name == "single"
    assert loaded.rules[0].match.type == ("Linear",)


def test_quantize_rule_on_gelu_keeps_it_int8():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))
    rules = RuleSet(name="py", extends=("default",), rules=(Rule(match=Match(type="GELU"), action="quantize"),))
    plan = planner.plan(model, (torch.randn(2, 4),), rules=rules)
    assert plan.nodes["1"].domain == "int8"
    assert plan.notes == []
    assert "1" not in plan.qconfigs
    assert plan.stats.conversions == 2


def test_explain_gives_passthrough_and_fusion_reasons(gpt2_tiny):
    plan = planner.plan(*gpt2_tiny)
    text = explain(plan, "transformer.h.0.attn:split#0")
    assert ("  why fp32: it leads to transformer.h.0.attn:scaled_dot_product_attention#0, which is fp32 by "
            "default:rules[3]; an op has no module boundary where a stub could go, so it shares that domain") in text
    fused = planner.plan(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),))
    text = explain(fused, "1")
    assert "    WON  fusion: fused into 0 (Linear + ReLU), decided by the head's rule default:rules[0]" in text
    assert "    lost default:rules[6]: passthrough" in text


def test_where_predicate_failure_names_node():
    rules = RuleSet(name="py", extends=("default",), rules=(
        Rule(match=Match(type="Linear", where=lambda node: node.missing_attribute), action="float"),))
    with pytest.raises(RuleError, match="the where= predicate of a rule failed on node 'b': AttributeError"):
        planner.plan(Sub(), (torch.randn(2, 4),), rules=rules)


def test_folder_keeps_attention_implementation(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(tmp_path / "bert")
    # transformers 5 does not write attn_implementation itself, but honours it when a user adds it.
    saved = json.loads((tmp_path / "bert" / "config.json").read_text())
    (tmp_path / "bert" / "config.json").write_text(json.dumps({**saved, "attn_implementation": "eager"}))
    spec = resolve_model(str(tmp_path / "bert"))
    plan = planner.plan(spec.model("meta"), spec.example_inputs("meta", 8, None))
    ops = {node.op for node in plan.nodes.values() if node.kind == "op"}
    assert "softmax" in ops
    assert "scaled_dot_product_attention" not in ops
