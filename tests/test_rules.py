"""Rule files: loading, the exact error for each kind of bad input, precedence and provenance."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import planner
from planner.errors import RuleError
from planner.rules import Match, Rule, RuleSet, builtin_rule_sets, load_rules, resolve_rules


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


BAD_FILES = [
    pytest.param(
        "syntax.json",
        '{"rules": [\n  {"match": {"type": "Linear"}, "action": "quantize",}\n]}',
        "syntax.json: invalid JSON at line 2, column 54: Expecting property name enclosed in double quotes",
        id="json-syntax-error",
    ),
    pytest.param(
        "key.json",
        {"rules": [{"match": {"type": "Linear"}, "action": "quantize", "priorty": 2}]},
        "key.json: rules[0].priorty: unknown key; accepted keys: match, action, qconfig, reason, priority (got 2)",
        id="unknown-rule-key",
    ),
    pytest.param(
        "match.json",
        {"rules": [{"match": {"typ": "Linear"}, "action": "quantize"}]},
        "match.json: rules[0].match.typ: unknown key; accepted keys: type, subclasses, fqn, fqn_regex, op, "
        "within_type, within_fqn, layers, rank (got 'Linear')",
        id="unknown-match-key",
    ),
    pytest.param(
        "action.json",
        {"rules": [{"match": {"type": "Linear"}, "action": "float"}, {"match": {"op": "add"}, "action": "quantise"}]},
        "action.json: rules[1].action: invalid value; input should be 'quantize', 'float' or 'passthrough' (got 'quantise')",
        id="unknown-action",
    ),
    pytest.param(
        "empty.json",
        {"rules": [{"match": {}, "action": "float"}]},
        "empty.json: rules[0].match: a match needs at least one of 'type', 'fqn', 'fqn_regex', 'op', 'within_type', "
        "'within_fqn', 'layers', 'rank' (got {})",
        id="empty-match",
    ),
    pytest.param(
        "top.json",
        {"rule": []},
        "top.json: rule: unknown key; accepted keys: version, name, description, extends, default_qconfig, presets, rules, fusions, substitutions (got [])",
        id="unknown-top-level-key",
    ),
    pytest.param(
        "subst.json",
        {"substitutions": [{"source": "MyConv", "target": "torch.nn.Conv2d"}]},
        "subst.json: substitutions[0]: unknown substitution target 'torch.nn.Conv2d'; accepted: ['torch.nn.GELU', 'torch.nn.Linear'] (got {'source': 'MyConv', 'target': 'torch.nn.Conv2d'})",
        id="unknown-substitution-target",
    ),
]


@pytest.mark.parametrize(("name", "content", "expected"), BAD_FILES)
def test_bad_rule_file_message(tmp_path, name, content, expected):
    path = write(tmp_path, name, content)
    with pytest.raises(RuleError) as info:
        load_rules(path)
    assert str(info.value) == f"{tmp_path}/{expected}"


def test_unknown_preset_names_file_and_rule(tmp_path):
    path = write(tmp_path, "preset.json", {"rules": [{"match": {"type": "Linear"}, "action": "quantize", "qconfig": "int4"}]})
    with pytest.raises(RuleError) as info:
        resolve_rules(path)
    assert str(info.value) == (
        f"{path}: rules[0].qconfig: unknown preset 'int4'; accepted: "
        "['fbgemm', 'float_qparams_weight_only', 'onednn', 'qnnpack', 'x86', 'x86_per_tensor']"
    )


def test_missing_rule_set_lists_builtins():
    with pytest.raises(RuleError) as info:
        load_rules("no-such-set")
    assert str(info.value) == "rule set 'no-such-set' not found: it is neither a built-in set (accuracy-first, cnn, default) nor a JSON file"


def test_extends_cycle_is_reported(tmp_path):
    write(tmp_path, "a.json", {"name": "a", "extends": ["b"]})
    write(tmp_path, "b.json", {"name": "b", "extends": ["a.json"]})
    with pytest.raises(RuleError) as info:
        resolve_rules(str(tmp_path / "a.json"))
    assert str(info.value) == "rule set 'a' extends itself: a -> b -> a"


def test_extends_missing_set_names_extender(tmp_path):
    path = write(tmp_path, "x.json", {"name": "x", "extends": ["nothere"]})
    with pytest.raises(RuleError) as info:
        resolve_rules(path)
    assert str(info.value) == (
        f"rule set 'nothere', extended by 'x', not found: it is neither a built-in set (accuracy-first, cnn, default) nor a file in {tmp_path}"
    )


def test_builtin_sets_round_trip():
    for name, path in builtin_rule_sets().items():
        loaded = load_rules(name)
        again = RuleSet.model_validate_json(loaded.model_dump_json())
        assert again == loaded, name
        assert json.loads(path.read_text())["name"] == name


def test_default_set_reads_fusions_from_torch():
    resolved = resolve_rules("default")
    assert resolved.fusions == "torch"
    assert resolved.default_qconfig == "x86"


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.second = nn.Linear(8, 8)

    def forward(self, x):
        return self.second(self.norm(self.first(x)))


def test_specific_rule_overrides_type_rule(tmp_path):
    path = write(tmp_path, "keep.json", {
        "name": "keep-first", "extends": ["default"],
        "rules": [{"match": {"fqn": "first"}, "action": "float", "reason": "accuracy-sensitive input layer"}],
    })
    result = planner.plan(TwoLinears(), (torch.randn(2, 8),), rules=path)
    first = result.nodes["first"]
    assert first.domain == "fp32"
    assert first.rule == "keep-first:rules[0]"
    assert first.rule_file == path
    assert first.reason == "accuracy-sensitive input layer"
    assert first.overridden == ["default:rules[0]"]
    assert result.nodes["second"].domain == "int8"
    assert [(b.kind, b.module, b.position) for b in result.boundaries] == [
        ("quantize", "second", "input"), ("dequantize", "second", "output")]


def test_priority_beats_specificity():
    rules = RuleSet(name="py", extends=("default",), rules=(
        Rule(match=Match(type="Linear"), action="float", priority=10),
        Rule(match=Match(fqn="second"), action="quantize"),
    ))
    result = planner.plan(TwoLinears(), (torch.randn(2, 8),), rules=rules)
    assert result.nodes["second"].domain == "fp32"
    assert result.nodes["second"].rule == "py:rules[0]"
    assert result.stats.conversions == 0


def test_later_rule_wins_a_tie():
    rules = RuleSet(name="py", extends=("default",), rules=(
        Rule(match=Match(type="Linear"), action="float"),
        Rule(match=Match(type="Linear"), action="quantize"),
    ))
    result = planner.plan(TwoLinears(), (torch.randn(2, 8),), rules=rules)
    assert result.nodes["first"].rule == "py:rules[1]"
    assert result.nodes["first"].overridden == ["py:rules[0]", "default:rules[0]"]


def test_unmatched_module_stays_fp32_with_reason():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.odd = Odd()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.odd(x))

    result = planner.plan(Model(), (torch.randn(2, 4),))
    assert result.nodes["odd"].domain == "fp32"
    assert result.nodes["odd"].reason == "no rule matches module type Odd, so it stays fp32"
    assert result.nodes["odd"].rule is None


def test_quantize_rule_on_op_is_kept_fp32_with_note():
    class AddModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return y + y

    rules = RuleSet(name="py", extends=("default",), rules=(Rule(match=Match(op="add"), action="quantize"),))
    result = planner.plan(AddModel(), (torch.randn(2, 4),), rules=rules)
    assert result.nodes["add#0"].domain == "fp32"
    assert result.notes == ["add#0: op 'add' outside a module cannot be quantized in eager mode; kept fp32"]


def test_embedding_quantize_rule_rejected():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    rules = RuleSet(name="py", extends=("default",), rules=(Rule(match=Match(type="Embedding"), action="quantize"),))
    with pytest.raises(planner.PlanError) as info:
        planner.plan(model, (torch.zeros(1, 3, dtype=torch.long),), rules=rules)
    assert str(info.value) == (
        "py:rules[0]: rule quantizes embedding '0', but eager mode quantizes embeddings only weight-only; "
        "use action 'float' with qconfig 'float_qparams_weight_only'"
    )


def test_invalid_regex_rejected_at_load(tmp_path):
    path = write(tmp_path, "regex.json", {"rules": [{"match": {"fqn_regex": "transformer.(h"}, "action": "float"}]})
    with pytest.raises(RuleError) as info:
        load_rules(path)
    assert str(info.value) == (
        f"{path}: rules[0].match.fqn_regex: invalid regular expression: missing ), unterminated subpattern "
        "at position 12 (got 'transformer.(h')"
    )


def test_schema_key_is_accepted(tmp_path):
    path = write(tmp_path, "edited.json", {"$schema": "rules.schema.json", "rules": [{"match": {"type": "Linear"}, "action": "float"}]})
    assert load_rules(path).name == "edited"
