"""Apply a Plan to an eager model: substitutions, fusion, stub wrappers and per-module qconfigs."""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import torch
from torch import nn
import torch.ao.quantization as tq

from .errors import EmitError, PlannerWarning
from .plan import Plan
from .qconfigs import build_qconfig
from .trace import qualified_name

logger = logging.getLogger(__name__)

__all__ = ["emit", "StubWrapper", "SUBSTITUTION_TOLERANCE"]

# Largest max-abs difference accepted between a module and its substitute on a random input. The
# replacements are exact rewrites (a transposed matmul, the same GELU formula), so they agree to
# float32 rounding. Anything larger means the substitution changes what the model computes.
SUBSTITUTION_TOLERANCE = 1e-5


class StubWrapper(nn.Module):
    """Run one module between optional stubs: ``quant_in``/``dequant_in`` before it, ``quant_out``/``dequant_out`` after.

    Input stubs convert every floating-point (or quantized) tensor argument; output stubs convert the
    output tensor, or each such tensor of a tuple or list output. Before ``prepare_qat`` the stubs are
    identities, so the wrapper computes exactly what the wrapped module computes.
    """

    def __init__(self, module: nn.Module, input_kind: str | None = None, output_kind: str | None = None):
        super().__init__()
        self.input_name = _stub_name(input_kind, "in")
        if self.input_name:
            self.add_module(self.input_name, _new_stub(input_kind))
        self.module = module
        self.output_name = _stub_name(output_kind, "out")
        if self.output_name:
            self.add_module(self.output_name, _new_stub(output_kind))

    def __getattr__(self, name: str) -> Any:
        # Model code sometimes reads attributes of a module it calls (ViT reads
        # ``projection.weight.dtype``); those reads reach the wrapped module. After convert, a quantized
        # module's ``weight()``/``bias()`` are methods returning quantized tensors, so the wrapper returns
        # them dequantized and such reads keep seeing float tensors.
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "module" not in modules:
                raise
        value = getattr(modules["module"], name)
        if name in ("weight", "bias") and callable(value) and not isinstance(value, nn.Module):
            value = value()
            return value.dequantize() if isinstance(value, torch.Tensor) and value.is_quantized else value
        return value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # Runs once per wrapped module per forward, so submodules are read from _modules directly
        # rather than through the two __getattr__ layers.
        modules = self._modules
        if self.input_name:
            stub = modules[self.input_name]
            args = (_convert(stub, args[0]),) if len(args) == 1 else tuple(_convert(stub, a) for a in args)
            if kwargs:
                kwargs = {k: _convert(stub, v) for k, v in kwargs.items()}
        output = modules["module"](*args, **kwargs)
        if self.output_name:
            stub = modules[self.output_name]
            if isinstance(output, (tuple, list)):
                return type(output)(_convert(stub, o) for o in output)
            return _convert(stub, output)
        return output


_STUB_NAMES = frozenset({"quant_in", "dequant_in", "quant_out", "dequant_out"})


def _stub_name(kind: str | None, side: str) -> str | None:
    if kind is None:
        return None
    return f"{'quant' if kind == 'quantize' else 'dequant'}_{side}"


def _new_stub(kind: str) -> nn.Module:
    return tq.QuantStub() if kind == "quantize" else tq.DeQuantStub()


def _convert(stub: nn.Module, value: Any) -> Any:
    if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_quantized):
        return stub(value)
    return value


class _LoadOriginalKeys:
    """Load-state-dict pre-hook that accepts the original model's keys and Conv1D weight layout."""

    def __init__(self, renames: dict[str, str], transposed: set[str]):
        self.renames = renames  # original module prefix -> prefix in the emitted model
        self.transposed = transposed  # original prefixes whose ".weight" is stored (in, out)

    def __call__(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for old, new in sorted(self.renames.items(), key=lambda item: -len(item[0])):
            old_prefix, new_prefix = f"{prefix}{old}.", f"{prefix}{new}."
            for key in [k for k in state_dict if k.startswith(old_prefix) and not k.startswith(new_prefix)]:
                rest = key[len(old_prefix):]
                if rest.split(".", 1)[0] in _STUB_NAMES:
                    continue  # a stub's own state (a converted Quantize's scale): already an emitted key
                value = state_dict.pop(key)
                if old in self.transposed and rest == "weight":
                    value = value.t()
                state_dict[new_prefix + rest] = value


def emit(model: nn.Module, plan: Plan, *, inplace: bool = False) -> nn.Module:
    """Return a model of the same class and forward, ready for ``torch.ao.quantization.prepare_qat``.

    Steps, in order: substitutions (each checked on a random input unless the module is on the meta
    device; a max abs difference above `SUBSTITUTION_TOLERANCE` is an error), fusion with
    ``fuse_modules_qat``, stub wrappers at every boundary, then qconfigs: ``None`` on the root and on
    every fp32 module, the planned qconfig on each int8 module and on each stub. Substituted modules
    are always wrapped, so the original model's state dict (Conv1D layout included) still loads.

    The result is in training mode, as ``prepare_qat`` requires. ``model`` is deep-copied first unless
    ``inplace=True``. The max abs difference of each substitution check is stored in the returned
    model's ``qat_planner_checks`` dict (``None`` where the check was skipped on meta).

    Raises:
        EmitError: the model does not have the modules the plan names, or a substitution is not exact.
    """
    _check_model_matches(model, plan)
    target = model if inplace else copy.deepcopy(model)
    for module in target.modules():
        if hasattr(module, "qconfig"):
            del module.qconfig

    checks = _apply_substitutions(target, plan)
    renames: dict[str, str] = {}
    transposed = {s.module for s in plan.substitutions if s.source.endswith("Conv1D")}
    target.train()
    for group in plan.fusions:
        tq.fuse_modules_qat(target, [group.modules], inplace=True)
        for index, name in enumerate(group.modules):
            renames[name] = f"{group.modules[0]}.{index}"

    qconfigs = {name: build_qconfig(plan.presets[preset]) for name, preset in plan.qconfigs.items()}
    fused_members = {name for group in plan.fusions for name in group.modules[1:]}
    for name, qconfig in qconfigs.items():
        if name not in fused_members:
            target.get_submodule(name).qconfig = qconfig

    wrapped = _insert_stubs(target, plan, qconfigs)
    for name in wrapped:
        for old, new in list(renames.items()):
            if new == name or new.startswith(name + "."):
                renames[old] = name + ".module" + new[len(name):]
        renames.setdefault(name, f"{name}.module")
    target.qconfig = None
    target._register_load_state_dict_pre_hook(_LoadOriginalKeys(renames, transposed))
    target.qat_planner_checks = checks
    return target


def _check_model_matches(model: nn.Module, plan: Plan) -> None:
    if qualified_name(type(model)) != plan.model:
        raise EmitError(f"the plan was made for {plan.model}, but the model is {qualified_name(type(model))}; plan this model first")
    for name, node in plan.nodes.items():
        if node.kind != "module":
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise EmitError(f"the plan names module {name!r}, which the model does not have; plan this model first") from None
        if qualified_name(type(module)) != node.type:
            raise EmitError(
                f"module {name!r} is {qualified_name(type(module))} but the plan expects {node.type}; "
                "pass the original float model, not an emitted or prepared one"
            )
    planned = [name for name, node in plan.nodes.items() if node.kind == "module"]
    unplanned = [
        name for name, module in model.named_modules()
        if name and not any(True for _ in module.children()) and any(True for _ in module.parameters(recurse=False))
        and name not in plan.nodes and not any(name.startswith(p + ".") for p in planned)
    ]
    if unplanned:
        warnings.warn(
            f"the model has {len(unplanned)} modules with parameters that the plan does not name "
            f"({', '.join(unplanned[:3])}{', ...' if len(unplanned) > 3 else ''}); they stay fp32. If the plan "
            "was made for a smaller configuration, plan this model instead",
            PlannerWarning,
            stacklevel=3,
        )


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _apply_substitutions(root: nn.Module, plan: Plan) -> dict[str, float | None]:
    checks: dict[str, float | None] = {}
    generator = torch.Generator().manual_seed(0)
    for record in plan.substitutions:
        original = root.get_submodule(record.module)
        replacement = _build_replacement(original, record.target, record.kwargs)
        checks[record.module] = _max_difference(original, replacement, record.target, generator)
        difference = checks[record.module]
        if difference is not None and difference > SUBSTITUTION_TOLERANCE:
            raise EmitError(
                f"substituting {record.target} for {record.module!r} ({record.source}) changes its output by "
                f"{difference:.3g} (max abs difference, limit {SUBSTITUTION_TOLERANCE}); remove this substitution from the rules"
            )
        logger.info("substituted %s for %s: max abs difference %s", record.target, record.module, difference)
        _set_submodule(root, record.module, replacement)
    return checks


def _build_replacement(original: nn.Module, target: str, kwargs: dict[str, Any]) -> nn.Module:
    if target == "torch.nn.GELU":
        return nn.GELU(**kwargs)
    if target == "torch.nn.Linear":
        weight = original.weight  # transformers' Conv1D stores (in_features, out_features)
        bias = getattr(original, "bias", None)
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if bias is not None:
                linear.bias.copy_(bias)
        linear.train(original.training)
        return linear
    raise EmitError(f"no converter to {target}")


def _max_difference(original: nn.Module, replacement: nn.Module, target: str, generator: torch.Generator) -> float | None:
    parameter = next(original.parameters(), None)
    if parameter is not None and parameter.is_meta:
        return None
    shape = (4, original.weight.shape[0]) if target == "torch.nn.Linear" else (4, 256)
    dtype = parameter.dtype if parameter is not None else torch.float32
    device = parameter.device if parameter is not None else "cpu"
    x = (torch.randn(shape, generator=generator) * 3).to(device=device, dtype=dtype)
    with torch.no_grad():
        return (original(x) - replacement(x)).abs().max().item()


def _insert_stubs(root: nn.Module, plan: Plan, qconfigs: dict[str, tq.QConfig]) -> list[str]:
    """Wrap each module that has a boundary (and each substituted one); return the wrapped fqns."""
    by_module: dict[str, dict[str, Any]] = {}
    for boundary in plan.boundaries:
        by_module.setdefault(boundary.module, {})[boundary.position] = boundary
    for record in plan.substitutions:
        by_module.setdefault(record.module, {})
    stub_qconfigs = {b.module + b.position: build_qconfig(plan.presets[b.qconfig]) for b in plan.boundaries}

    for name, sides in by_module.items():
        inner = root.get_submodule(name)
        wrapper = StubWrapper(
            inner,
            sides["input"].kind if "input" in sides else None,
            sides["output"].kind if "output" in sides else None,
        )
        if wrapper.input_name:
            getattr(wrapper, wrapper.input_name).qconfig = stub_qconfigs[name + "input"]
        if wrapper.output_name:
            getattr(wrapper, wrapper.output_name).qconfig = stub_qconfigs[name + "output"]
        _set_submodule(root, name, wrapper)
    return sorted(by_module)
