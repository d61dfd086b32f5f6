"""Inference passes on a converted int8 model: merge each int8 Linear with the dequantize after it.

After ``torch.ao.quantization.convert``, an int8 island ends with ``quantized Linear -> DeQuantize``:
the Linear requantizes its int32 accumulators to uint8, and the next call converts them back to
fp32. oneDNN (the x86 engine) can write the fp32 result directly, which skips both the
requantization and the separate pass over the output, and keeps the exact fp32 value of each
output instead of its int8 rounding. Given the plan, the pass also folds a GELU that only reads
such a Linear into the same call, as a oneDNN post-op, the way GPT-2's ``c_fc -> GELU`` runs
there. PT2E with inductor does the same; eager mode has no module for it, so this pass adds one.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.ao.nn.quantized as nnq
from torch import nn

from .emit import StubWrapper
from .errors import PlannerWarning

__all__ = ["Int8LinearFloatOutput", "merge_dequantize", "merged_from_rows", "can_merge_dequantize", "gelu_folds"]

# Values of GELU's ``approximate`` argument; oneDNN's GELU post-op names its algorithms the same.
_GELU_APPROXIMATIONS = frozenset({"none", "tanh"})


def can_merge_dequantize() -> bool:
    """Return whether this torch build and quantized engine run oneDNN int8 linears with fp32 output."""
    return torch.backends.quantized.engine in ("x86", "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise")


class Int8LinearFloatOutput(nnq.Linear):
    """A converted int8 Linear that returns fp32: its own dequantize, done inside the oneDNN call.

    A subclass of the quantized Linear, so its state-dict keys and ``weight()``/``bias()`` are
    unchanged; only ``forward`` differs. Input: a quint8 tensor; output: float32, after GELU when
    ``gelu`` is ``"none"`` or ``"tanh"`` (the ``approximate`` argument of `torch.nn.GELU`).
    """

    gelu: str | None = None
    # Inputs with fewer rows run the quantized Linear and a separate dequantize (and GELU), which
    # the cost model predicts to be faster there: oneDNN's call costs more per call, less per row.
    min_rows: int = 1

    @classmethod
    def from_quantized(cls, linear: nnq.Linear, gelu: str | None = None) -> "Int8LinearFloatOutput":
        """Return the merged form of a converted Linear, with the same weight, bias and output qparams."""
        return cls.from_weight(linear.weight(), linear.bias(), linear.scale, linear.zero_point, gelu)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, scale: float, zero_point: int,
                    gelu: str | None = None) -> "Int8LinearFloatOutput":
        """Return a merged Linear of a quantized ``weight`` (out x in), ``bias`` and output qparams."""
        out_features, in_features = weight.shape
        merged = cls(in_features, out_features, bias_=bias is not None, dtype=weight.dtype)
        merged.set_weight_bias(weight, bias)
        merged.scale, merged.zero_point = scale, zero_point
        merged.gelu = gelu
        merged._prepare()
        # The packed weight is derived data: loading new weights packs them again.
        merged.register_load_state_dict_post_hook(_repack)
        return merged

    def _prepare(self) -> None:
        weight = self.weight()
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scales = weight.q_per_channel_scales().float()
            zero_points = weight.q_per_channel_zero_points().int()
        else:
            scales = torch.tensor([weight.q_scale()], dtype=torch.float32)
            zero_points = torch.tensor([weight.q_zero_point()], dtype=torch.int32)
        self._onednn = (torch.ops.onednn.qlinear_prepack(weight.int_repr(), None), scales, zero_points, self.bias())

    # oneDNN's packed weight is an opaque tensor that cannot be copied or pickled, so copies and
    # pickles leave it out and pack the weight again.
    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_onednn", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._prepare()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.min_rows > 1 and x.numel() < self.min_rows * self.in_features:
            output = super().forward(x).dequantize()
            return torch.nn.functional.gelu(output, approximate=self.gelu) if self.gelu else output
        packed, scales, zero_points, bias = self._onednn
        post_op, algorithm = ("gelu", self.gelu) if self.gelu else ("none", "")
        return torch.ops.onednn.qlinear_pointwise(
            x.int_repr(), x.q_scale(), x.q_zero_point(), packed, scales, zero_points, bias,
            1.0, 0, torch.float32, post_op, [], algorithm,
        )

    def _get_name(self) -> str:
        return "Int8LinearFloatOutput" + (f"[GELU {self.gelu}]" if self.gelu else "")

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", gelu={self.gelu!r}" if self.gelu else "")


def _repack(module: Int8LinearFloatOutput, _incompatible_keys) -> None:
    module._prepare()


def gelu_folds(plan) -> dict[str, str]:
    """Return ``{linear: gelu}`` for each GELU of ``plan`` that `merge_dequantize` can fold into a Linear.

    The Linear must run in int8 and end its island with a dequantize at its own output. The GELU
    must be torch's (after any substitution) and run in fp32. The GELU must read only the Linear,
    and be its only reader. Each is called once per forward.
    """
    targets = {record.module: record.target for record in plan.substitutions}
    readers: dict[str, list[str]] = {}
    sources: dict[str, list[str]] = {}
    for edge in plan.edges:
        readers.setdefault(edge.source, []).append(edge.target)
        sources.setdefault(edge.target, []).append(edge.source)
    dequantized = {b.module for b in plan.boundaries if b.kind == "dequantize" and b.position == "output"}
    folds = {}
    for name, node in plan.nodes.items():
        effective = targets.get(name, node.type or "")
        if node.kind != "module" or node.domain != "fp32" or node.calls != 1 or not _is_torch_gelu(effective):
            continue
        linear = sources.get(name, [])
        if len(linear) != 1 or readers.get(linear[0]) != [name] or linear[0] not in dequantized:
            continue
        decision = plan.nodes.get(linear[0])
        if decision and decision.kind == "module" and decision.domain == "int8" and decision.calls == 1:
            folds[linear[0]] = name
    return folds


def _is_torch_gelu(qualified: str) -> bool:
    return qualified.startswith("torch.nn") and qualified.rsplit(".", 1)[-1] == "GELU"


def merge_dequantize(model: nn.Module, *, plan=None, cost_model=None, inplace: bool = False) -> nn.Module:
    """Merge every converted int8 Linear with the DeQuantStub at its output (see the module docstring).

    Call it on the model ``convert`` returned, for inference. Each merged Linear returns the fp32
    value that the converted model rounded and clipped to its int8 output range, so outputs differ
    by that rounding and clipping. With the ``plan`` the model was emitted from, a GELU that only
    reads a merged Linear runs inside it (see `gelu_folds`) and its own module becomes an Identity.

    oneDNN's call costs more per call than the quantized Linear and less per row, so at one token
    (decoding) the merge is slower. With a ``cost_model`` (default: the plan's, which latency plans
    carry) each merged Linear gets the row count from which the cost model predicts it to be faster,
    and below it runs the quantized Linear and a separate dequantize; without one it always merges.

    State-dict keys do not change. On engines other than x86/onednn the model is returned unchanged
    with a warning.
    """
    if not inplace:
        model = copy.deepcopy(model)
    if not can_merge_dequantize():
        warnings.warn(f"merge_dequantize needs the x86 or onednn quantized engine, not {torch.backends.quantized.engine!r}; "
                      "the model is unchanged", PlannerWarning, stacklevel=2)
        return model
    folds = gelu_folds(plan) if plan is not None else {}
    if cost_model is None and plan is not None:
        cost_model = plan.cost_model
    for name, wrapper in list(model.named_modules()):
        if not isinstance(wrapper, StubWrapper) or wrapper.output_name != "dequant_out":
            continue
        linear = wrapper._modules["module"]
        if type(linear) is not nnq.Linear or not isinstance(wrapper._modules["dequant_out"], nnq.DeQuantize):
            continue
        holder, key = _foldable_gelu(model, folds.get(name))
        gelu = holder._modules[key] if holder is not None else None
        merged = Int8LinearFloatOutput.from_quantized(linear, gelu.approximate if gelu else None)
        if cost_model is not None:
            merged.min_rows = merged_from_rows(cost_model, linear.in_features, linear.out_features, gelu is not None)
        wrapper._modules["module"] = merged
        del wrapper._modules["dequant_out"]
        wrapper.output_name = None
        if holder is not None:
            holder._modules[key] = nn.Identity()
    return model


def _foldable_gelu(model: nn.Module, name: str | None) -> tuple[nn.Module | None, str]:
    """Return where the GELU the plan names sits in the converted model: (the module holding it, its key).

    The GELU may sit in a StubWrapper, because emit wraps substituted modules, and the wrapper may
    quantize its output: the Identity left in its place passes the folded GELU's output to that
    stub. A GELU with an input stub, or any other module, is not folded: the holder is then None.
    """
    if name is None:
        return None, ""
    parent, _, key = name.rpartition(".")
    try:
        holder = model.get_submodule(parent)
    except AttributeError:
        return None, ""
    module = holder._modules.get(key)
    if isinstance(module, StubWrapper) and not module.input_name and module.output_name in (None, "quant_out"):
        holder, key, module = module, "module", module._modules["module"]
    if type(module) is nn.GELU and module.approximate in _GELU_APPROXIMATIONS:
        return holder, key
    return None, ""


def merged_from_rows(cost_model, in_features: int, out_features: int, gelu: bool) -> int:
    """Return the ``min_rows`` of a merged Linear, or 2**21 when the merge never pays.

    That is the smallest power of two of input rows, up to 2**20, at which ``cost_model`` prices the
    merged call below the separate calls. The merged side includes the Identity left for a folded
    GELU, and the separate side the quantized Linear, its dequantize and the GELU. `estimate`
    prices a merge the same way.
    """
    if "linear_fp32_output" not in cost_model.int8 or (gelu and "linear_fp32_output_gelu" not in cost_model.int8):
        return 1
    weights = in_features * out_features
    for power in range(21):
        rows = 2**power
        macs, outputs = rows * weights, rows * out_features
        separate = cost_model.node_ns("linear", macs, "int8", weights) + cost_model.conversion_ns("dequantize", outputs)
        if gelu:
            separate += cost_model.node_ns("gelu", outputs, "fp32")
        merged = cost_model.node_ns("linear_fp32_output_gelu" if gelu else "linear_fp32_output", macs, "int8", weights)
        if gelu:
            merged += cost_model.node_ns("view", 0, "fp32")  # the Identity left where the GELU was
        if merged <= separate:
            return rows
    return 2**21
