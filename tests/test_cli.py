"""The command line: reports for built-in models, and one-line errors with exit code 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from planner.cli import app

runner = CliRunner()


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_plan_text_report_folds_blocks():
    result = runner.invoke(app, ["plan", "gpt2-tiny", "--seq-len", "32"], env={"NO_COLOR": "1", "COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "h.0–h.3: same plan" in result.output
    assert ("ln_1 → [Q] attn.c_attn [DQ] → (split, view, transpose, scaled_dot_product_attention, reshape, contiguous)"
            " → [Q] attn.c_proj [DQ] → attn.resid_dropout → (+) → ln_2 → [Q] mlp.c_fc → mlp.act → mlp.c_proj [DQ]") in result.output
    assert "nothing fused: no module chain in the model matches a fusion pattern" in result.output
    assert "16 × Conv1D → Linear" in result.output
    assert "Totals: 26 conversions (13 QuantStub, 13 DeQuantStub)" in result.output


def test_plan_json_to_file(tmp_path):
    out = tmp_path / "plan.json"
    result = runner.invoke(app, ["plan", "gpt2-tiny", "--format", "json", "--out", str(out), "--objective", "count"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["objective"] == "count"
    assert data["stats"]["conversions"] == 26


def test_plan_markdown_has_stub_table():
    result = runner.invoke(app, ["plan", "gpt2-tiny", "--format", "markdown"])
    assert result.exit_code == 0, result.output
    assert "| stub | module | position | elements | qconfig | why |" in result.output
    assert "| QuantStub | `transformer.h.0.attn.c_attn` (and 3 more blocks) | input | 16384 | x86 |" in result.output


def test_unknown_model_exits_1_with_one_line():
    completed = run_cli("plan", "gpt3")
    assert completed.returncode == 1
    assert completed.stderr.strip() == (
        "error: unknown model 'gpt3': expected a built-in name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
        "gpt2-tiny), a local Hugging Face folder with config.json, or package.module:factory"
    )


def test_bad_rule_file_exits_1(tmp_path):
    rules = tmp_path / "bad.json"
    rules.write_text('{"rules": [{"match": {"type": "Linear"}, "action": "int8"}]}')
    completed = run_cli("plan", "gpt2-tiny", "--rules", str(rules))
    assert completed.returncode == 1
    assert completed.stderr.strip() == (
        f"error: {rules}: rules[0].action: invalid value; input should be 'quantize', 'float' or 'passthrough' (got 'int8')"
    )


def test_untraceable_factory_exits_1(tmp_path):
    (tmp_path / "branchy.py").write_text(
        "import torch\n"
        "from torch import nn\n\n"
        "class Gate(nn.Module):\n"
        "    def forward(self, x):\n"
        "        if x.sum() > 0:\n"
        "            return x * 2\n"
        "        return x\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(4, 4), Gate()), (torch.randn(2, 4),)\n"
    )
    completed = run_cli("plan", "branchy:build", cwd=tmp_path)
    assert completed.returncode == 1
    assert completed.stderr.startswith("error: torch.export could not trace Sequential in module '1' (Gate), ")
    assert "branchy.py:6 (if x.sum() > 0:)" in completed.stderr


def test_factory_model_plans(tmp_path):
    (tmp_path / "mlp.py").write_text(
        "import torch\n"
        "from torch import nn\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), (torch.randn(2, 8),)\n"
    )
    completed = run_cli("plan", "mlp:build", "--format", "json", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    data = json.loads(completed.stdout)
    assert data["fusions"] == [{"modules": ["0", "1"], "types": ["Linear", "ReLU"]}]
    assert [(b["kind"], b["module"], b["position"]) for b in data["boundaries"]] == [
        ("quantize", "0", "input"), ("dequantize", "2", "output")]


@pytest.mark.parametrize("spec", ["no_such_module:build", "json:no_such_factory"])
def test_bad_factory_exits_1(spec):
    completed = run_cli("plan", spec)
    assert completed.returncode == 1
    assert completed.stderr.startswith("error: ")
    assert spec.split(":")[0] in completed.stderr


def test_local_folder_plans(tmp_path):
    from transformers import GPT2LMHeadModel

    from conftest import small_gpt2_config

    GPT2LMHeadModel(small_gpt2_config()).save_pretrained(tmp_path / "tiny")
    completed = run_cli("plan", str(tmp_path / "tiny"), "--format", "json", "--seq-len", "16")
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["stats"]["conversions"] == 14


def test_deprecation_warnings_shown_once(tmp_path):
    completed = run_cli("qat", "gpt2-tiny", "--text", __file__, "--float-steps", "1", "--qat-steps", "1",
                        "--seq-len", "16", "--batch-size", "2")
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr.count("torch.ao.quantization is deprecated") == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["plan", "gpt2", "--objective", "time"], "Invalid value for '--objective'", id="bad-objective"),
        pytest.param(["plan"], "Missing argument 'model'", id="missing-model"),
        pytest.param(["plan", "gpt2", "--seq-len", "0"], "Invalid value for '--seq-len'", id="zero-seq-len"),
        pytest.param(["qat", "gpt2-tiny", "--text", "no-such-file.txt"], "Invalid value for '--text'", id="missing-text"),
    ],
)
def test_usage_errors_exit_2_with_usage(args, expected):
    completed = run_cli(*args)
    assert completed.returncode == 2
    assert completed.stderr.startswith("Usage: qat-planner ")
    assert expected in completed.stderr
    assert "unexpected error" not in completed.stderr


def test_seq_len_beyond_positions_rejected():
    completed = run_cli("plan", "gpt2", "--seq-len", "2000")
    assert completed.returncode == 1
    assert completed.stderr.strip() == "error: --seq-len 2000 is longer than the model's 1024 positions; pass --seq-len 1024 or less"


def test_missing_output_folder_is_one_line(tmp_path):
    target = tmp_path / "missing" / "report.txt"
    completed = run_cli("plan", "gpt2-tiny", "--out", str(target))
    assert completed.returncode == 1
    assert completed.stderr.strip() == f"error: No such file or directory: {target}"


def test_raising_factory_is_named(tmp_path):
    (tmp_path / "broken.py").write_text("def build():\n    raise RuntimeError('boom in factory')\n")
    completed = run_cli("plan", "broken:build", cwd=tmp_path)
    assert completed.returncode == 1
    assert completed.stderr.strip() == "error: factory 'broken:build' raised RuntimeError: boom in factory"


def test_qat_short_text_rejected_before_training(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("To be, or not to be." * 10)
    completed = run_cli("qat", "gpt2-tiny", "--text", str(text))
    assert completed.returncode == 1
    assert completed.stderr.strip().endswith(
        f"error: {text} has 200 tokens; with --seq-len 128 QAT needs at least 1291 so that the held-out 10% "
        "holds one window; use a longer text or a smaller --seq-len"
    )
    assert "fp32 training" not in completed.stderr


def test_qat_rejects_non_language_model(tmp_path):
    (tmp_path / "cnn.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (torch.randn(1, 3, 8, 8),)\n"
    )
    text = tmp_path / "text.txt"
    text.write_text("hello world " * 2000)
    completed = run_cli("qat", "cnn:build", "--text", str(text), "--seq-len", "16", cwd=tmp_path)
    assert completed.returncode == 1
    assert "qat trains causal language models (token ids in, logits out), and Sequential is not" in completed.stderr


def test_folder_uses_saved_architecture(tmp_path):
    from transformers import GPT2Model

    from conftest import small_gpt2_config

    GPT2Model(small_gpt2_config()).save_pretrained(tmp_path / "base")
    completed = run_cli("plan", str(tmp_path / "base"), "--format", "json", "--seq-len", "16")
    assert completed.returncode == 0, completed.stderr
    data = json.loads(completed.stdout)
    assert data["model"] == "transformers.models.gpt2.modeling_gpt2.GPT2Model"
    assert "lm_head" not in data["nodes"]


def test_fp32_summary_counts_per_rule(tmp_path):
    rules = tmp_path / "keep-first.json"
    rules.write_text(json.dumps({"name": "keep-first", "extends": ["default"], "rules": [
        {"match": {"fqn": "transformer.h.0.*"}, "action": "float", "reason": "first block is accuracy-sensitive"}]}))
    result = runner.invoke(app, ["plan", "gpt2-tiny", "--rules", str(rules)], env={"NO_COLOR": "1", "COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "2 × LayerNorm: first block is accuracy-sensitive [keep-first:rules[0]]" in result.output
    assert "7 × LayerNorm: normalization and attention are accuracy-sensitive" in result.output
