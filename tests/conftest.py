"""Shared fixtures: small GPT-2 configurations and the real text the QAT tests train on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shakespeare() -> str:
    if not TEXT.is_file():
        pytest.skip(f"{TEXT} not found; the QAT tests read the tiny-shakespeare text next to the checkout")
    return TEXT.read_text(encoding="utf-8")


def small_gpt2_config(n_layer: int = 2, n_embd: int = 32, vocab_size: int = 256):
    from transformers import GPT2Config

    return GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=vocab_size, n_positions=128,
                      bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)


def meta_ids(seq_len: int = 16) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.zeros(1, seq_len, dtype=torch.long, device="meta")}


def pytest_terminal_summary(terminalreporter):
    """List the generated models the planner refused, so refusals are visible in every run."""
    from test_random_models import REFUSALS

    terminalreporter.write_line(f"generated models refused by the planner: {len(REFUSALS)}")
    for line in REFUSALS:
        terminalreporter.write_line(f"  {line}")
