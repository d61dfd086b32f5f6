"""GPT-2 end to end: the plan of every block, emission, QAT on real text, convert, int8 forward and generate()."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.ao.quantization as tq
from torch import nn
from transformers import GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import planner
from planner.emit import StubWrapper
from planner.models import resolve_model
from planner.qat import ByteTokenizer

from conftest import meta_ids, small_gpt2_config

# The six conversions every GPT-2 block needs with the default rules: c_attn and attn.c_proj are
# islands, and c_fc -> GELU -> mlp.c_proj is one island with no stub inside.
BLOCK_BOUNDARIES = [
    ("quantize", "attn.c_attn", "input"),
    ("dequantize", "attn.c_attn", "output"),
    ("quantize", "attn.c_proj", "input"),
    ("dequantize", "attn.c_proj", "output"),
    ("quantize", "mlp.c_fc", "input"),
    ("dequantize", "mlp.c_proj", "output"),
]


def block_boundaries(plan: planner.Plan, index: int) -> list[tuple[str, str, str]]:
    prefix = f"transformer.h.{index}."
    return [(b.kind, b.module[len(prefix):], b.position) for b in plan.boundaries if b.module.startswith(prefix)]


@pytest.fixture(scope="module")
def gpt2_small_plans() -> dict[str, planner.Plan]:
    spec = resolve_model("gpt2")
    model = spec.model("meta")
    inputs = spec.example_inputs("meta", 128, None)
    return {objective: planner.plan(model, inputs, objective=objective) for objective in ("bytes", "count")}


@pytest.mark.parametrize("objective", ["bytes", "count"])
def test_gpt2_small_six_conversions_per_block(gpt2_small_plans, objective):
    plan = gpt2_small_plans[objective]
    for index in range(12):
        assert block_boundaries(plan, index) == BLOCK_BOUNDARIES, f"block {index}"
    assert [(b.kind, b.module, b.position) for b in plan.boundaries if not b.module.startswith("transformer.h.")] == [
        ("quantize", "lm_head", "input"), ("dequantize", "lm_head", "output")]
    assert plan.stats.conversions == 12 * 6 + 2


def test_gpt2_small_mlp_stays_int8_inside(gpt2_small_plans):
    plan = gpt2_small_plans["bytes"]
    for index in range(12):
        for name in ("mlp.c_fc", "mlp.act", "mlp.c_proj"):
            assert plan.nodes[f"transformer.h.{index}.{name}"].domain == "int8"
        assert plan.nodes[f"transformer.h.{index}.ln_1"].domain == "fp32"
        assert plan.nodes[f"transformer.h.{index}.attn:scaled_dot_product_attention#0"].domain == "fp32"


def test_gpt2_small_json_report_shows_boundaries(gpt2_small_plans):
    import json

    data = json.loads(planner.render(gpt2_small_plans["bytes"], "json"))
    assert data["version"] == 1
    first = [b for b in data["boundaries"] if b["module"] == "transformer.h.0.attn.c_attn"]
    assert first == [
        {"kind": "quantize", "module": "transformer.h.0.attn.c_attn", "position": "input", "elements": 128 * 768, "qconfig": "x86"},
        {"kind": "dequantize", "module": "transformer.h.0.attn.c_attn", "position": "output", "elements": 128 * 2304, "qconfig": "x86"},
    ]


def test_gpt2_small_substitutions_and_no_fusion(gpt2_small_plans):
    plan = gpt2_small_plans["bytes"]
    conv1d = [s for s in plan.substitutions if s.source == "transformers.pytorch_utils.Conv1D"]
    gelu = [s for s in plan.substitutions if s.source == "transformers.activations.NewGELUActivation"]
    assert len(conv1d) == 48
    assert all(s.target == "torch.nn.Linear" for s in conv1d)
    assert len(gelu) == 12
    assert all(s.kwargs == {"approximate": "tanh"} for s in gelu)
    assert plan.fusions == []
    assert plan.not_fused == ["no module chain in the model matches a fusion pattern (such as Linear+ReLU or Conv+BN+ReLU)"]


def test_plan_save_load_round_trip(tmp_path, gpt2_small_plans):
    plan = gpt2_small_plans["bytes"]
    plan.save(tmp_path / "plan.json")
    assert planner.Plan.load(tmp_path / "plan.json") == plan


def test_plan_does_not_touch_model():
    model = GPT2LMHeadModel(small_gpt2_config())
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    planner.plan(model, meta_ids())
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, StubWrapper) for m in model.modules())


def test_emit_keeps_original_model_and_fp32_output():
    config = small_gpt2_config()
    with torch.device("meta"):
        plan = planner.plan(GPT2LMHeadModel(config), meta_ids())
    model = GPT2LMHeadModel(config)
    original = copy.deepcopy(model.state_dict())
    emitted = planner.emit(model, plan)
    assert type(emitted) is GPT2LMHeadModel
    assert emitted.training
    assert any(isinstance(m, Conv1D) for m in model.modules())
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    ids = torch.randint(0, 256, (2, 24))
    model.eval()
    emitted.eval()
    with torch.no_grad():
        difference = (model(ids).logits - emitted(ids).logits).abs().max().item()
    assert difference <= 1e-5
    assert max(v for v in emitted.qat_planner_checks.values()) <= 1e-5


def test_emitted_model_loads_original_state_dict():
    config = small_gpt2_config()
    plan = planner.plan(GPT2LMHeadModel(config), meta_ids())
    source = GPT2LMHeadModel(config)
    emitted = planner.emit(GPT2LMHeadModel(config), plan)
    emitted.load_state_dict(source.state_dict(), strict=True)
    ids = torch.randint(0, 256, (1, 12))
    source.eval()
    emitted.eval()
    with torch.no_grad():
        assert (source(ids).logits - emitted(ids).logits).abs().max().item() <= 1e-5


def test_converted_model_reloads_its_own_state_dict():
    # The hook that maps the original model's keys must leave the stubs' own keys alone: a
    # converted QuantStub's scale lives at "<module>.quant_in.scale", not under "<module>.module.".
    config = small_gpt2_config()
    emitted = planner.emit(GPT2LMHeadModel(config), planner.plan(GPT2LMHeadModel(config), meta_ids()))
    tq.prepare_qat(emitted, inplace=True)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        emitted(ids)
    converted = tq.convert(emitted.eval())
    state = converted.state_dict()
    assert "transformer.h.0.attn.c_attn.quant_in.scale" in state
    converted.load_state_dict(state, strict=True)


def test_emit_rejects_other_architecture():
    plan = planner.plan(GPT2LMHeadModel(small_gpt2_config()), meta_ids())
    with pytest.raises(planner.EmitError) as info:
        planner.emit(nn.Linear(2, 2), plan)
    assert str(info.value) == (
        "the plan was made for transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel, but the model is "
        "torch.nn.modules.linear.Linear; plan this model first"
    )


def test_emit_rejects_already_emitted_model():
    config = small_gpt2_config()
    plan = planner.plan(GPT2LMHeadModel(config), meta_ids())
    emitted = planner.emit(GPT2LMHeadModel(config), plan)
    with pytest.raises(planner.EmitError, match="module 'transformer.h.0.attn.c_attn' is planner.emit.StubWrapper"):
        planner.emit(emitted, plan)


def _windows(text: str, seq_len: int, count: int, generator: torch.Generator) -> torch.Tensor:
    data = torch.tensor(ByteTokenizer().encode(text[:200_000]), dtype=torch.long)
    starts = torch.randint(0, len(data) - seq_len - 1, (count,), generator=generator)
    return torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])


def test_gpt2_qat_on_shakespeare_converts_and_generates(shakespeare):
    config = small_gpt2_config(n_layer=2, n_embd=64)
    with torch.device("meta"):
        meta_model = GPT2LMHeadModel(config)
    plan = planner.plan(meta_model, meta_ids(64))
    model = GPT2LMHeadModel(config)
    emitted = planner.emit(model, plan)

    model.eval()
    emitted.eval()
    probe = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        assert (model(probe).logits - emitted(probe).logits).abs().max().item() <= 1e-5

    emitted.train()
    tq.prepare_qat(emitted, inplace=True)
    # A small learning rate: the moving-average observers (averaging constant 0.01) lag behind weights
    # that move fast, and after only 20 steps that lag, not the conversion, would dominate the error.
    optimizer = torch.optim.AdamW(emitted.parameters(), lr=3e-4)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        batch = _windows(shakespeare, 64, 8, generator)
        loss = emitted(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5

    emitted.eval()
    emitted.apply(tq.disable_observer)
    validation = _windows(shakespeare, 64, 4, generator)[:, :-1]
    with torch.no_grad():
        fake_quant = emitted(validation).logits
    converted = tq.convert(copy.deepcopy(emitted), inplace=False)

    layer_norm_inputs = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: layer_norm_inputs.append(args[0].dtype))
             for m in converted.modules() if isinstance(m, nn.LayerNorm)]
    with torch.no_grad():
        int8 = converted(validation).logits
    for hook in hooks:
        hook.remove()

    # Tolerance: 10% of the largest fake-quant logit. int8 requantizes GELU's output with c_fc's scale,
    # which the fake-quant forward does not model, and x86's reduce_range clips fake-quant activations
    # at 128 levels where the int8 kernels use 256, so the two differ by a few quantization steps.
    assert (int8 - fake_quant).abs().max().item() <= 0.1 * fake_quant.abs().max().item()
    assert layer_norm_inputs and all(dtype == torch.float32 for dtype in layer_norm_inputs)
    assert not any(isinstance(m, Conv1D) for m in converted.modules())
    quantized_linears = [m for m in converted.modules() if isinstance(m, torch.ao.nn.quantized.Linear)]
    assert len(quantized_linears) == 4 * config.n_layer + 1
    assert isinstance(converted.transformer.h[0].attn.c_attn.module, torch.ao.nn.quantized.Linear)

    tokens = converted.generate(validation[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=255)
    assert tokens.shape == (1, 14)
    assert torch.equal(tokens[:, :8], validation[:1, :8])


def test_emit_warns_about_modules_the_plan_does_not_name():
    plan = planner.plan(GPT2LMHeadModel(small_gpt2_config(n_layer=2)), meta_ids())
    with pytest.warns(planner.PlannerWarning, match=r"the model has 6 modules with parameters that the plan does not name \(transformer\.h\.2\.ln_1"):
        planner.emit(GPT2LMHeadModel(small_gpt2_config(n_layer=3)), plan)
