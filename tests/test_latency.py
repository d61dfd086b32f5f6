"""The latency objective: calibration, op classes and sizes, plans that follow the costs, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2LMHeadModel
from typer.testing import CliRunner

import planner
from conftest import small_gpt2_config
from planner.cli import app
from planner.costs import CostModel, OpCost, calibrate, latency_costs, op_class, predict
from planner.errors import PlanError
from planner.models import resolve_model
from planner.trace import trace
from planner.validate import validate

runner = CliRunner()


def cost_model(gelu_int8_ns: float, gelu_fp32_ns: float = 1.0, conversion_ns: float = 0.1) -> CostModel:
    """A cost model with round numbers: only GELU's per-element time changes between tests."""
    def cost(ns: float, fixed: float = 1.0) -> OpCost:
        return OpCost(fixed_us=fixed, ns_per_unit=ns)

    fp32 = {"linear": cost(0.02), "attention": cost(0.05), "norm": cost(0.3), "gelu": cost(gelu_fp32_ns),
            "gelu_formula": cost(4.0), "add": cost(0.1), "embedding": cost(0.1), "copy": cost(0.05),
            "view": cost(0.0), "elementwise": cost(1.0)}
    int8 = {"linear": cost(0.005), "gelu": cost(gelu_int8_ns), "copy": cost(0.02), "view": cost(0.0)}
    return CostModel(torch="test", engine="x86", cpu="test", threads=2, calibrated_at="2026-12-04T00:00:00+00:00",
                     quantize=cost(conversion_ns, 5.0), dequantize=cost(conversion_ns, 5.0), fp32=fp32, int8=int8)


@pytest.fixture(scope="module")
def gpt2_small():
    spec = resolve_model("gpt2")
    return spec.model("meta"), spec.example_inputs("meta", 128, None)


def test_op_classes_and_sizes_of_gpt2_block(gpt2_small):
    model, inputs = gpt2_small
    graph = trace(model, (), {**inputs, "use_cache": False})
    assert op_class(graph.node("transformer.h.0.attn.c_attn"), graph) == ("linear", 128 * 768 * 2304)
    assert op_class(graph.node("lm_head"), graph) == ("linear", 128 * 768 * 50257)
    assert op_class(graph.node("transformer.h.0.ln_1"), graph) == ("norm", 128 * 768)
    # HF writes GELU as its formula; once substituted it is torch's GELU kernel.
    act = graph.node("transformer.h.0.mlp.act")
    assert op_class(act, graph) == ("gelu_formula", 128 * 3072)
    assert op_class(act, graph, effective_type="torch.nn.GELU") == ("gelu", 128 * 3072)
    attention = next(n for n in graph.nodes() if n.op == "scaled_dot_product_attention")
    assert op_class(attention, graph) == ("attention", 12 * 128 * 64 * 128)


@pytest.mark.parametrize(("gelu_int8_ns", "expected"), [(20.0, "fp32"), (0.2, "int8")])
def test_gelu_runs_in_the_faster_domain(gpt2_small, gelu_int8_ns, expected):
    model, inputs = gpt2_small
    plan = planner.plan(model, inputs, objective="latency", cost_model=cost_model(gelu_int8_ns))
    for index in range(12):
        assert plan.nodes[f"transformer.h.{index}.mlp.act"].domain == expected
    mlp = [(b.kind, b.module.rsplit(".", 1)[-1], b.position) for b in plan.boundaries if b.module.startswith("transformer.h.0.mlp")]
    if expected == "fp32":
        assert mlp == [("quantize", "c_fc", "input"), ("dequantize", "c_fc", "output"),
                       ("quantize", "c_proj", "input"), ("dequantize", "c_proj", "output")]
    else:
        assert mlp == [("quantize", "c_fc", "input"), ("dequantize", "c_proj", "output")]
    # Substitutions apply in both domains, so an fp32 GELU is torch's kernel, not HF's formula.
    assert sum(s.target == "torch.nn.GELU" for s in plan.substitutions) == 12


def test_plan_records_prediction_that_adds_up(gpt2_small):
    model, inputs = gpt2_small
    plan = planner.plan(model, inputs, objective="latency", cost_model=cost_model(20.0))
    assert plan.latency is not None and plan.cost_model is not None
    assert plan.latency.total_ms == pytest.approx(sum(plan.latency.by_class.values()), abs=1e-3)
    # 12 blocks x 4 projections (7.08 M MACs per token) plus the LM head, at 0.005 ns per MAC.
    macs = 128 * 12 * 768 * (2304 + 768 + 3072 + 3072) + 128 * 768 * 50257
    assert plan.latency.by_class["linear int8"] == pytest.approx((macs * 0.005 + 49 * 1000) / 1e6, rel=1e-3)
    assert list(plan.latency.by_class)[0] == "linear int8"
    again = planner.Plan.model_validate_json(plan.model_dump_json())
    assert again.latency == plan.latency and again.cost_model == plan.cost_model


def test_latency_plan_validates_and_reports_measured_time():
    model = GPT2LMHeadModel(small_gpt2_config()).eval()
    ids = {"input_ids": torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))}
    plan = planner.plan(model, ids, objective="latency", cost_model=cost_model(20.0))
    report = validate(model, ids, plan)
    assert report.passed, report.render()
    timing = report.checks[-1]
    assert timing.status == "info" and timing.name.startswith("int8 forward time against the cost model")
    assert timing.detail.startswith("predicted ") and " ms, measured " in timing.detail
    assert "11 of 11 checks passed" in report.render()  # the timing is reported, not counted


def test_predict_prices_other_lengths(gpt2_small):
    model, inputs = gpt2_small
    plan = planner.plan(model, inputs, objective="latency", cost_model=cost_model(20.0))
    short = predict(model, resolve_model("gpt2").example_inputs("meta", 32, None), plan)
    assert short.total_ms < plan.latency.total_ms
    other = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with pytest.raises(PlanError, match=r"the plan does not cover 3 node\(s\) of this trace \(input:input, 0, 1\); plan the model again"):
        predict(other, (torch.randn(2, 4),), plan)


def test_latency_costs_are_integer_nanoseconds(gpt2_small):
    model, inputs = gpt2_small
    graph = trace(model, (), {**inputs, "use_cache": False})
    costs = latency_costs(graph, cost_model(20.0))
    fp32, int8 = costs.nodes["transformer.h.0.mlp.act"]
    assert fp32 == int8 == 1000 + round(128 * 3072 * 4.0)  # HF's formula has no int8 kernel: fp32 price in both
    substituted = latency_costs(graph, cost_model(20.0), effective_types={"transformer.h.0.mlp.act": "torch.nn.GELU"})
    assert substituted.nodes["transformer.h.0.mlp.act"] == (1000 + round(128 * 3072 * 1.0), 1000 + round(128 * 3072 * 20.0))
    assert costs.conversion("quantize", 1000) == 5000 + 100


def test_calibrate_measures_every_class():
    model = calibrate(threads=1, quick=True, budget=0.02)
    assert set(model.fp32) >= {"linear", "conv", "attention", "matmul", "softmax", "embedding", "norm", "gelu",
                               "gelu_formula", "relu", "add", "elementwise", "copy", "view"}
    assert set(model.int8) == {"linear", "conv", "gelu", "relu", "copy", "view"}
    assert model.threads == 1 and model.torch == torch.__version__
    assert all(c.fixed_us >= 0 and c.ns_per_unit >= 0 for c in [*model.fp32.values(), *model.int8.values()])
    # The reason int8 exists: a multiply-accumulate is cheaper than in fp32 (4x on x86 here).
    assert model.int8["linear"].ns_per_unit < model.fp32["linear"].ns_per_unit


def test_cost_model_file_errors(tmp_path):
    broken = tmp_path / "costs.json"
    broken.write_text('{"version": 1, "torch": "2.13.0"}')
    with pytest.raises(PlanError, match=r"costs.json: not a qat-planner cost model \(engine: Field required\); "
                                        r"delete it and run `qat-planner calibrate`"):
        CostModel.load(broken)
    broken.write_text("not json")
    with pytest.raises(PlanError, match=r"costs.json: not a qat-planner cost model \(Invalid JSON: expected ident at line 1 column 2\); delete it"):
        CostModel.load(broken)
    with pytest.raises(PlanError, match=r"missing.json: cannot read cost model: No such file or directory; run `qat-planner calibrate`"):
        CostModel.load(tmp_path / "missing.json")


def test_cli_calibrate_then_plan_for_latency(tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_PLANNER_CACHE", str(tmp_path / "cache"))
    costs = tmp_path / "costs.json"
    cost_model(20.0).save(costs)
    env = {"NO_COLOR": "1", "COLUMNS": "300"}
    shown = runner.invoke(app, ["calibrate", "--show", "--out", str(costs)], env=env)
    assert shown.exit_code == 0, shown.output
    assert "gelu_formula" in shown.output and f"read {costs}" in shown.output

    result = runner.invoke(app, ["plan", "gpt2-tiny", "--seq-len", "32", "--objective", "latency", "--cost-model", str(costs),
                                 "--format", "json"], env=env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["objective"] == "latency"
    assert data["nodes"]["transformer.h.0.mlp.act"]["domain"] == "fp32"
    assert data["latency"]["cost_model"] == "torch test, engine x86, 2 threads, test"

    text = runner.invoke(app, ["plan", "gpt2-tiny", "--seq-len", "32", "--objective", "latency", "--cost-model", str(costs)], env=env)
    assert "predicted int8 forward " in text.output and "(linear int8 " in text.output


def test_cli_show_without_cache_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_PLANNER_CACHE", str(tmp_path))
    result = runner.invoke(app, ["calibrate", "--show"], env={"NO_COLOR": "1"})
    assert result.exit_code != 0
    assert "cannot read cost model: No such file or directory; run `qat-planner calibrate`" in str(result.exception)
