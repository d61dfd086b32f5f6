"""Inference passes on a converted int8 model: merge each int8 Linear with the dequantize after it.

After ``torch.ao.quantization.convert``, an int8 island ends with ``quantized Linear -> DeQuantize``:
the Linear requantizes its int32 accumulators to uint8, and the next call converts them back to
fp32. oneDNN (the x86 engine) can write the fp32 result directly, which skips both the
requantization and the separate pass over the output, and keeps the exact fp32 value of each
output instead of its int8 rounding. PT2E with inductor does the same; eager mode has no module
for it, so this pass adds one.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.ao.nn.quantized as nnq
from torch import nn

from .emit import StubWrapper
from .errors import PlannerWarning

__all__ = ["Int8LinearFloatOutput", "merge_dequantize", "can_merge_dequantize"]


def can_merge_dequantize() -> bool:
    """Return whether this torch build and quantized engine run oneDNN int8 linears with fp32 output."""
    return torch.backends.quantized.engine in ("x86", "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise")


class Int8LinearFloatOutput(nnq.Linear):
    """A converted int8 Linear that returns fp32: its own dequantize, done inside the oneDNN call.

    A subclass of the quantized Linear, so its state-dict keys and ``weight()``/``bias()`` are
    unchanged; only ``forward`` differs. Input: a quint8 tensor; output: float32.
    """

    @classmethod
    def from_quantized(cls, linear: nnq.Linear) -> "Int8LinearFloatOutput":
        merged = cls(linear.in_features, linear.out_features, bias_=linear.bias() is not None, dtype=linear.weight().dtype)
        merged.set_weight_bias(linear.weight(), linear.bias())
        merged.scale, merged.zero_point = linear.scale, linear.zero_point
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
        packed, scales, zero_points, bias = self._onednn
        return torch.ops.onednn.qlinear_pointwise(
            x.int_repr(), x.q_scale(), x.q_zero_point(), packed, scales, zero_points, bias,
            1.0, 0, torch.float32, "none", [], "",
        )

    def _get_name(self) -> str:
        return "Int8LinearFloatOutput"


def _repack(module: Int8LinearFloatOutput, _incompatible_keys) -> None:
    module._prepare()


def merge_dequantize(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Merge every converted int8 Linear with the DeQuantStub at its output (see the module docstring).

    Call it on the model ``convert`` returned, for inference. Each merged Linear returns the fp32
    value that the converted model rounded and clipped to its int8 output range, so outputs differ
    by that rounding and clipping. State-dict keys do not change. On engines other than x86/onednn
    the model is returned unchanged with a warning.
    """
    if not inplace:
        model = copy.deepcopy(model)
    if not can_merge_dequantize():
        warnings.warn(f"merge_dequantize needs the x86 or onednn quantized engine, not {torch.backends.quantized.engine!r}; "
                      "the model is unchanged", PlannerWarning, stacklevel=2)
        return model
    for wrapper in model.modules():
        if not isinstance(wrapper, StubWrapper) or wrapper.output_name != "dequant_out":
            continue
        linear = wrapper._modules["module"]
        if type(linear) is not nnq.Linear or not isinstance(wrapper._modules["dequant_out"], nnq.DeQuantize):
            continue
        wrapper._modules["module"] = Int8LinearFloatOutput.from_quantized(linear)
        del wrapper._modules["dequant_out"]
        wrapper.output_name = None
    return model
