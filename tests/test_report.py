"""Reports: the Mermaid picture of one block, DOT and SVG output, and naming what a differing block changes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import planner
from planner import Match, PlanError, Rule, RuleSet
from planner.models import resolve_model
from planner.report import FORMATS, render

from conftest import meta_ids

KEEP_FIRST = RuleSet(name="keep-first", extends=("default",),
                     rules=(Rule(match=Match(fqn="transformer.h.0.*"), action="float"),))

MISSING_DOT = ('the "dot" program (Graphviz) is not installed; install it (for example `apt-get install graphviz`) '
               "or use --format dot and render elsewhere")


@pytest.fixture(scope="module")
def gpt2_tiny() -> planner.Plan:
    return planner.plan(resolve_model("gpt2-tiny").model("meta"), meta_ids(16))


@pytest.fixture(scope="module")
def gpt2_tiny_keep_first() -> planner.Plan:
    return planner.plan(resolve_model("gpt2-tiny").model("meta"), meta_ids(16), rules=KEEP_FIRST)


@pytest.fixture(scope="module")
def linear_relu_linear() -> planner.Plan:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    return planner.plan(model, (torch.randn(2, 8),))


def mermaid_lines(markdown: str) -> list[str]:
    """The lines between the ```mermaid fence and its closing fence."""
    lines = markdown.splitlines()
    start = lines.index("```mermaid")
    end = lines.index("```", start + 1)
    return lines[start + 1:end]


def definitions(lines: list[str]) -> list[tuple[str, str]]:
    """The (id, first label line) of every node definition, in order."""
    found = []
    for line in lines:
        match = re.fullmatch(r'\s*(\w+)(?:\[|\(\[|\(\(|\()"([^"<]*)(?:<br/>[^"]*)?"[\])]+', line)
        if match:
            found.append((match[1], match[2]))
    return found


def ids_by_label(lines: list[str]) -> dict[str, str]:
    """Map the first line of each node label to the id of the first node with that label."""
    found: dict[str, str] = {}
    for name, label in definitions(lines):
        found.setdefault(label, name)
    return found


def class_members(lines: list[str], name: str) -> list[str]:
    line = next(line for line in lines if line.strip().startswith("class ") and line.strip().endswith(f" {name}"))
    return line.split()[1].split(",")


# ---------------------------------------------------------------- Mermaid


def test_markdown_has_one_mermaid_flowchart(gpt2_tiny):
    markdown = render(gpt2_tiny, "markdown")
    assert markdown.count("```mermaid") == 1
    assert mermaid_lines(markdown)[0] == "flowchart LR"


def test_mermaid_heading_and_legend(gpt2_tiny):
    markdown = render(gpt2_tiny, "markdown")
    assert ("## Data path picture\n\ntransformer.h.0 (blocks h.0–h.3 have the same plan): green nodes run int8, "
            "blue ones fp32; Q on an edge is a QuantStub, DQ a DeQuantStub.\n\n```mermaid\n") in markdown


def test_mermaid_ids_are_plain_identifiers(gpt2_tiny):
    lines = mermaid_lines(render(gpt2_tiny, "markdown"))[1:]
    edges = [line.split() for line in lines if "-->" in line]
    ends = {parts[0] for parts in edges} | {parts[-1] for parts in edges}
    defined = {name for name, _ in definitions(lines)}
    assert len(edges) == 28
    assert len(defined) == 25
    assert all(re.fullmatch(r"n\d+|n_in|n_out|s\d+", name) for name in ends | defined), ends | defined
    assert ends <= defined


def test_mermaid_draws_only_the_first_block(gpt2_tiny):
    labels = [label for _, label in definitions(mermaid_lines(render(gpt2_tiny, "markdown")))]
    assert labels[:3] == ["block input", "ln_1", "attn.c_attn"]
    assert labels[-1] == "block output"
    assert "lm_head" not in labels
    assert "transformer.wte" not in labels
    assert len(labels) == 25


def test_mermaid_c_attn_stub_edges(gpt2_tiny):
    lines = mermaid_lines(render(gpt2_tiny, "markdown"))
    ids = ids_by_label(lines)
    assert '  n1["attn.c_attn<br/>Conv1D as Linear"]' in lines
    assert ids["attn.c_attn"] == "n1"
    assert ids["ln_1"] == "n0"
    assert ids["split"] == "n2"
    assert "  n0 -->|Q| n1" in lines
    assert "  n1 -->|DQ| n2" in lines
    assert "  n_in --> n0" in lines


def test_mermaid_domain_classes(gpt2_tiny):
    lines = mermaid_lines(render(gpt2_tiny, "markdown"))
    ids = ids_by_label(lines)
    assert "  classDef int8 fill:#c8e6c9,stroke:#2e7d32,color:#000" in lines
    assert "  classDef fp32 fill:#e3f2fd,stroke:#1565c0,color:#000" in lines
    assert ids["attn.c_attn"] in class_members(lines, "int8")
    assert ids["ln_1"] in class_members(lines, "fp32")
    assert ids["split"] in class_members(lines, "fp32")


def test_mermaid_mlp_island_has_no_stub_inside(gpt2_tiny):
    lines = mermaid_lines(render(gpt2_tiny, "markdown"))
    ids = ids_by_label(lines)
    c_fc, act, c_proj, dropout = ids["mlp.c_fc"], ids["mlp.act"], ids["mlp.c_proj"], ids["mlp.dropout"]
    assert f"  {ids['ln_2']} -->|Q| {c_fc}" in lines
    assert f"  {c_fc} --> {act}" in lines
    assert f"  {act} --> {c_proj}" in lines
    assert f"  {c_proj} -->|DQ| {dropout}" in lines
    assert sorted(class_members(lines, "int8"), key=lambda i: int(i[1:])) == sorted(
        [ids["attn.c_attn"], ids["attn.c_proj"], c_fc, act, c_proj], key=lambda i: int(i[1:]))


def test_mermaid_joins_edges_through_getitem(gpt2_tiny):
    lines = mermaid_lines(render(gpt2_tiny, "markdown"))
    assert not any('"getitem"' in line for line in lines)
    assert sum(1 for line in lines if line.startswith("  n2 --> ")) == 3


def test_mermaid_boxes_fused_linear_relu(linear_relu_linear):
    lines = mermaid_lines(render(linear_relu_linear, "markdown"))
    start = lines.index('  subgraph f0["fused Linear + ReLU"]')
    assert lines[start + 1:start + 4] == ['    n1["0<br/>Linear"]', '    n2["1<br/>ReLU"]', "  end"]
    assert "  n0 -->|Q| n1" in lines
    assert "  n3 -->|DQ| n4" in lines


def test_mermaid_omits_large_blockless_graph():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(61)])
    markdown = render(planner.plan(model, (torch.randn(2, 4),)), "markdown")
    assert "```mermaid" not in markdown
    assert ("The graph has 63 nodes and no repeated blocks; the picture is drawn for at most 60. "
            "`--format dot` or `--format svg` draws the whole graph.") in markdown


# ---------------------------------------------------------------- DOT and SVG


def test_formats_include_dot_and_svg():
    assert FORMATS == ("text", "json", "markdown", "dot", "svg")


def test_unknown_format_names_accepted_ones(linear_relu_linear):
    with pytest.raises(ValueError, match=r"unknown report format 'png'; accepted: text, json, markdown, dot, svg"):
        render(linear_relu_linear, "png")


def test_dot_is_a_digraph_with_balanced_braces(gpt2_tiny):
    dot = render(gpt2_tiny, "dot")
    assert dot.startswith("digraph plan {")
    assert dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")


def test_dot_has_the_same_edges_as_mermaid(gpt2_tiny):
    dot_edges = [line.split()[:3] for line in render(gpt2_tiny, "dot").splitlines() if " -> " in line]
    mermaid_edges = [line.split() for line in mermaid_lines(render(gpt2_tiny, "markdown")) if "-->" in line]
    assert [(a, b.rstrip(";")) for a, _, b in dot_edges] == [(parts[0], parts[-1]) for parts in mermaid_edges]


def test_dot_labels_stub_edges_of_c_attn(gpt2_tiny):
    lines = render(gpt2_tiny, "dot").splitlines()
    assert '  n1 [label="attn.c_attn\\nConv1D as Linear", shape=box, style="filled,rounded", fillcolor="#c8e6c9", color="#2e7d32"];' in lines
    assert '  n0 -> n1 [label="Q", color="#f9a825", fontcolor="#e65100", penwidth=2];' in lines
    assert '  n1 -> n2 [label="DQ", color="#f9a825", fontcolor="#e65100", penwidth=2];' in lines


def test_dot_puts_fused_linear_relu_in_a_cluster(linear_relu_linear):
    dot = render(linear_relu_linear, "dot")
    cluster = dot[dot.index("subgraph cluster_f0 {"):]
    cluster = cluster[:cluster.index("}") + 1]
    assert 'label="fused Linear + ReLU"; style=dashed;' in cluster
    assert 'n1 [label="0\\nLinear"' in cluster
    assert 'n2 [label="1\\nReLU"' in cluster
    assert "n3 [" not in cluster
    assert dot.count("subgraph cluster_") == 1


def test_svg_without_graphviz(linear_relu_linear, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    with pytest.raises(PlanError) as caught:
        render(linear_relu_linear, "svg")
    assert str(caught.value) == MISSING_DOT


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz dot is not installed")
def test_svg_with_graphviz(linear_relu_linear):
    svg = render(linear_relu_linear, "svg")
    assert svg.lstrip().startswith(("<?xml", "<svg"))
    assert svg.rstrip().endswith("</svg>")
    assert "fused Linear + ReLU" in svg


def test_cli_svg_without_graphviz(tmp_path):
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "PATH": str(tmp_path)}
    completed = subprocess.run([sys.executable, "-m", "planner.cli", "plan", "gpt2-tiny", "--format", "svg"],
                               capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 1
    assert completed.stderr.strip() == f"error: {MISSING_DOT}"


# ---------------------------------------------------------------- a block that differs from its siblings


H0_DIFFERENCE = (
    "differs from h.1–h.3: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.act, mlp.c_proj are fp32 here (int8 there), "
    "by keep-first:rules[0]; no QuantStub at attn.c_attn input; no DeQuantStub at attn.c_attn output; "
    "no QuantStub at attn.c_proj input; no DeQuantStub at attn.c_proj output; no QuantStub at mlp.c_fc input; "
    "no DeQuantStub at mlp.c_proj output"
)


def test_text_names_differing_block(gpt2_tiny_keep_first):
    lines = render(gpt2_tiny_keep_first, "text").splitlines()
    assert f"  h.0: {H0_DIFFERENCE}" in lines
    assert "  h.1–h.3: same plan" in lines
    assert lines.index("  h.1–h.3: same plan") == lines.index(f"  h.0: {H0_DIFFERENCE}") + 2


def test_differing_block_path_has_no_stubs(gpt2_tiny_keep_first):
    lines = render(gpt2_tiny_keep_first, "text").splitlines()
    path = lines[lines.index(f"  h.0: {H0_DIFFERENCE}") + 1]
    assert path.startswith("    ln_1 → attn.c_attn → (split, ")
    assert "[Q]" not in path


def test_markdown_names_differing_block(gpt2_tiny_keep_first):
    lines = render(gpt2_tiny_keep_first, "markdown").splitlines()
    block = next(i for i, line in enumerate(lines) if line.startswith("- `h.0`: "))
    assert lines[block + 1] == f"  - {H0_DIFFERENCE}"
    assert lines[block + 2].startswith("- `h.1–h.3` (same plan): ")


def test_uniform_blocks_get_no_difference_note(gpt2_tiny):
    assert "differs from" not in render(gpt2_tiny, "text")
    assert "differs from" not in render(gpt2_tiny, "markdown")


def test_picture_draws_the_usual_block(gpt2_tiny_keep_first):
    # h.0 is kept fp32 and h.1-h.3 share the usual plan, so the picture shows h.1, with its stubs.
    markdown = render(gpt2_tiny_keep_first, "markdown")
    lines = mermaid_lines(markdown)
    assert any("-->|Q|" in line for line in lines)
    assert any(line.strip().startswith("class ") and line.strip().endswith(" int8") for line in lines)
    assert "transformer.h.1 (blocks h.1–h.3 have the same plan)" in markdown


def test_middle_block_differs_and_later_block_repeats():
    keep_third = RuleSet(name="keep-third", extends=("default",),
                         rules=(Rule(match=Match(fqn="transformer.h.2.*"), action="float"),))
    plan = planner.plan(resolve_model("gpt2-tiny").model("meta"), meta_ids(16), rules=keep_third)
    lines = render(plan, "text").splitlines()
    assert "  h.0–h.1: same plan" in lines
    assert any(line.startswith("  h.2: differs from h.0–h.1: attn.c_attn, ") for line in lines)
    assert "  h.3: same plan as h.0–h.1" in lines


def test_difference_names_type_and_missing_node(gpt2_tiny):
    edited = gpt2_tiny.model_copy(deep=True)
    edited.nodes["transformer.h.2.ln_1"].type = "example.RMSNorm"
    del edited.nodes["transformer.h.2.attn:contiguous#0"]
    edited.edges = [e for e in edited.edges if "transformer.h.2.attn:contiguous#0" not in (e.source, e.target)]
    edited.boundaries = [b for b in edited.boundaries
                         if (b.module, b.position) != ("transformer.h.2.attn.c_attn", "input")]
    lines = render(edited, "text").splitlines()
    assert ("  h.2: differs from h.0–h.1: only there: attn:contiguous#0; ln_1 is RMSNorm here (LayerNorm there); "
            "no QuantStub at attn.c_attn input") in lines
