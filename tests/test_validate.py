"""The validator: a correct plan passes every check; hand-broken plans fail the check that names the module."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel

import planner
from planner.rules import Match, Rule, RuleSet
from planner.testing import assert_plan_valid
from planner.validate import validate

from conftest import small_gpt2_config


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(small_gpt2_config())
    inputs = {"input_ids": torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))}
    return model, inputs, planner.plan(model, inputs)


def failures(report) -> dict[str, list[tuple[str, str]]]:
    return {check.name: check.failures for check in report.checks if not check.passed}


def test_gpt2_plan_passes_every_check(gpt2):
    model, inputs, plan = gpt2
    report = validate(model, inputs, plan)
    assert report.passed, report.render()
    assert len(report.checks) == 11
    assert report.render().endswith("11 of 11 checks passed")


def test_removed_stub_fails_dataflow_check(gpt2):
    model, inputs, plan = gpt2
    broken = plan.model_copy(deep=True)
    broken.boundaries = [b for b in broken.boundaries
                         if not (b.module == "transformer.h.0.attn.c_attn" and b.position == "output")]
    found = failures(validate(model, inputs, broken))
    assert found["every tensor arrives in the domain its consumer runs in"] == [
        ("transformer.h.0.attn:split#0", "receives an int8 tensor from transformer.h.0.attn.c_attn but expects fp32")]
    assert "prepare_qat → train → eval → convert → int8 forward" in found


def test_forced_int8_layer_norm_fails_requirement_check(gpt2):
    model, inputs, plan = gpt2
    broken = plan.model_copy(deep=True)
    broken.nodes["transformer.h.0.ln_1"].domain = "int8"
    found = failures(validate(model, inputs, broken))
    assert found["every node runs in the domain its rule requires"] == [
        ("transformer.h.0.ln_1", "required fp32 by default:rules[1] but planned int8")]
    assert ("transformer.h.0.ln_1", "is LayerNorm after convert, not a quantized module") in \
        found["every int8 module is quantized after convert, with weight fake-quant during training"]


def test_extra_stub_pair_fails_minimality(gpt2):
    model, inputs, plan = gpt2
    broken = plan.model_copy(deep=True)
    broken.nodes["transformer.h.0.attn.resid_dropout"].domain = "int8"
    broken.boundaries = [b for b in broken.boundaries
                         if not (b.module == "transformer.h.0.attn.c_proj" and b.position == "output")]
    broken.boundaries.append(planner.plan.__globals__["Boundary"](
        kind="dequantize", module="transformer.h.0.attn.resid_dropout", position="output", elements=1, qconfig="x86"))
    broken.boundaries.append(planner.plan.__globals__["Boundary"](
        kind="quantize", module="transformer.h.0.ln_2", position="output", elements=1, qconfig="x86"))
    broken.boundaries.append(planner.plan.__globals__["Boundary"](
        kind="dequantize", module="transformer.h.0.mlp.c_fc", position="input", elements=1, qconfig="x86"))
    report = validate(model, inputs, broken, dynamic=False)
    minimal = next(c for c in report.checks if c.name == "no cheaper plan exists (min-cut optimum)")
    assert not minimal.passed
    assert minimal.detail.startswith("plan cost ")


def test_assert_plan_valid_returns_plan():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    result = assert_plan_valid(model, (torch.randn(3, 8),))
    assert [g.types for g in result.fusions] == [["Linear", "ReLU"]]


def test_int8_layer_norm_rule_validates_with_note():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    rules = RuleSet(name="ln", extends=("default",), rules=(Rule(match=Match(type="LayerNorm"), action="quantize"),))
    result = planner.plan(model, (torch.randn(3, 8),), rules=rules)
    report = validate(model, (torch.randn(3, 8),), result)
    assert result.nodes["1"].domain == "int8"
    assert report.passed, report.render()
    assert report.checks[-1].detail == "no QAT module in torch.ao, weights quantized only at convert: 1 (LayerNorm)"


def test_assert_plan_valid_raises_with_report():
    # torch 2.13's x86 engine computes quantized ConvTranspose2d far from its fake-quant simulation.
    torch.backends.quantized.engine = "x86"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 4, 2, stride=2))
    rules = RuleSet(name="up", extends=("default",), rules=(
        Rule(match=Match(type="ConvTranspose2d"), action="quantize", qconfig="x86_per_tensor"),))
    with pytest.raises(AssertionError) as info:
        assert_plan_valid(model, (torch.randn(1, 4, 8, 8),), rules)
    assert str(info.value).startswith("plan failed validation:\n")
    assert "FAIL  int8 output close to fake-quant output" in str(info.value)


def test_per_channel_conv_transpose_rejected():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 3, 2, stride=2))
    rules = RuleSet(name="up", extends=("default",), rules=(Rule(match=Match(type="ConvTranspose2d"), action="quantize"),))
    with pytest.raises(planner.PlanError) as info:
        planner.plan(model, (torch.randn(1, 3, 8, 8),), rules=rules)
    assert str(info.value) == (
        "up:rules[0]: module '1' (ConvTranspose2d) cannot use qconfig 'x86': quantized transposed convolutions "
        'support only per-tensor weights; give this rule "qconfig": "x86_per_tensor" (or another per-tensor preset), '
        "or keep the module fp32, because torch 2.13's x86 int8 kernel for it differs from its fake-quant simulation "
        "(check with qat-planner validate)"
    )


def test_hand_placed_stubs_are_noted():
    class Placed(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = torch.ao.quantization.QuantStub()
            self.fc = nn.Linear(4, 4)
            self.dequant = torch.ao.quantization.DeQuantStub()

        def forward(self, x):
            return self.dequant(self.fc(self.quant(x)))

    result = planner.plan(Placed(), (torch.randn(2, 4),))
    assert result.notes == [
        "the model already contains QuantStub/DeQuantStub/FloatFunctional modules (quant, dequant); emit clears "
        "their qconfig so they stay identities, and the plan's own stubs do the conversions"
    ]


def test_functional_dropout_on_int8_path_is_noted():
    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.fc2(nn.functional.dropout(self.fc1(x), 0.1, self.training))

    result = planner.plan(Drop(), (torch.randn(2, 4),))
    assert result.nodes["dropout#0"].domain == "int8"
    assert result.notes == [
        "functional dropout runs on int8 tensors at dropout#0; call eval() before convert, "
        "because dropout in training mode has no int8 kernel"
    ]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_validate_cli_passes_gpt2_tiny():
    completed = run_cli("validate", "gpt2-tiny", "--seq-len", "16")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "PASS  int8 output close to fake-quant output" in completed.stdout
    assert completed.stdout.strip().endswith("11 of 11 checks passed")


def test_validate_cli_broken_plan_exits_1(tmp_path):
    completed = run_cli("plan", "gpt2-tiny", "--seq-len", "16", "--format", "json")
    data = json.loads(completed.stdout)
    data["boundaries"] = [b for b in data["boundaries"]
                          if not (b["module"] == "transformer.h.2.mlp.c_fc" and b["position"] == "input")]
    (tmp_path / "broken.json").write_text(json.dumps(data))
    completed = run_cli("validate", "gpt2-tiny", "--seq-len", "16", "--plan", str(tmp_path / "broken.json"))
    assert completed.returncode == 1
    assert "FAIL  every tensor arrives in the domain its consumer runs in" in completed.stdout
    assert "transformer.h.2.mlp.c_fc: receives an fp32 tensor from transformer.h.2.ln_2 but expects int8" in completed.stdout


def test_validate_cli_passes_gpt2_small():
    completed = run_cli("validate", "gpt2")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.strip().endswith("11 of 11 checks passed")


def test_validate_cli_forced_int8_layer_norm_exits_1(tmp_path):
    completed = run_cli("plan", "gpt2-tiny", "--seq-len", "16", "--format", "json")
    data = json.loads(completed.stdout)
    data["nodes"]["transformer.h.1.ln_2"]["domain"] = "int8"
    (tmp_path / "forced.json").write_text(json.dumps(data))
    completed = run_cli("validate", "gpt2-tiny", "--seq-len", "16", "--plan", str(tmp_path / "forced.json"))
    assert completed.returncode == 1
    assert "FAIL  every node runs in the domain its rule requires" in completed.stdout
    assert "transformer.h.1.ln_2: required fp32 by default:rules[1] but planned int8" in completed.stdout


def test_edited_requirement_is_caught(gpt2):
    model, inputs, plan = gpt2
    broken = plan.model_copy(deep=True)
    broken.nodes["transformer.h.0.ln_1"].domain = "int8"
    broken.nodes["transformer.h.0.ln_1"].requirement = "int8"
    report = validate(model, inputs, broken, dynamic=False)
    assert failures(report)["every node runs in the domain its rule requires"] == [
        ("transformer.h.0.ln_1", "records requirement int8, but its rule default:rules[1] says float")]
    minimal = next(c for c in report.checks if c.name == "no cheaper plan exists (min-cut optimum)")
    assert minimal.status in ("passed", "skipped")
