"""Conversions of the default plan against wrapping every int8 Linear and convolution alone.

The architectures are those of the breadth tests: Hugging Face GPT-2, BERT, OPT, Llama and ViT
from small configs, a GPT-2 layout with a ReLU MLP, a ResNet and a MobileNet. For each, the script
plans the model with the default rules. It counts the plan's conversions (QuantStub and
DeQuantStub, `Plan.boundaries`) and the elements they convert.

The naive placement wraps every module that the plan runs in int8 and whose type is Linear, Conv1D
(Hugging Face GPT-2) or Conv1d/2d/3d in its own QuantStub → module → DeQuantStub. That costs 2
conversions per module, which convert the module's input and output elements. Element counts are those the solver
prices: the distinct float tensors on the module's input and output edges in the traced graph.

Per block divides each total by the model's number of repeated blocks (transformer layers, or
residual blocks of the CNNs). "in blocks" counts only conversions at modules inside a block, which
leaves out the model's ends (embeddings, classifier or LM head). The ratio columns are naive / plan.

    python benchmarks/conversions.py [--layers 4] [--seq-len 16] [--json results/conversions.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The models written in plain PyTorch are the breadth tests' own, so both measure the same layouts.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from architectures import ReluGPT, TinyMobileNet, TinyResNet

import planner
from planner.match import BLOCK_PATTERN
from planner.models import gpt2_config
from planner.plan import _split_inputs

# Short type names of the modules the naive placement wraps.
NAIVE_TYPES = frozenset({"Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d"})
# TinyResNet's residual blocks are "layer1", "layer2", which the planner's block pattern
# ("layer.1") does not match.
RESNET_BLOCK_PATTERN = re.compile(r"^layer\d+(?=[.:]|$)")


@dataclass
class Architecture:
    """A small model of one architecture, its example inputs and how to find its repeated blocks."""

    name: str
    model: nn.Module
    inputs: tuple[Any, ...] | dict[str, Any]
    blocks: int
    block_pattern: re.Pattern[str] = BLOCK_PATTERN


# ---- architectures --------------------------------------------------------------------------------


def token_ids(vocab_size: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1))


def build_gpt2(layers: int, seq_len: int) -> Architecture:
    from transformers import GPT2LMHeadModel

    config = gpt2_config("gpt2-tiny", n_positions=seq_len)
    config.n_layer = layers
    return Architecture("gpt2", GPT2LMHeadModel(config).eval(), {"input_ids": token_ids(config.vocab_size, seq_len)}, layers)


def build_bert(layers: int, seq_len: int) -> Architecture:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=max(64, seq_len), attn_implementation="eager")
    inputs = {"input_ids": token_ids(100, seq_len), "attention_mask": torch.ones(1, seq_len, dtype=torch.long)}
    return Architecture("bert", BertModel(config).eval(), inputs, layers)


def build_opt(layers: int, seq_len: int) -> Architecture:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, ffn_dim=64, num_attention_heads=2,
                       max_position_embeddings=max(64, seq_len), word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2,
                       eos_token_id=2)
    return Architecture("opt", OPTForCausalLM(config).eval(), {"input_ids": token_ids(100, seq_len)}, layers)


def build_llama(layers: int, seq_len: int) -> Architecture:
    from transformers import LlamaConfig, LlamaForCausalLM

    # One key/value head for two query heads: grouped-query attention, as in the breadth tests.
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=max(64, seq_len))
    return Architecture("llama", LlamaForCausalLM(config).eval(), {"input_ids": token_ids(100, seq_len)}, layers)


def build_vit(layers: int, seq_len: int) -> Architecture:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64, image_size=16,
                       patch_size=8, num_channels=3, attn_implementation="eager")
    return Architecture("vit", ViTModel(config).eval(), (torch.randn(1, 3, 16, 16),), layers)


def build_relu_gpt(layers: int, seq_len: int) -> Architecture:
    model = ReluGPT(layers=layers, context=seq_len).eval()
    return Architecture("relu-gpt", model, (token_ids(64, seq_len),), layers)


def build_resnet(layers: int, seq_len: int) -> Architecture:
    return Architecture("resnet", TinyResNet().eval(), (torch.randn(2, 3, 16, 16),), 2, RESNET_BLOCK_PATTERN)


def build_mobilenet(layers: int, seq_len: int) -> Architecture:
    return Architecture("mobilenet", TinyMobileNet().eval(), (torch.randn(2, 3, 16, 16),), 2)


# Each builder takes (transformer layers, tokens). The CNNs ignore both, because they have a fixed
# number of blocks and image inputs.
BUILDERS: dict[str, Callable[[int, int], Architecture]] = {
    "gpt2": build_gpt2,
    "bert": build_bert,
    "opt": build_opt,
    "llama": build_llama,
    "vit": build_vit,
    "relu-gpt": build_relu_gpt,
    "resnet": build_resnet,
    "mobilenet": build_mobilenet,
}


# ---- counting -------------------------------------------------------------------------------------


def in_block(pattern: re.Pattern[str], module: str) -> bool:
    return pattern.match(module) is not None


def count(architecture: Architecture) -> dict[str, Any]:
    """Plan ``architecture`` with the default rules and count the plan's and the naive conversions."""
    plan = planner.plan(architecture.model, architecture.inputs)
    args, kwargs = _split_inputs(architecture.model, architecture.inputs, None)
    graph = planner.trace(architecture.model, args, kwargs)
    if {node.name for node in graph.nodes()} != set(plan.nodes):
        raise RuntimeError(f"{architecture.name}: a second trace gave other nodes than the plan's, so element counts would not match")

    wrapped = [name for name, node in plan.nodes.items()
               if node.kind == "module" and node.domain == "int8" and node.type.rsplit(".", 1)[-1] in NAIVE_TYPES]
    naive_elements = {name: graph.node(name).input_elements + graph.node(name).output_elements for name in wrapped}
    pattern = architecture.block_pattern
    blocks = architecture.blocks
    plan_in_blocks = [b for b in plan.boundaries if in_block(pattern, b.module)]
    naive_in_blocks = [name for name in wrapped if in_block(pattern, name)]
    return {
        "model": architecture.name,
        "type": plan.model,
        "blocks": blocks,
        "int8_modules": plan.stats.int8_modules,
        "wrapped_modules": len(wrapped),
        "plan": {
            "conversions": plan.stats.conversions,
            "elements": plan.stats.converted_elements,
            "conversions_in_blocks": len(plan_in_blocks),
            "elements_in_blocks": sum(b.elements for b in plan_in_blocks),
        },
        "naive": {
            "conversions": 2 * len(wrapped),
            "elements": sum(naive_elements.values()),
            "conversions_in_blocks": 2 * len(naive_in_blocks),
            "elements_in_blocks": sum(naive_elements[name] for name in naive_in_blocks),
        },
    }


def ratio(naive: float, plan: float) -> float | None:
    return naive / plan if plan else None


def format_ratio(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'model':10} {'blocks':>6} {'wrapped':>7} | {'conversions':>11} {'per block':>9} {'naive':>6} {'ratio':>6} "
          f"{'in-block ratio':>14} | {'elements':>9} {'per block':>9} {'naive':>9} {'ratio':>6} {'in-block ratio':>14}")
    for row in rows:
        plan, naive, blocks = row["plan"], row["naive"], row["blocks"]
        print(f"{row['model']:10} {blocks:6d} {row['wrapped_modules']:7d} | "
              f"{plan['conversions']:11d} {plan['conversions'] / blocks:9.1f} {naive['conversions']:6d} "
              f"{format_ratio(row['conversion_ratio']):>6} {format_ratio(row['conversion_ratio_in_blocks']):>14} | "
              f"{plan['elements']:9d} {plan['elements'] / blocks:9.0f} {naive['elements']:9d} "
              f"{format_ratio(row['element_ratio']):>6} {format_ratio(row['element_ratio_in_blocks']):>14}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS), metavar="MODEL",
                        help=f"architectures to count, from: {', '.join(BUILDERS)} (default: all)")
    parser.add_argument("--layers", type=int, default=4,
                        help="transformer layers of every transformer model (default: 4). The CNNs have 2 blocks")
    parser.add_argument("--seq-len", type=int, default=16, help="tokens in the example input of the text models (default: 16)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON to PATH")
    args = parser.parse_args()
    if args.layers < 1:
        parser.error(f"--layers must be at least 1, got {args.layers}")
    if args.seq_len < 1:
        parser.error(f"--seq-len must be at least 1, got {args.seq_len}")
    warnings.simplefilter("ignore")
    torch.manual_seed(0)

    rows = []
    for name in args.models:
        row = count(BUILDERS[name](args.layers, args.seq_len))
        plan, naive = row["plan"], row["naive"]
        row["conversion_ratio"] = ratio(naive["conversions"], plan["conversions"])
        row["element_ratio"] = ratio(naive["elements"], plan["elements"])
        row["conversion_ratio_in_blocks"] = ratio(naive["conversions_in_blocks"], plan["conversions_in_blocks"])
        row["element_ratio_in_blocks"] = ratio(naive["elements_in_blocks"], plan["elements_in_blocks"])
        rows.append(row)

    print(f"default rules, objective bytes; {args.layers} transformer layers, {args.seq_len} tokens, batch 1; "
          "CNNs: 2 blocks, batch 2 of 3x16x16")
    print("naive: every int8 Linear/Conv1D/Conv wrapped alone (2 conversions each); ratio = naive / plan")
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {"layers": args.layers, "seq_len": args.seq_len, "rows": rows}
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
