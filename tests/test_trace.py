"""Tracing: leaf-module collapse, float-only edges, element counts, meta models, and trace errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel

import planner
from planner.trace import trace

from conftest import meta_ids, small_gpt2_config


@pytest.fixture(scope="module")
def gpt2_graph():
    with torch.device("meta"):
        model = GPT2LMHeadModel(small_gpt2_config(n_layer=1))
    return trace(model, (), {**meta_ids(8), "use_cache": False})


def test_leaf_modules_collapse_to_fqn(gpt2_graph):
    node = gpt2_graph.node("transformer.h.0.mlp.c_fc")
    assert node.kind == "module"
    assert node.module_type == "transformers.pytorch_utils.Conv1D"
    assert node.aten_ops == ["view", "linear", "view"]
    assert gpt2_graph.node("transformer.h.0.mlp.act").module_type == "transformers.activations.NewGELUActivation"


def test_ops_outside_leaves_get_stable_names(gpt2_graph):
    sdpa = gpt2_graph.node("transformer.h.0.attn:scaled_dot_product_attention#0")
    assert sdpa.kind == "op"
    assert sdpa.fqn == "transformer.h.0.attn"
    assert gpt2_graph.node("transformer.h.0:add#0").op == "add"


def test_split_reaches_attention_through_getitem(gpt2_graph):
    split = "transformer.h.0.attn:split#0"
    assert gpt2_graph.predecessors(split) == ["transformer.h.0.attn.c_attn"]
    assert gpt2_graph.successors(split) == [f"transformer.h.0.attn:getitem#{i}" for i in range(3)]


def test_integer_tensors_are_not_edges(gpt2_graph):
    assert not any(n.kind == "input" for n in gpt2_graph.nodes())
    assert gpt2_graph.predecessors("transformer.wte") == []
    assert not any(n.op in ("arange", "cumsum", "le", "eq") for n in gpt2_graph.nodes())


def test_edges_carry_shape_and_elements(gpt2_graph):
    edge = gpt2_graph.graph.edges["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.act"]
    assert [t.shape for t in edge["tensors"]] == [(1, 8, 128)]
    assert edge["elements"] == 1024
    assert gpt2_graph.node("transformer.h.0.attn.c_attn").output_elements == 8 * 96


def test_module_called_twice_is_one_node():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    graph = trace(Twice(), (torch.randn(2, 4),))
    assert graph.node("fc").calls == 2
    assert "fc" in graph.successors("relu#0")
    assert "relu#0" in graph.successors("fc")


def test_trace_restores_training_flag():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model.train()
    trace(model, (torch.randn(1, 2),))
    assert model.training


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.fc(x))


def test_data_dependent_branch_names_module_and_line():
    with pytest.raises(planner.TraceError) as info:
        planner.plan(Branchy(), (torch.randn(2, 4),))
    message = str(info.value)
    assert message.startswith("torch.export could not trace Branchy in module 'gate' (Gate), ")
    assert f"{__file__}:" in message
    assert "(if x.sum() > 0:)" in message
    assert message.endswith(
        "To fix: forward() branches on a tensor's value, which torch.export cannot follow; make the branch "
        "depend on shapes or configuration, or move it outside the model."
    )


def test_wrong_inputs_suggest_checking_signature():
    with pytest.raises(planner.TraceError) as info:
        planner.plan(Branchy(), (torch.randn(2, 4), torch.randn(3)))
    assert str(info.value) == (
        "torch.export could not trace Branchy: TypeError: too many positional arguments. "
        "To fix: check that the example inputs match forward()'s signature, shapes and dtypes."
    )


def test_failed_trace_prints_no_partial_graph(capfd):
    with pytest.raises(planner.TraceError):
        planner.plan(Branchy(), (torch.randn(2, 4),))
    assert "def forward" not in capfd.readouterr().err
