"""Resolve a MODEL argument: a built-in GPT-2 shape, a local Hugging Face folder, or ``package.module:factory``."""

from __future__ import annotations

import copy
import importlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelSpecError

logger = logging.getLogger(__name__)

__all__ = ["BUILTIN_MODELS", "ModelSpec", "resolve_model", "gpt2_config"]

# Published GPT-2 shapes (layers, width, heads); all use a 50257-token vocabulary and 1024 positions.
# gpt2-tiny is this project's own small shape for tests and quick QAT runs, with a byte-level vocabulary.
BUILTIN_MODELS: dict[str, dict[str, int]] = {
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12},
    "gpt2-medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16},
    "gpt2-large": {"n_layer": 36, "n_embd": 1280, "n_head": 20},
    "gpt2-xl": {"n_layer": 48, "n_embd": 1600, "n_head": 25},
    "gpt2-tiny": {"n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": 256, "n_positions": 256},
}


@dataclass
class ModelSpec:
    """A resolved MODEL argument: how to build the model, its example inputs, and where a tokenizer lives."""

    name: str
    build: Any  # callable(device: str | torch.device, vocab_size: int | None) -> nn.Module
    example_inputs: Any  # callable(device, seq_len, vocab_size) -> tuple | dict
    folder: Path | None = None
    is_causal_lm: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def model(self, device: str | torch.device = "meta", vocab_size: int | None = None) -> nn.Module:
        return self.build(device, vocab_size)


def gpt2_config(name: str, vocab_size: int | None = None, n_positions: int | None = None):
    """Return the `GPT2Config` of a built-in shape, optionally with another vocabulary size or context length."""
    from transformers import GPT2Config

    shape = dict(BUILTIN_MODELS[name])
    if vocab_size is not None:
        shape["vocab_size"] = vocab_size
    if n_positions is not None:
        shape["n_positions"] = max(n_positions, shape.get("n_positions", 1024))
    if shape.get("vocab_size", 50257) <= 50256:  # GPT-2's end-of-text id 50256 must be inside the vocabulary
        shape["bos_token_id"] = shape["eos_token_id"] = shape["vocab_size"] - 1
    return GPT2Config(**shape)


def max_positions(model: nn.Module) -> int | None:
    """Return the context length of a Hugging Face model's config, or ``None`` when it has none."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _token_inputs(device, seq_len: int, vocab_size: int | None) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.zeros(1, seq_len, dtype=torch.long, device=device)}


def resolve_model(spec: str) -> ModelSpec:
    """Resolve a built-in name, a local Hugging Face folder, or ``package.module:factory``.

    A factory is called with no arguments and returns a model, or ``(model, example_inputs)``;
    Hugging Face models get ``input_ids`` example inputs when none are returned.

    Raises:
        ModelSpecError: the name is unknown, the folder has no ``config.json``, or the factory cannot
            be imported or returns something else.
    """
    if spec in BUILTIN_MODELS:
        config = gpt2_config(spec)
        return ModelSpec(name=spec, build=lambda device, vocab=None: _gpt2(spec, device, vocab), example_inputs=_token_inputs,
                         extra={"config": config})
    path = Path(spec)
    if path.is_dir():
        return _resolve_folder(path)
    if ":" in spec and not path.exists():
        return _resolve_factory(spec)
    raise ModelSpecError(
        f"unknown model {spec!r}: expected a built-in name ({', '.join(BUILTIN_MODELS)}), "
        "a local Hugging Face folder with config.json, or package.module:factory"
    )


def _gpt2(name: str, device, vocab_size: int | None) -> nn.Module:
    from transformers import GPT2LMHeadModel

    with torch.device(device):
        return GPT2LMHeadModel(gpt2_config(name, vocab_size))


def _resolve_folder(path: Path) -> ModelSpec:
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"{path} has no config.json; pass a Hugging Face model folder (as written by save_pretrained)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelSpecError(f"{path}/config.json could not be read by transformers: {exc}") from None
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    has_tokenizer = any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))

    model_class = _architecture_class(config, path)

    def build(device, vocab_size=None):
        if has_weights and str(device) != "meta":
            return model_class.from_pretrained(path).to(device)
        local = copy.deepcopy(config)  # from_dict(to_dict()) would drop attn_implementation
        if vocab_size is not None:
            local.vocab_size = vocab_size
        with torch.device(device):
            return model_class(local)

    return ModelSpec(name=str(path), build=build, example_inputs=_token_inputs, folder=path,
                     extra={"config": config, "has_weights": has_weights, "has_tokenizer": has_tokenizer})


def _architecture_class(config, path: Path):
    """Return the class named by ``architectures`` in config.json, or the causal-LM auto class."""
    import transformers

    names = getattr(config, "architectures", None) or []
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if names:
        raise ModelSpecError(f"{path}/config.json names architecture {names[0]!r}, which transformers {transformers.__version__} does not have")
    from transformers import AutoModelForCausalLM

    return _AutoFromConfig(AutoModelForCausalLM)


class _AutoFromConfig:
    """Adapter so an auto class builds from a config like a model class does."""

    def __init__(self, auto):
        self.auto = auto

    def __call__(self, config):
        return self.auto.from_config(config)

    def from_pretrained(self, path):
        return self.auto.from_pretrained(path)


def _resolve_factory(spec: str) -> ModelSpec:
    module_name, _, attribute = spec.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except ImportError as exc:
        raise ModelSpecError(f"cannot import {module_name!r} for model {spec!r}: {exc}") from None
    except AttributeError:
        raise ModelSpecError(f"module {module_name!r} has no attribute {attribute!r} (model {spec!r})") from None
    if not callable(factory):
        raise ModelSpecError(f"{spec!r} is not callable; a factory takes no arguments and returns a model")
    try:
        produced = factory()
    except Exception as exc:  # user code failed: name the factory and chain the cause
        raise ModelSpecError(f"factory {spec!r} raised {type(exc).__name__}: {exc}") from exc
    model, inputs = produced if isinstance(produced, tuple) and len(produced) == 2 else (produced, None)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"factory {spec!r} returned {type(model).__name__}, not an nn.Module (or (module, example_inputs))")
    if inputs is None:
        if not hasattr(model, "config") or not hasattr(model.config, "vocab_size"):
            raise ModelSpecError(f"factory {spec!r} returned a model without example inputs; return (model, example_inputs)")
        make_inputs = _token_inputs
    else:
        make_inputs = lambda device, seq_len, vocab: inputs  # noqa: E731 - the factory fixed the inputs
    return ModelSpec(name=spec, build=lambda device, vocab=None: model, example_inputs=make_inputs,
                     is_causal_lm=hasattr(model, "generate"))
