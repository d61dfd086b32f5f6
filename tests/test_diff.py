"""Plan diffs: GPT-2-tiny with the default rules against the same model with its first block kept fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import planner
from planner import Match, Rule, RuleSet
from planner.cli import app
from planner.diff import diff_plans, render_diff
from planner.models import resolve_model

from conftest import meta_ids

runner = CliRunner()

KEEP_FIRST = RuleSet(name="keep-first", extends=("default",),
                     rules=(Rule(match=Match(fqn="transformer.h.0.*"), action="float"),))

H0_ISLANDS = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
              "transformer.h.0.mlp.act", "transformer.h.0.mlp.c_proj"]

H0_STUBS = [
    ("quantize", "transformer.h.0.attn.c_attn", "input", 2048),
    ("dequantize", "transformer.h.0.attn.c_attn", "output", 6144),
    ("quantize", "transformer.h.0.attn.c_proj", "input", 2048),
    ("dequantize", "transformer.h.0.attn.c_proj", "output", 2048),
    ("quantize", "transformer.h.0.mlp.c_fc", "input", 2048),
    ("dequantize", "transformer.h.0.mlp.c_proj", "output", 2048),
]


@pytest.fixture(scope="module")
def plans() -> tuple[planner.Plan, planner.Plan]:
    model = resolve_model("gpt2-tiny").model("meta")
    return planner.plan(model, meta_ids(16)), planner.plan(model, meta_ids(16), rules=KEEP_FIRST)


@pytest.fixture(scope="module")
def plan_files(plans, tmp_path_factory):
    folder = tmp_path_factory.mktemp("plans")
    a, b = folder / "a.json", folder / "b.json"
    plans[0].save(a)
    plans[1].save(b)
    return a, b


def test_domain_changes_in_h0(plans):
    diff = diff_plans(*plans)
    assert [(c.name, c.kind, c.before, c.after) for c in diff.domain_changes] == [
        (name, "module", "int8", "fp32") for name in H0_ISLANDS]


def test_domain_changes_name_rules(plans):
    diff = diff_plans(*plans)
    assert all(c.rule_after == "keep-first:rules[0]" for c in diff.domain_changes)
    assert all(c.rule_before.startswith("default:rules[") for c in diff.domain_changes)


def test_six_stubs_of_h0_are_gone(plans):
    diff = diff_plans(*plans)
    assert [(b.kind, b.module, b.position, b.elements) for b in diff.boundaries_removed] == H0_STUBS


def test_no_stub_appears_or_changes(plans):
    diff = diff_plans(*plans)
    assert diff.boundaries_added == []
    assert diff.boundaries_changed == []


def test_fusions_and_node_sets_are_unchanged(plans):
    diff = diff_plans(*plans)
    assert diff.fusions_added == []
    assert diff.fusions_removed == []
    assert diff.nodes_only_before == []
    assert diff.nodes_only_after == []


def test_diff_totals_before_and_after(plans):
    totals = diff_plans(*plans).totals
    assert (totals["cost"].before, totals["cost"].after, totals["cost"].difference) == (71680, 55296, -16384)
    assert (totals["conversions"].before, totals["conversions"].after, totals["conversions"].difference) == (26, 20, -6)
    assert (totals["converted_elements"].before, totals["converted_elements"].after,
            totals["converted_elements"].difference) == (71680, 55296, -16384)


def test_plan_against_itself_is_identical(plans):
    diff = diff_plans(plans[0], plans[0])
    assert diff.identical
    assert diff.domain_changes == []
    assert all(change.difference == 0 for change in diff.totals.values())
    assert "the plans place the same stubs and fusions and give every node the same domain" in render_diff(diff)


def test_reversed_diff_adds_stubs(plans):
    diff = diff_plans(plans[1], plans[0])
    assert [(b.kind, b.module, b.position, b.elements) for b in diff.boundaries_added] == H0_STUBS
    assert diff.boundaries_removed == []
    assert diff.totals["cost"].difference == 16384


def test_text_rendering_lists_changes_and_totals(plans):
    lines = render_diff(diff_plans(*plans, labels=("a.json", "b.json"))).splitlines()
    assert lines[0] == "plan diff: a.json → b.json"
    assert "Domain changes (5)" in lines
    assert "  transformer.h.0.attn.c_attn: int8 → fp32 (rule default:rules[0] → keep-first:rules[0])" in lines
    assert "Stubs gone (6)" in lines
    assert "  DeQuantStub at output of transformer.h.0.attn.c_attn: 6144 elements, qconfig x86" in lines
    assert "  cut cost: 71680 → 55296 (-16384)" in lines
    assert "  conversions: 26 → 20 (-6)" in lines


def test_markdown_rendering_has_tables(plans):
    markdown = render_diff(diff_plans(*plans), "markdown")
    assert "| `transformer.h.0.mlp.c_fc` | int8 | fp32 | default:rules[0] | keep-first:rules[0] |" in markdown
    assert "| QuantStub | `transformer.h.0.mlp.c_fc` | input | 2048 | x86 |" in markdown
    assert "| conversions | 26 | 20 | -6 |" in markdown


def test_json_rendering_round_trips(plans):
    diff = diff_plans(*plans)
    data = json.loads(render_diff(diff, "json"))
    assert data == json.loads(diff.model_dump_json())
    assert data["totals"]["cost"] == {"before": 71680, "after": 55296, "difference": -16384}


def test_unknown_diff_format(plans):
    with pytest.raises(ValueError, match="unknown diff format 'svg'; accepted: text, json, markdown"):
        render_diff(diff_plans(*plans), "svg")


def test_cli_diff_text(plan_files):
    a, b = plan_files
    result = runner.invoke(app, ["diff", str(a), str(b)])
    assert result.exit_code == 0, result.output
    assert f"plan diff: {a} → {b}" in result.output
    assert "  conversions: 26 → 20 (-6)" in result.output


def test_cli_diff_equal_plans(plan_files):
    a, _ = plan_files
    result = runner.invoke(app, ["diff", str(a), str(a)])
    assert result.exit_code == 0, result.output
    assert "Domain changes (0)" in result.output


def test_cli_diff_json_format(plan_files):
    a, b = plan_files
    result = runner.invoke(app, ["diff", str(a), str(b), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [c["name"] for c in data["domain_changes"]] == H0_ISLANDS
    assert data["totals"]["conversions"]["difference"] == -6


def test_cli_diff_markdown_format(plan_files):
    a, b = plan_files
    result = runner.invoke(app, ["diff", str(a), str(b), "--format", "markdown"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"# Plan diff: `{a}` → `{b}`")


def test_cli_diff_invalid_file(plan_files, tmp_path):
    a, _ = plan_files
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "300"}
    completed = subprocess.run([sys.executable, "-m", "planner.cli", "diff", str(a), str(broken)],
                               capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 1
    assert completed.stderr.strip() == f"error: {broken}: invalid JSON at line 1, column 2: Expecting property name enclosed in double quotes"


def test_diff_reports_qconfig_change():
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    per_tensor = planner.RuleSet(name="pt", extends=("default",), rules=(
        planner.Rule(match=planner.Match(fqn="2"), action="quantize", qconfig="x86_per_tensor"),))
    before = planner.plan(model, (torch.randn(2, 4),))
    after = planner.plan(model, (torch.randn(2, 4),), rules=per_tensor)
    difference = diff_plans(before, after)
    assert [(c.module, c.before, c.after) for c in difference.qconfig_changes] == [("2", "x86", "x86_per_tensor")]
    assert "  2: x86 → x86_per_tensor" in render_diff(difference, "text").splitlines()
