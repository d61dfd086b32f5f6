"""The committed generated docs match what docs/generate.py writes from the current code.

These tests import docs/generate.py and run it on a temporary folder; they do not need MkDocs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
FIX = "run `python docs/generate.py` and commit the files it rewrites"


@pytest.fixture(scope="module")
def generate():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("writer", "path"),
    [
        ("write_rules_reference", "reference/rules.md"),
        ("write_rules_schema", "reference/rules.schema.json"),
        ("write_cli_reference", "reference/cli.md"),
        ("write_gpt2_tiny_report", "generated/gpt2-tiny-report.md"),
    ],
)
def test_generated_file_is_current(generate, tmp_path, writer, path):
    text = getattr(generate, writer)(tmp_path)
    assert (tmp_path / path).read_text(encoding="utf-8") == text
    committed = DOCS / path
    assert committed.is_file(), f"docs/{path} is missing; {FIX}"
    assert committed.read_text(encoding="utf-8") == text, f"docs/{path} is out of date; {FIX}"


def test_gpt2_plan_in_walkthrough_is_current(generate, tmp_path):
    text = generate.write_gpt2_plan(tmp_path)
    assert text.startswith("qat-planner plan for GPT2LMHeadModel")
    assert (DOCS / "generated" / "gpt2-plan.txt").read_text(encoding="utf-8") == text, \
        f"docs/generated/gpt2-plan.txt is out of date; {FIX}"
    page = (DOCS / "gpt2.md").read_text(encoding="utf-8")
    assert generate.generated_block(page, "gpt2-plan") == generate.block_text(generate.fenced(text)), \
        f"the plan in docs/gpt2.md (between the gpt2-plan markers) is out of date; {FIX}"


def test_splice_replaces_only_the_named_block(generate):
    page = (
        "intro\n<!-- generated: a -->\nold\n<!-- end generated -->\n"
        "middle\n<!-- generated: b -->\nkeep\n<!-- end generated -->\n"
    )
    new = generate.splice(page, "a", "```text\nnew\n```\n")
    assert generate.generated_block(new, "a") == "\n```text\nnew\n```\n\n"
    assert generate.generated_block(new, "b") == "keep\n"
    assert generate.splice(new, "a", "```text\nnew\n```\n") == new
    with pytest.raises(generate.DocsError, match="found 0"):
        generate.splice(page, "missing", "x")


def test_field_without_example_fails(generate, monkeypatch):
    schema = generate.rules_schema()
    field = next(key for key in schema["properties"] if key != "$schema")
    examples = {model: dict(fields) for model, fields in generate.EXAMPLES.items()}
    del examples[schema["title"]][field]
    monkeypatch.setattr(generate, "EXAMPLES", examples)
    with pytest.raises(generate.DocsError, match=f"{schema['title']}.{field}: no JSON example"):
        generate.rules_reference(schema)


def test_rejected_example_fails(generate, monkeypatch):
    examples = {model: dict(fields) for model, fields in generate.EXAMPLES.items()}
    examples["Rule"]["action"] = "sometimes"
    monkeypatch.setattr(generate, "EXAMPLES", examples)
    with pytest.raises(generate.DocsError, match="Rule.action: example"):
        generate.rules_reference(generate.rules_schema())
