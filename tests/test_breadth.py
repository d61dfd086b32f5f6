"""Breadth: small transformers and CNNs of common architectures, and model shapes that stress planning.

Every model is planned with the default rules and must pass every validator check, static and dynamic
(emit, prepare_qat, training, convert, int8 forward). The tests also pin what the plan decides: which
modules run in int8 and which stay fp32, where the stubs go, and what is fused. Models are built from
small configs or written here, so nothing is downloaded.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.quantization as tq
from architectures import BasicBlock, ReluGPT, TinyMobileNet, TinyResNet
from torch import nn

import planner
from planner.emit import StubWrapper
from planner.validate import validate

# Every check `validate` runs with dynamic=True, in order.
CHECK_NAMES = [
    "plan covers the traced graph",
    "every node runs in the domain its rule requires",
    "every tensor arrives in the domain its consumer runs in",
    "every stub converts to the other domain and sits on a float tensor of a module",
    "no cheaper plan exists (min-cut optimum)",
    "every fusion is a chain of single-consumer modules in one domain",
    "emit",
    "fp32 output unchanged by emit (before prepare_qat)",
    "prepare_qat → train → eval → convert → int8 forward",
    "int8 output close to fake-quant output",
    "every int8 module is quantized after convert, with weight fake-quant during training",
]

LINEAR = "torch.nn.modules.linear.Linear"
LAYER_NORM = "torch.nn.modules.normalization.LayerNorm"

# Rule origins in rules/default.json.
QUANTIZE_LINEAR_CONV = "default:rules[0]"
FLOAT_NORM_ATTENTION = "default:rules[1]"
FLOAT_EMBEDDING = "default:rules[2]"
FLOAT_OP = "default:rules[3]"
FLOAT_ARITHMETIC = "default:rules[4]"

# torch.ao.quantization warns on every call, because the eager flow under test is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")


# ---- helpers --------------------------------------------------------------------------------------


def assert_validates(model: nn.Module, example_inputs, plan: planner.Plan) -> None:
    report = validate(model, example_inputs, plan, dynamic=True)
    assert report.passed, report.render()
    assert [c.name for c in report.checks] == CHECK_NAMES, report.render()
    assert all(c.status == "passed" for c in report.checks), report.render()


def block_boundaries(plan: planner.Plan, prefix: str) -> list[tuple[str, str, str]]:
    """Return ``(kind, module relative to prefix, position)`` of every stub under ``prefix``, in plan order."""
    return [(b.kind, b.module[len(prefix):], b.position) for b in plan.boundaries if b.module.startswith(prefix)]


def modules_of_type(plan: planner.Plan, qualified_type: str) -> list[str]:
    return [name for name, node in plan.nodes.items() if node.kind == "module" and node.type == qualified_type]


def fusion_pairs(plan: planner.Plan) -> list[tuple[list[str], list[str]]]:
    return [(group.modules, group.types) for group in plan.fusions]


def token_ids(vocab_size: int, seq_len: int = 8) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1))


# ---- models written here --------------------------------------------------------------------------


def tiny_resnet() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return TinyResNet().eval(), (torch.randn(2, 3, 16, 16),)


class ReusedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.relu = nn.ReLU()
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.fc(self.relu(self.fc(x))))


class MyLinear(nn.Linear):
    pass


class SubclassedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = MyLinear(16, 32)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


class HandStubbed(nn.Module):
    """A model already prepared by hand for eager QAT: its own stubs and a FloatFunctional residual add."""

    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.fc1 = nn.Linear(16, 16)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)
        self.skip_add = nn.quantized.FloatFunctional()
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        x = self.quant(x)
        y = self.fc2(self.relu(self.fc1(x)))
        return self.dequant(self.skip_add.add(y, x))


class SignGate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return -x


class DataDependentBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.gate = SignGate()

    def forward(self, x):
        return self.gate(self.fc(x))


class CastingRMSNorm(nn.Module):
    """RMSNorm that casts its input to float32 first, as Hugging Face's LlamaRMSNorm does."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x.to(torch.float32)
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class ResidualBesideCastingNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 16)
        self.norm = CastingRMSNorm(16)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h), self.norm(h) + h


# ---- fixtures -------------------------------------------------------------------------------------


def build_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64, attn_implementation="eager")
    model = BertModel(config).eval()
    inputs = {"input_ids": token_ids(100), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    return model, inputs


@pytest.fixture(scope="module")
def bert():
    model, inputs = build_bert()
    return model, inputs, planner.plan(model, inputs)


def build_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                       max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    model = OPTForCausalLM(config).eval()
    inputs = {"input_ids": token_ids(100)}
    return model, inputs


@pytest.fixture(scope="module")
def opt():
    model, inputs = build_opt()
    return model, inputs, planner.plan(model, inputs)


def build_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # One key/value head for two query heads, so grouped-query attention is covered too.
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    inputs = {"input_ids": token_ids(100)}
    return model, inputs


@pytest.fixture(scope="module")
def llama():
    model, inputs = build_llama()
    return model, inputs, planner.plan(model, inputs)


def build_vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16,
                       patch_size=8, num_channels=3, attn_implementation="eager")
    model = ViTModel(config).eval()
    inputs = (torch.randn(1, 3, 16, 16),)
    return model, inputs


@pytest.fixture(scope="module")
def vit():
    model, inputs = build_vit()
    return model, inputs, planner.plan(model, inputs)


def build_relu_gpt():
    torch.manual_seed(0)
    model = ReluGPT().eval()
    inputs = (token_ids(64),)
    return model, inputs


@pytest.fixture(scope="module")
def relu_gpt():
    model, inputs = build_relu_gpt()
    return model, inputs, planner.plan(model, inputs)


def build_resnet():
    return tiny_resnet()


@pytest.fixture(scope="module")
def resnet():
    model, inputs = tiny_resnet()
    return model, inputs, planner.plan(model, inputs)


def build_mobilenet():
    torch.manual_seed(0)
    model = TinyMobileNet().eval()
    inputs = (torch.randn(2, 3, 16, 16),)
    return model, inputs


@pytest.fixture(scope="module")
def mobilenet():
    model, inputs = build_mobilenet()
    return model, inputs, planner.plan(model, inputs)


# ---- BERT -----------------------------------------------------------------------------------------


def test_bert_plans_and_validates(bert):
    model, inputs, plan = bert
    assert_validates(model, inputs, plan)


def test_bert_linears_int8_norms_softmax_fp32(bert):
    _, _, plan = bert
    linears = modules_of_type(plan, LINEAR)
    assert len(linears) == 7
    for name in linears:
        assert plan.nodes[name].domain == "int8", name
    layer_norms = modules_of_type(plan, LAYER_NORM)
    assert len(layer_norms) == 3
    for name in layer_norms:
        assert plan.nodes[name].domain == "fp32", name
        assert plan.nodes[name].rule == FLOAT_NORM_ATTENTION, name
    softmax = plan.nodes["encoder.layer.0.attention.self:softmax#0"]
    assert softmax.domain == "fp32"
    assert softmax.rule == FLOAT_OP
    for name in ("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"):
        assert plan.nodes[name].domain == "fp32", name
        assert plan.nodes[name].rule == FLOAT_EMBEDDING, name
    assert plan.nodes["encoder.layer.0.output:add#0"].domain == "fp32"


def test_bert_gelu_mlp_is_one_island(bert):
    _, _, plan = bert
    assert [(s.module, s.source, s.target) for s in plan.substitutions] == [
        ("encoder.layer.0.intermediate.intermediate_act_fn", "transformers.activations.GELUActivation", "torch.nn.GELU")]
    assert plan.nodes["encoder.layer.0.intermediate.intermediate_act_fn"].domain == "int8"
    assert plan.boundaries_of("encoder.layer.0.intermediate.intermediate_act_fn") == []
    assert plan.fusions == []


def test_bert_ten_conversions_per_layer(bert):
    _, _, plan = bert
    # query, key and value each get their own QuantStub, because their shared input also feeds the fp32 residual add.
    assert block_boundaries(plan, "encoder.layer.0.") == [
        ("quantize", "attention.self.query", "input"),
        ("dequantize", "attention.self.query", "output"),
        ("quantize", "attention.self.key", "input"),
        ("dequantize", "attention.self.key", "output"),
        ("quantize", "attention.self.value", "input"),
        ("dequantize", "attention.self.value", "output"),
        ("quantize", "attention.output.dense", "input"),
        ("dequantize", "attention.output.dense", "output"),
        ("quantize", "intermediate.dense", "input"),
        ("dequantize", "output.dense", "output"),
    ]
    assert block_boundaries(plan, "pooler.") == [("quantize", "dense", "input"), ("dequantize", "dense", "output")]
    assert plan.stats.conversions == 12


# ---- OPT ------------------------------------------------------------------------------------------


def test_opt_plans_and_validates(opt):
    model, inputs, plan = opt
    assert_validates(model, inputs, plan)


def test_opt_fuses_fc1_with_relu(opt):
    _, _, plan = opt
    assert fusion_pairs(plan) == [
        (["model.decoder.layers.0.fc1", "model.decoder.layers.0.activation_fn"], ["Linear", "ReLU"])]
    assert plan.nodes["model.decoder.layers.0.activation_fn"].domain == "int8"
    assert "fused Linear + ReLU: model.decoder.layers.0.fc1, model.decoder.layers.0.activation_fn" in planner.render(plan, "text")


def test_opt_quantizes_layernorm_output_once(opt):
    _, _, plan = opt
    # q_proj, k_proj and v_proj are the only readers of self_attn_layer_norm, so one QuantStub serves all three.
    assert block_boundaries(plan, "model.decoder.layers.0.") == [
        ("quantize", "self_attn_layer_norm", "output"),
        ("dequantize", "self_attn.q_proj", "output"),
        ("dequantize", "self_attn.k_proj", "output"),
        ("dequantize", "self_attn.v_proj", "output"),
        ("quantize", "self_attn.out_proj", "input"),
        ("dequantize", "self_attn.out_proj", "output"),
        ("quantize", "fc1", "input"),
        ("dequantize", "fc2", "output"),
    ]
    assert block_boundaries(plan, "lm_head") == [("quantize", "", "input"), ("dequantize", "", "output")]


def test_opt_norms_attention_positions_fp32(opt):
    _, _, plan = opt
    layer = "model.decoder.layers.0."
    assert plan.nodes[layer + "self_attn_layer_norm"].domain == "fp32"
    assert plan.nodes[layer + "final_layer_norm"].domain == "fp32"
    assert plan.nodes["model.decoder.final_layer_norm"].domain == "fp32"
    assert plan.nodes[layer + "self_attn:scaled_dot_product_attention#0"].domain == "fp32"
    assert plan.nodes[layer + "self_attn:scaled_dot_product_attention#0"].rule == FLOAT_OP
    assert plan.nodes["model.decoder.embed_positions"].domain == "fp32"
    assert plan.nodes["model.decoder.embed_tokens"].domain == "fp32"
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"):
        assert plan.nodes[layer + name].domain == "int8", name
        assert plan.nodes[layer + name].rule == QUANTIZE_LINEAR_CONV, name


# ---- Llama ----------------------------------------------------------------------------------------


def test_llama_plans_and_validates(llama):
    model, inputs, plan = llama
    assert_validates(model, inputs, plan)


def test_llama_rmsnorm_silu_rotary_fp32(llama):
    _, _, plan = llama
    layer = "model.layers.0."
    for name in (layer + "input_layernorm", layer + "post_attention_layernorm", "model.norm"):
        assert plan.nodes[name].type == "transformers.models.llama.modeling_llama.LlamaRMSNorm"
        assert plan.nodes[name].domain == "fp32", name
    assert plan.nodes[layer + "mlp.act_fn"].domain == "fp32"
    assert plan.nodes[layer + "mlp:mul#0"].domain == "fp32"
    assert plan.nodes["model.rotary_emb"].domain == "fp32"
    assert plan.nodes[layer + "self_attn:cat#0"].domain == "fp32"
    assert plan.nodes[layer + "self_attn:scaled_dot_product_attention#0"].domain == "fp32"
    linears = modules_of_type(plan, LINEAR)
    assert len(linears) == 8
    for name in linears:
        assert plan.nodes[name].domain == "int8", name
    assert plan.fusions == []


def test_llama_dequantizes_every_projection(llama):
    _, _, plan = llama
    stubs = set(block_boundaries(plan, "model.layers.0."))
    # SiLU and the gate multiply stay fp32, so gate_proj and up_proj both dequantize their outputs.
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"):
        assert ("dequantize", name, "output") in stubs, name
    assert ("quantize", "self_attn.o_proj", "input") in stubs
    assert ("quantize", "mlp.down_proj", "input") in stubs


def test_llama_quantizes_rmsnorm_output_once(llama):
    _, _, plan = llama
    edges = {(e.source, e.target) for e in plan.edges}
    # The residual add reads the embedding output, which LlamaRMSNorm casts with a no-op .to(float32).
    assert ("model.embed_tokens", "model.layers.0:add#0") in edges
    assert ("model.layers.0.input_layernorm", "model.layers.0:add#0") not in edges
    # Each RMSNorm output feeds only the projections after it, so one QuantStub there is the cheapest cut.
    assert block_boundaries(plan, "model.layers.0.") == [
        ("quantize", "input_layernorm", "output"),
        ("dequantize", "self_attn.q_proj", "output"),
        ("dequantize", "self_attn.k_proj", "output"),
        ("dequantize", "self_attn.v_proj", "output"),
        ("quantize", "self_attn.o_proj", "input"),
        ("dequantize", "self_attn.o_proj", "output"),
        ("quantize", "post_attention_layernorm", "output"),
        ("dequantize", "mlp.gate_proj", "output"),
        ("dequantize", "mlp.up_proj", "output"),
        ("quantize", "mlp.down_proj", "input"),
        ("dequantize", "mlp.down_proj", "output"),
    ]


# ---- ViT ------------------------------------------------------------------------------------------


def test_vit_plans_and_validates(vit):
    model, inputs, plan = vit
    assert_validates(model, inputs, plan)


def test_vit_patch_projection_and_linears_int8(vit):
    _, _, plan = vit
    projection = plan.nodes["embeddings.patch_embeddings.projection"]
    assert projection.type == "torch.nn.modules.conv.Conv2d"
    assert projection.domain == "int8"
    assert block_boundaries(plan, "embeddings.patch_embeddings.projection") == [
        ("quantize", "", "input"), ("dequantize", "", "output")]
    linears = modules_of_type(plan, LINEAR)
    assert len(linears) == 7
    for name in linears:
        assert plan.nodes[name].domain == "int8", name


def test_vit_layernorm_softmax_fp32(vit):
    _, _, plan = vit
    layer_norms = modules_of_type(plan, LAYER_NORM)
    assert len(layer_norms) == 3
    for name in layer_norms:
        assert plan.nodes[name].domain == "fp32", name
    softmax = [name for name, node in plan.nodes.items() if node.op == "softmax"]
    assert softmax == ["layers.0.attention:softmax#0"]
    assert plan.nodes["layers.0.attention:softmax#0"].domain == "fp32"
    assert block_boundaries(plan, "layers.0.") == [
        ("quantize", "layernorm_before", "output"),
        ("dequantize", "attention.q_proj", "output"),
        ("dequantize", "attention.k_proj", "output"),
        ("dequantize", "attention.v_proj", "output"),
        ("quantize", "attention.o_proj", "input"),
        ("dequantize", "attention.o_proj", "output"),
        ("quantize", "mlp.fc1", "input"),
        ("dequantize", "mlp.fc2", "output"),
    ]


# ---- GPT-2 with a ReLU MLP ------------------------------------------------------------------------


def test_relu_gpt_plans_and_validates(relu_gpt):
    model, inputs, plan = relu_gpt
    assert_validates(model, inputs, plan)


def test_relu_gpt_fuses_every_mlp(relu_gpt):
    model, _, plan = relu_gpt
    assert fusion_pairs(plan) == [
        (["h.0.mlp.fc", "h.0.mlp.act"], ["Linear", "ReLU"]),
        (["h.1.mlp.fc", "h.1.mlp.act"], ["Linear", "ReLU"]),
    ]
    report = planner.render(plan, "text")
    assert "fused Linear + ReLU: h.0.mlp.fc, h.0.mlp.act" in report
    assert "fused Linear + ReLU: h.1.mlp.fc, h.1.mlp.act" in report
    assert "nothing fused" not in report
    emitted = planner.emit(model, plan)
    for block in emitted.h:
        assert isinstance(block.mlp.fc, StubWrapper)
        assert isinstance(block.mlp.fc.module, nni.LinearReLU)
        assert isinstance(block.mlp.act, nn.Identity)


def test_relu_gpt_six_conversions_per_block(relu_gpt):
    _, _, plan = relu_gpt
    for index in range(2):
        prefix = f"h.{index}."
        assert block_boundaries(plan, prefix) == [
            ("quantize", "attn.qkv", "input"),
            ("dequantize", "attn.qkv", "output"),
            ("quantize", "attn.proj", "input"),
            ("dequantize", "attn.proj", "output"),
            ("quantize", "mlp.fc", "input"),
            ("dequantize", "mlp.proj", "output"),
        ], prefix
        assert plan.nodes[prefix + "attn.softmax"].domain == "fp32"
        assert plan.nodes[prefix + "attn.softmax"].rule == FLOAT_NORM_ATTENTION
        assert plan.nodes[prefix + "ln_1"].domain == "fp32"
        assert plan.nodes[prefix + "ln_2"].domain == "fp32"
        assert plan.nodes[prefix + "attn:matmul#0"].domain == "fp32"
        assert plan.nodes[f"h.{index}:add#0"].domain == "fp32"
        assert plan.nodes[f"h.{index}:add#1"].domain == "fp32"
        assert plan.nodes[prefix + "mlp.proj"].domain == "int8"
    assert plan.stats.conversions == 2 * 6 + 2


# ---- ResNet-style CNN -----------------------------------------------------------------------------


def test_resnet_plans_and_validates(resnet):
    model, inputs, plan = resnet
    assert_validates(model, inputs, plan)


def test_resnet_fuses_conv_bn_relu_and_conv_bn(resnet):
    model, _, plan = resnet
    assert fusion_pairs(plan) == [
        (["conv1", "bn1", "relu"], ["Conv2d", "BatchNorm2d", "ReLU"]),
        (["layer1.conv1", "layer1.bn1", "layer1.relu1"], ["Conv2d", "BatchNorm2d", "ReLU"]),
        (["layer1.conv2", "layer1.bn2"], ["Conv2d", "BatchNorm2d"]),
        (["layer2.conv1", "layer2.bn1", "layer2.relu1"], ["Conv2d", "BatchNorm2d", "ReLU"]),
        (["layer2.conv2", "layer2.bn2"], ["Conv2d", "BatchNorm2d"]),
        (["layer2.downsample.0", "layer2.downsample.1"], ["Conv2d", "BatchNorm2d"]),
    ]
    assert "fused Conv2d + BatchNorm2d + ReLU: conv1, bn1, relu" in planner.render(plan, "text")
    emitted = planner.emit(model, plan)
    assert isinstance(emitted.conv1.module, nni.ConvBnReLU2d)
    assert isinstance(emitted.bn1, nn.Identity)
    assert isinstance(emitted.relu, nn.Identity)
    assert isinstance(emitted.layer1.conv2, nni.ConvBn2d)


def test_resnet_residual_add_stays_fp32(resnet):
    _, _, plan = resnet
    for block in ("layer1", "layer2"):
        add = plan.nodes[f"{block}:add#0"]
        assert add.domain == "fp32", block
        assert add.rule == FLOAT_ARITHMETIC, block
        # relu2 runs after the add, so it cannot join the Conv+BN fusion and follows the add into fp32.
        assert plan.nodes[f"{block}.relu2"].domain == "fp32", block
    assert plan.nodes["avgpool"].domain == "fp32"
    assert plan.nodes["fc"].domain == "int8"


def test_resnet_stubs_around_residual_adds(resnet):
    _, _, plan = resnet
    # maxpool's output feeds layer1.conv1 and the fp32 identity shortcut, so it is dequantized there and
    # requantized for the conv. layer1.relu2 feeds only int8 convs (layer2.conv1 and the downsample), so one
    # QuantStub at its output serves both.
    assert [(b.kind, b.module, b.position) for b in plan.boundaries] == [
        ("quantize", "conv1", "input"),
        ("dequantize", "maxpool", "output"),
        ("quantize", "layer1.conv1", "input"),
        ("dequantize", "layer1.bn2", "output"),
        ("quantize", "layer1.relu2", "output"),
        ("dequantize", "layer2.bn2", "output"),
        ("dequantize", "layer2.downsample.1", "output"),
        ("quantize", "fc", "input"),
        ("dequantize", "fc", "output"),
    ]


# ---- MobileNet-style CNN --------------------------------------------------------------------------


def test_mobilenet_plans_and_validates(mobilenet):
    model, inputs, plan = mobilenet
    assert_validates(model, inputs, plan)


def test_mobilenet_convs_int8_and_fused(mobilenet):
    model, _, plan = mobilenet
    assert model.blocks[0].depthwise.groups == model.blocks[0].depthwise.in_channels == 32
    for index in range(2):
        prefix = f"blocks.{index}."
        for conv in ("expand", "depthwise", "project"):
            assert plan.nodes[prefix + conv].domain == "int8", prefix + conv
            assert plan.nodes[prefix + conv].rule == QUANTIZE_LINEAR_CONV, prefix + conv
    assert fusion_pairs(plan) == [
        (["stem", "stem_bn"], ["Conv2d", "BatchNorm2d"]),
        (["blocks.0.expand", "blocks.0.bn1"], ["Conv2d", "BatchNorm2d"]),
        (["blocks.0.depthwise", "blocks.0.bn2"], ["Conv2d", "BatchNorm2d"]),
        (["blocks.0.project", "blocks.0.bn3"], ["Conv2d", "BatchNorm2d"]),
        (["blocks.1.expand", "blocks.1.bn1"], ["Conv2d", "BatchNorm2d"]),
        (["blocks.1.depthwise", "blocks.1.bn2"], ["Conv2d", "BatchNorm2d"]),
        (["blocks.1.project", "blocks.1.bn3"], ["Conv2d", "BatchNorm2d"]),
    ]


def test_mobilenet_hardswish_stays_fp32(mobilenet):
    _, _, plan = mobilenet
    hardswish = modules_of_type(plan, "torch.nn.modules.activation.Hardswish")
    assert len(hardswish) == 5
    # The default rules name no rule for Hardswish, so it stays fp32 by the no-match default.
    for name in hardswish:
        assert plan.nodes[name].domain == "fp32", name
        assert plan.nodes[name].rule is None, name
    # blocks.0.bn3 feeds blocks.1.expand directly, so the int8 path crosses the block border without stubs.
    assert block_boundaries(plan, "blocks.") == [
        ("quantize", "0.expand", "input"),
        ("dequantize", "0.bn1", "output"),
        ("quantize", "0.depthwise", "input"),
        ("dequantize", "0.bn2", "output"),
        ("quantize", "0.project", "input"),
        ("dequantize", "1.bn1", "output"),
        ("quantize", "1.depthwise", "input"),
        ("dequantize", "1.bn2", "output"),
        ("quantize", "1.project", "input"),
        ("dequantize", "1.bn3", "output"),
    ]


# ---- special model shapes -------------------------------------------------------------------------


def test_reused_linear_shares_one_domain():
    torch.manual_seed(0)
    model = ReusedLinear().eval()
    inputs = (torch.randn(2, 16),)
    plan = planner.plan(model, inputs)
    assert plan.nodes["fc"].calls == 2
    assert plan.nodes["fc"].domain == "int8"
    assert "fc: called 2 times; every call shares one domain and one set of stubs" in plan.notes
    # The stubs wrap the module, so each of the two calls is quantized on entry and dequantized on exit.
    assert [(b.kind, b.module, b.position) for b in plan.boundaries] == [
        ("quantize", "fc", "input"), ("dequantize", "fc", "output")]
    # Fusing fc with relu would apply ReLU after the second call as well.
    assert plan.fusions == []
    assert plan.nodes["relu"].domain == "fp32"
    assert_validates(model, inputs, plan)


def test_linear_subclass_stays_fp32():
    torch.manual_seed(0)
    model = SubclassedLinear().eval()
    inputs = (torch.randn(2, 16),)
    plan = planner.plan(model, inputs)
    # Eager prepare_qat looks up the exact module type in its mapping, so a Linear subclass is never swapped.
    fc1 = plan.nodes["fc1"]
    assert fc1.type.endswith(".MyLinear")
    assert fc1.domain == "fp32"
    assert fc1.rule is None
    assert "MyLinear" in fc1.reason
    assert plan.nodes["fc2"].domain == "int8"
    assert plan.fusions == []
    assert [(b.kind, b.module, b.position) for b in plan.boundaries] == [
        ("quantize", "fc2", "input"), ("dequantize", "fc2", "output")]
    assert_validates(model, inputs, plan)


def test_hand_placed_stubs_stay_inert():
    torch.manual_seed(0)
    model = HandStubbed().eval()
    inputs = (torch.randn(2, 16),)
    plan = planner.plan(model, inputs)
    # Before prepare_qat the hand-placed stubs are identities and FloatFunctional.add is a plain add, so
    # the traced graph contains neither. The planner places its own stubs around the Linear island.
    assert "quant" not in plan.nodes
    assert "dequant" not in plan.nodes
    assert "skip_add" not in plan.nodes
    assert plan.nodes["add#0"].domain == "fp32"
    assert [(b.kind, b.module, b.position) for b in plan.boundaries] == [
        ("quantize", "fc1", "input"), ("dequantize", "fc2", "output")]
    assert fusion_pairs(plan) == [(["fc1", "relu"], ["Linear", "ReLU"])]
    assert_validates(model, inputs, plan)
    prepared = tq.prepare_qat(planner.emit(model, plan), inplace=False)
    # emit clears every qconfig, so the model's own stubs get no observer and convert nothing twice.
    assert not hasattr(prepared.quant, "activation_post_process")
    assert type(prepared.quant) is tq.QuantStub
    assert hasattr(prepared.fc1.quant_in, "activation_post_process")


def test_data_dependent_branch_raises_trace_error():
    model = DataDependentBranch().eval()
    with pytest.raises(planner.TraceError) as raised:
        planner.plan(model, (torch.randn(2, 16),))
    message = str(raised.value)
    assert isinstance(raised.value, planner.PlannerError)
    assert "module 'gate' (SignGate)" in message
    assert "if x.sum() > 0:" in message
    assert "branches on a tensor's value" in message


def test_residual_beside_casting_norm_validates():
    torch.manual_seed(0)
    model = ResidualBesideCastingNorm().eval()
    inputs = (torch.randn(2, 16),)
    plan = planner.plan(model, inputs)
    assert_validates(model, inputs, plan)
    edges = {(e.source, e.target) for e in plan.edges}
    # The residual reads fc1's output directly, not through the norm's no-op .to(float32).
    assert ("fc1", "add#0") in edges
    assert plan.nodes["norm"].domain == "fp32"
    # fc1's output also reaches the fp32 add, so it is dequantized at fc1 and requantized for fc2.
    assert [(b.kind, b.module, b.position) for b in plan.boundaries] == [
        ("quantize", "fc1", "input"),
        ("dequantize", "fc1", "output"),
        ("quantize", "fc2", "input"),
        ("dequantize", "fc2", "output"),
    ]


# ---- command line ---------------------------------------------------------------------------------


def test_cli_validate_factory_cnn_passes(tmp_path):
    sources = [inspect.getsource(item) for item in (BasicBlock, TinyResNet, tiny_resnet)]
    header = "from __future__ import annotations\n\nimport torch\nfrom torch import nn\n\n"
    factory = header + "\n\n".join(textwrap.dedent(source) for source in sources)
    (tmp_path / "cnn_factory.py").write_text(factory, encoding="utf-8")
    command = [str(Path(sys.executable).with_name("qat-planner")), "validate", "cnn_factory:tiny_resnet"]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in CHECK_NAMES:
        assert any(line.startswith(f"PASS  {name}") for line in lines), f"{name!r} not listed as PASS:\n{result.stdout}"
    assert "11 of 11 checks passed" in result.stdout


@pytest.mark.parametrize("name", ["bert", "opt", "llama", "vit", "relu_gpt", "resnet", "mobilenet"])
def test_validate_command_passes(name, monkeypatch):
    from typer.testing import CliRunner

    from planner.cli import app

    monkeypatch.chdir(Path(__file__).parent)
    result = CliRunner().invoke(app, ["validate", f"test_breadth:build_{name}"], env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("11 of 11 checks passed")
