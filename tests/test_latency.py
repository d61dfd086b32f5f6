"""The latency objective: calibration, op classes and sizes, plans that follow the costs, and the CLI."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import torch.ao.quantization as tq
from conftest import small_gpt2_config
from transformers import GPT2LMHeadModel
from typer.testing import CliRunner

import planner
from planner.cli import app
from planner.costs import (
    CostModel,
    OpCost,
    _fit,
    calibrate,
    default_cost_model_path,
    latency_costs,
    load_cost_model,
    op_class,
    predict,
    weight_elements,
)
from planner.errors import PlanError, PlannerWarning
from planner.explain import explain
from planner.models import resolve_model
from planner.optimize import merged_from_rows
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
    assert again.latency == plan.latency
    assert again.cost_model == plan.cost_model


def test_latency_plan_validates_and_reports_measured_time():
    model = GPT2LMHeadModel(small_gpt2_config()).eval()
    ids = {"input_ids": torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))}
    plan = planner.plan(model, ids, objective="latency", cost_model=cost_model(20.0))
    report = validate(model, ids, plan)
    assert report.passed, report.render()
    timing = report.checks[-1]
    assert timing.status == "info"
    assert timing.name.startswith("int8 forward time against the cost model")
    assert timing.detail.startswith("predicted ")
    assert " ms, measured " in timing.detail
    assert " ms on input_ids (1, 16) (median of 5, 2 threads), prediction " in timing.detail
    assert "11 of 11 checks passed" in report.render()  # the timing is reported, not counted


def test_validate_page_fault_hint(monkeypatch):
    # Stand in for glibc returning a 25 MB buffer to the OS after every forward: 6400 faults of 4 KiB.
    counter = iter(range(0, 10**9, 6400))
    monkeypatch.setattr("planner.validate._page_faults", lambda: next(counter))
    monkeypatch.setattr("planner.validate._PAGE_BYTES", 4096)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16))
    inputs = (torch.randn(4, 16),)
    plan = planner.plan(model, inputs, objective="latency", cost_model=cost_model(20.0))
    timing = validate(model, inputs, plan).checks[-1]
    assert timing.detail.endswith("; each forward page-faults on about 25 MB of new memory, time the cost model does not "
                                  "price: a caching allocator (jemalloc or tcmalloc through LD_PRELOAD) or "
                                  "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 keeps freed buffers")


def test_explain_latency_placement(gpt2_small):
    model, inputs = gpt2_small
    plan = planner.plan(model, inputs, objective="latency", cost_model=cost_model(20.0))
    text = explain(plan, "transformer.h.0.mlp.act")
    assert ("the latency cut priced it lower in fp32: its predicted time there, with the conversions that placement "
            "needs, is below its time in int8") in text


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
    assert set(model.int8) == {"linear", "linear_fp32_output", "linear_fp32_output_gelu", "conv", "gelu", "relu", "copy", "view"}
    assert model.threads == 1
    assert model.torch == torch.__version__
    costs = [*model.fp32.values(), *model.int8.values()]
    assert all(c.fixed_us >= 0 for c in costs)
    assert all(c.ns_per_unit >= 0 for c in costs)
    assert all(c.ns_per_weight >= 0 for c in costs)
    assert model.overhead_us >= 0
    # The reason int8 exists: a multiply-accumulate is cheaper than in fp32 (4x on x86 here).
    assert model.int8["linear"].ns_per_unit < model.fp32["linear"].ns_per_unit


def test_calibrated_linear_weight_term():
    # At one token a GPT-2 projection reads 2.4 MB of fp32 weight for 0.6 M multiply-accumulates:
    # the weight term is what makes the one-token time right.
    model = calibrate(threads=1, quick=True, budget=0.02)
    assert model.fp32["linear"].ns_per_weight > 0


def test_overhead_charged_per_op_and_conversion(gpt2_small):
    model, inputs = gpt2_small
    graph = trace(model, (), {**inputs, "use_cache": False})
    plain, slowed = cost_model(20.0), cost_model(20.0)
    slowed.overhead_us = 10.0
    before, after = latency_costs(graph, plain), latency_costs(graph, slowed)
    assert after.nodes["transformer.h.0.ln_1"] == (before.nodes["transformer.h.0.ln_1"][0] + 10_000,
                                                  before.nodes["transformer.h.0.ln_1"][1] + 10_000)
    assert after.conversion("quantize", 1000) == before.conversion("quantize", 1000) + 10_000


def test_fit_exact_times():
    # 10 us per call, 2 ns per unit, 0.5 ns per weight element.
    points = [(u, w, 10e-6 + 2e-9 * u + 0.5e-9 * w) for u, w in [(1e3, 1e4), (1e5, 1e4), (1e5, 1e6), (1e7, 1e6), (1e6, 1e5)]]
    fitted = _fit(points)
    assert (fitted.fixed_us, fitted.ns_per_unit, fitted.ns_per_weight) == pytest.approx((10.0, 2.0, 0.5), rel=1e-6)


def test_fit_non_negative():
    # Time falls as units grow (noise): the fit keeps a fixed cost rather than a negative slope.
    fitted = _fit([(1.0, 0, 3e-6), (10.0, 0, 2e-6), (100.0, 0, 1e-6)])
    assert fitted.ns_per_unit == 0.0
    assert fitted.fixed_us > 0


def test_weight_elements_of_gpt2_nodes(gpt2_small):
    model, inputs = gpt2_small
    graph = trace(model, (), {**inputs, "use_cache": False})
    assert weight_elements(graph.node("transformer.h.0.attn.c_attn"), graph, "linear") == 768 * 2304
    assert weight_elements(graph.node("lm_head"), graph, "linear") == 768 * 50257
    attention = next(n for n in graph.nodes() if n.op == "scaled_dot_product_attention")
    assert weight_elements(attention, graph, "attention") == 0


def test_predict_after_merge_dequantize(gpt2_small):
    model, inputs = gpt2_small
    costs = cost_model(20.0)
    costs.int8["linear_fp32_output"] = OpCost(fixed_us=3.0, ns_per_unit=0.005)
    plan = planner.plan(model, inputs, objective="latency", cost_model=costs)
    separate = predict(model, inputs, plan, costs)
    merged = predict(model, inputs, plan, costs, merged=True)
    # With these costs every projection ends its own int8 island, so all 49 dequantizes merge:
    # each saves its dequantize and pays 2 us more for the merged call.
    merges = [b for b in plan.boundaries if b.kind == "dequantize" and b.position == "output"
              and plan.nodes[b.module].type.endswith(("Conv1D", "Linear"))]
    assert len(merges) == 12 * 4 + 1
    saved_dequantize = sum(costs.conversion_ns("dequantize", elements)
                           for elements in [128 * 2304, 128 * 768, 128 * 3072, 128 * 768] * 12 + [128 * 50257]) / 1e6
    extra_fixed = len(merges) * 2.0 / 1000
    assert merged.total_ms == pytest.approx(separate.total_ms - saved_dequantize + extra_fixed, abs=1e-3)


def test_cost_model_file_errors(tmp_path):
    broken = tmp_path / "costs.json"
    fix = f"; write one with `qat-planner calibrate --out {broken}`"
    broken.write_text('{"version": 2, "torch": "2.13.0"}')
    with pytest.raises(PlanError) as info:
        CostModel.load(broken)
    assert str(info.value) == f"{broken}: not a qat-planner cost model (engine: Field required){fix}"
    broken.write_text('{"version": 1, "torch": "2.13.0"}')
    with pytest.raises(PlanError) as info:
        CostModel.load(broken)
    assert str(info.value) == (f"{broken}: cost model format 1 is from another qat-planner version (this one reads "
                               f"format 2); calibrate again with `qat-planner calibrate --out {broken}`")
    broken.write_text("not json")
    with pytest.raises(PlanError) as info:
        CostModel.load(broken)
    assert str(info.value) == f"{broken}: not a qat-planner cost model (Invalid JSON: expected ident at line 1 column 2){fix}"
    missing = tmp_path / "missing.json"
    with pytest.raises(PlanError) as info:
        CostModel.load(missing)
    assert str(info.value) == f"{missing}: cannot read cost model: No such file or directory; write one with `qat-planner calibrate --out {missing}`"


def test_cli_calibrate_then_plan_for_latency(tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_PLANNER_CACHE", str(tmp_path / "cache"))
    costs = tmp_path / "costs.json"
    cost_model(20.0).save(costs)
    env = {"NO_COLOR": "1", "COLUMNS": "300"}
    table = runner.invoke(app, ["calibrate", "--show", "--out", str(costs)], env=env)
    assert table.exit_code == 0, table.output
    assert "gelu_formula" in table.output
    assert f"read {costs}" in table.output

    result = runner.invoke(app, ["plan", "gpt2-tiny", "--seq-len", "32", "--objective", "latency", "--cost-model", str(costs),
                                 "--format", "json"], env=env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stderr carries the warning that the cost model is from torch "test"
    assert data["objective"] == "latency"
    assert data["nodes"]["transformer.h.0.mlp.act"]["domain"] == "fp32"
    assert data["latency"]["cost_model"] == "torch test, engine x86, 2 threads, test"

    text = runner.invoke(app, ["plan", "gpt2-tiny", "--seq-len", "32", "--objective", "latency", "--cost-model", str(costs)], env=env)
    assert "predicted int8 forward " in text.output
    assert "(linear int8 " in text.output


def test_cli_show_without_cache_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_PLANNER_CACHE", str(tmp_path))
    result = runner.invoke(app, ["calibrate", "--show"], env={"NO_COLOR": "1"})
    assert result.exit_code != 0
    assert str(result.exception) == f"no cost model for this machine at {default_cost_model_path()}; write one with `qat-planner calibrate`"


def convert_on_x86(model: torch.nn.Module, inputs: tuple, plan=None) -> torch.nn.Module:
    """Emit ``model`` with ``plan`` (default: the bytes plan), observe one forward and convert on x86."""
    torch.backends.quantized.engine = "x86"
    emitted = planner.emit(model, plan or planner.plan(model, inputs))
    tq.prepare_qat(emitted, inplace=True)
    emitted(*inputs)
    return tq.convert(emitted.eval())


def test_cli_cost_model_needs_latency_objective(tmp_path):
    costs = tmp_path / "costs.json"
    cost_model(20.0).save(costs)
    result = runner.invoke(app, ["plan", "gpt2-tiny", "--cost-model", str(costs)], env={"NO_COLOR": "1", "COLUMNS": "300"})
    assert result.exit_code == 2
    assert "is a cost model, used only with --objective latency; add that option or leave --cost-model out" in result.output


def test_cli_warns_of_cost_model_from_another_setting(tmp_path):
    costs = tmp_path / "costs.json"
    cost_model(20.0).save(costs)  # torch "test", 2 threads
    result = runner.invoke(app, ["plan", "gpt2-tiny", "--seq-len", "16", "--objective", "latency", "--cost-model", str(costs)],
                           env={"NO_COLOR": "1", "COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert f"warning: the cost model was measured with torch test, not {torch.__version__}" in result.output


def test_cost_model_rejects_negative_costs(tmp_path):
    broken = tmp_path / "costs.json"
    data = json.loads(cost_model(20.0).model_dump_json())
    data["fp32"]["linear"]["fixed_us"] = -1.0
    broken.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=r"fp32\.linear\.fixed_us: Input should be greater than or equal to 0"):
        CostModel.load(broken)


def test_busy_first_calibration_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_PLANNER_CACHE", str(tmp_path))
    monkeypatch.setattr("planner.costs._load_average", lambda: 2.0)
    monkeypatch.setattr("planner.costs.calibrate", lambda: cost_model(20.0))
    with pytest.warns(PlannerWarning, match="used for this plan only and not cached"):
        model = load_cost_model()
    assert model.threads == 2
    assert not default_cost_model_path().exists()


def test_merge_dequantize_returns_the_unrounded_linear_output():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32))
    inputs = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    int8 = convert_on_x86(model, (inputs,))
    merged = planner.merge_dequantize(int8)

    wrapper = merged[0]
    assert type(wrapper.module).__name__ == "Int8LinearFloatOutput"
    assert wrapper.output_name is None
    assert type(int8[0].module).__name__ == "Linear"  # the converted model is not modified
    assert sorted(merged.state_dict()) == sorted(int8.state_dict())
    # The merged Linear computes in fp32 what the int8 kernel accumulates: quantized input times
    # quantized weight plus bias, with no rounding of the output.
    linear = int8[0].module
    quantized_input = int8[0].quant_in(inputs)
    expected = torch.nn.functional.linear(quantized_input.dequantize(), linear.weight().dequantize(), linear.bias())
    with torch.no_grad():
        assert (wrapper(inputs) - expected).abs().max().item() <= 1e-4
        rounded = int8[0](inputs)
    assert (rounded - expected).abs().max().item() > 1e-4  # the converted model rounds to its int8 output
    copied = copy.deepcopy(merged)
    restored = pickle.loads(pickle.dumps(merged))
    with torch.no_grad():
        assert torch.equal(copied(inputs), merged(inputs))
        assert torch.equal(restored(inputs), merged(inputs))
        merged.load_state_dict(int8.state_dict())
        assert (merged[0](inputs) - expected).abs().max().item() <= 1e-4


def test_merge_dequantize_on_gpt2_merges_every_island_end():
    model = GPT2LMHeadModel(small_gpt2_config()).eval()
    emitted = planner.emit(model, planner.plan(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)}))
    tq.prepare_qat(emitted, inplace=True)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emitted(ids)
    converted = tq.convert(emitted.eval())
    merged = planner.merge_dequantize(converted)
    names = [name for name, m in merged.named_modules() if type(m).__name__ == "Int8LinearFloatOutput"]
    # c_attn, attention c_proj and the MLP's c_proj per block, and the LM head; c_fc's output stays int8.
    assert names == [f"transformer.h.{i}.{m}.module" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")] + ["lm_head.module"]
    with torch.no_grad():
        reference, output = converted(ids).logits, merged(ids).logits
    assert (output - reference).abs().max().item() <= 0.2 * reference.abs().max().item()
    assert merged.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 15)


def test_merge_dequantize_folds_gpt2_gelu():
    model = GPT2LMHeadModel(small_gpt2_config()).eval()
    ids = {"input_ids": torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))}
    # GELU's int8 kernel is dear here, so the plan runs it in fp32 between c_fc and c_proj.
    plan = planner.plan(model, ids, objective="latency", cost_model=cost_model(20.0))
    assert planner.gelu_folds(plan) == {f"transformer.h.{i}.mlp.c_fc": f"transformer.h.{i}.mlp.act" for i in range(2)}
    emitted = planner.emit(model, plan)
    tq.prepare_qat(emitted, inplace=True)
    with torch.no_grad():
        emitted(**ids)
    converted = tq.convert(emitted.eval())
    folded = planner.merge_dequantize(converted, plan=plan)
    block = folded.transformer.h[0].mlp
    assert block.c_fc.module.gelu == "tanh"
    assert type(block.act.module) is torch.nn.Identity
    assert type(converted.transformer.h[0].mlp.act.module) is torch.nn.GELU  # the converted model is not modified
    assert sorted(folded.state_dict()) == sorted(converted.state_dict())
    with torch.no_grad():
        # c_fc's output skips its int8 rounding before GELU; the logits move by that rounding only.
        reference, output = converted(**ids).logits, folded(**ids).logits
        unfolded = planner.merge_dequantize(converted)(**ids).logits
    assert (output - reference).abs().max().item() <= 0.2 * reference.abs().max().item()
    assert (output - unfolded).abs().max().item() <= 0.2 * reference.abs().max().item()
    restored = pickle.loads(pickle.dumps(folded))
    with torch.no_grad():
        assert torch.equal(restored(**ids).logits, output)


def test_gelu_fold_against_fp32():
    torch.backends.quantized.engine = "x86"
    # Wide enough that GELU's dear int8 kernel outweighs the two conversions around an fp32 GELU.
    model = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(1024, 64))
    inputs = torch.randn(128, 64, generator=torch.Generator().manual_seed(2))
    plan = planner.plan(model, (inputs,), objective="latency", cost_model=cost_model(20.0))
    assert planner.gelu_folds(plan) == {"0": "1"}
    int8 = convert_on_x86(model, (inputs,), plan)
    folded = planner.merge_dequantize(int8, plan=plan)
    linear = int8[0].module
    quantized_input = int8[0].quant_in(inputs)
    pre_activation = torch.nn.functional.linear(quantized_input.dequantize(), linear.weight().dequantize(), linear.bias())
    expected = torch.nn.functional.gelu(pre_activation, approximate="tanh")
    with torch.no_grad():
        assert (folded[0](inputs) - expected).abs().max().item() <= 1e-4
        assert torch.equal(folded[1](expected), expected)  # the GELU module is now an Identity


def test_gelu_with_output_stub_folds():
    # A plan may quantize at GELU's own output rather than at the next Linear's input.
    from planner.emit import StubWrapper
    from planner.optimize import _foldable_gelu

    model = torch.nn.Sequential(torch.nn.Identity(), StubWrapper(torch.nn.GELU(approximate="tanh"), None, "quantize"))
    holder, key = _foldable_gelu(model, "1")
    assert (holder, key) == (model[1], "module")
    model.append(StubWrapper(torch.nn.GELU(), "dequantize"))
    assert _foldable_gelu(model, "2") == (None, "")


def test_predict_folded_gelu(gpt2_small):
    model, inputs = gpt2_small
    costs = cost_model(20.0)
    costs.int8["linear_fp32_output"] = OpCost(fixed_us=3.0, ns_per_unit=0.005)
    costs.int8["linear_fp32_output_gelu"] = OpCost(fixed_us=4.0, ns_per_unit=0.005)
    plan = planner.plan(model, inputs, objective="latency", cost_model=costs)
    merged = predict(model, inputs, plan, costs, merged=True)
    # Each block's GELU (1 us + 1 ns per element in fp32) is now an Identity (1 us) and its c_fc
    # pays 1 us more than a merge without GELU.
    without = costs.model_copy(deep=True)
    del without.int8["linear_fp32_output_gelu"]
    unfolded = predict(model, inputs, plan, without, merged=True)
    assert merged.total_ms == pytest.approx(unfolded.total_ms - 12 * (128 * 3072 * 1.0 - 1000) / 1e6, abs=1e-3)


def test_merged_from_rows_threshold():
    costs = cost_model(20.0)
    costs.int8["linear"] = OpCost(fixed_us=20.0, ns_per_unit=0.005)
    costs.int8["linear_fp32_output"] = OpCost(fixed_us=40.0, ns_per_unit=0.005)
    # Separate calls cost 20 us + 5 us (dequantize) + 0.1 ns per output element, 100 per row: the
    # merged call's extra 15 us pays off from 1500 rows, so from 2048, the next power of two.
    assert merged_from_rows(costs, 100, 100, gelu=False) == 2048
    costs.int8["linear_fp32_output"] = OpCost(fixed_us=10.0, ns_per_unit=0.005)
    assert merged_from_rows(costs, 100, 100, gelu=False) == 1


def test_merged_from_rows_with_gelu():
    costs = cost_model(20.0)
    costs.int8["linear"] = OpCost(fixed_us=20.0, ns_per_unit=0.005)
    costs.int8["linear_fp32_output"] = OpCost(fixed_us=40.0, ns_per_unit=0.005)
    costs.int8["linear_fp32_output_gelu"] = OpCost(fixed_us=40.0, ns_per_unit=0.005)
    # Separate: 20 us + dequantize 5 us + GELU 1 us, and 0.1 + 1 ns per output element. Merged: 40 us
    # plus the 1 us Identity left where the GELU was. 110 ns per row pays the 15 us from 137 rows.
    assert merged_from_rows(costs, 100, 100, gelu=True) == 256


def test_merged_linear_below_min_rows():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32))
    inputs = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    int8 = convert_on_x86(model, (inputs,))
    merged = planner.merge_dequantize(int8)
    merged[0].module.min_rows = 9
    with torch.no_grad():
        assert torch.equal(merged(inputs), int8(inputs))
        merged[0].module.min_rows = 8
        assert not torch.equal(merged(inputs), int8(inputs))


def test_predict_merge_dearer_than_separate(gpt2_small):
    model, inputs = gpt2_small
    costs = cost_model(20.0)
    costs.int8["linear_fp32_output"] = OpCost(fixed_us=1000.0, ns_per_unit=0.005)
    plan = planner.plan(model, inputs, objective="latency", cost_model=costs)
    assert predict(model, inputs, plan, costs, merged=True) == predict(model, inputs, plan, costs)


def test_fused_relu_costs_one_call_in_int8():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    costs = cost_model(20.0)
    costs.int8["relu"] = OpCost(fixed_us=1.0, ns_per_unit=50.0)  # dear, unless fused away
    plan = planner.plan(model, (torch.randn(4, 16),), objective="latency", cost_model=costs)
    assert [g.modules for g in plan.fusions] == [["0", "1"]]
    assert plan.nodes["1"].domain == "int8"
    assert plan.latency.by_class["relu int8"] == pytest.approx(0.001)  # the Identity left by the fusion
