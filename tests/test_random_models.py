"""Generated models end to end: every default plan passes the validator, or the planner refuses clearly."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, example, given, settings

import planner
from planner.testing import GeneratedNet, generated_models
from planner.validate import validate

REFUSALS: list[str] = []


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(generated_models())
@example(GeneratedNet("sequence", ["linear_relu", "residual", "layer_norm"]))
@example(GeneratedNet("image", ["conv_bn_relu", "residual_conv", "max_pool"]))
# Found by this test: observer lag made int8 and fake-quant disagree until the validator recalibrated
# observers, and a module called twice needed the union of both calls' ranges.
@example(GeneratedNet("image", ["conv_bn_relu", "conv_bn_relu", "conv"]))
@example(GeneratedNet("sequence", ["softmax", "softmax", "shared_twice"]))
@example(GeneratedNet("sequence", ["shared_twice"]))
def test_generated_model_validates_or_is_refused(model):
    torch.manual_seed(0)
    inputs = model.example_inputs()
    try:
        result = planner.plan(model, inputs)
    except planner.PlannerError as exc:
        REFUSALS.append(f"{model.family} {model.steps}: {exc}")
        return
    report = validate(model, inputs, result)
    assert report.passed, f"{model.family} {model.steps}\n{report.render()}"
