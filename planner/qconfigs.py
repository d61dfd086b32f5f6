"""Build torch.ao QConfig objects from the named presets that rule files use."""

from __future__ import annotations

import torch
import torch.ao.quantization as tq

from .rules import QConfigPreset

_REDUCE_RANGE_BY_DEFAULT = {"x86": True, "fbgemm": True, "qnnpack": False, "onednn": False}


def build_qconfig(preset: QConfigPreset) -> tq.QConfig:
    """Return the QAT qconfig that ``preset`` names.

    The default preset of each backend (per-channel symmetric weights, ``quint8`` activations, fused
    fake-quant, moving-average observer, the backend's ``reduce_range``) returns torch's own
    ``get_default_qat_qconfig(backend)``; any other combination is assembled from the same parts.
    """
    if preset.scheme == "float_qparams_weight_only":
        return tq.float_qparams_weight_only_qconfig
    defaults = QConfigPreset(backend=preset.backend)
    if preset == defaults and preset.backend != "qnnpack":
        return tq.get_default_qat_qconfig(preset.backend)

    reduce_range = _REDUCE_RANGE_BY_DEFAULT[preset.backend] if preset.reduce_range is None else preset.reduce_range
    fake_quant = tq.FusedMovingAvgObsFakeQuantize if preset.fake_quant == "fused" else tq.FakeQuantize
    observer = tq.MovingAverageMinMaxObserver if preset.observer == "moving_average_minmax" else tq.MinMaxObserver
    if preset.activation_dtype == "quint8":
        low, high = (0, 127) if reduce_range else (0, 255)
        dtype = torch.quint8
    else:
        low, high = (-64, 63) if reduce_range else (-128, 127)
        dtype = torch.qint8
    activation = fake_quant.with_args(observer=observer, quant_min=low, quant_max=high, dtype=dtype,
                                      qscheme=torch.per_tensor_affine)

    if preset.weight == "per_channel":
        weight_observer = tq.MovingAveragePerChannelMinMaxObserver
        qscheme = torch.per_channel_symmetric if preset.symmetric else torch.per_channel_affine
        extra = {"ch_axis": 0}
    else:
        weight_observer = tq.MovingAverageMinMaxObserver
        qscheme = torch.per_tensor_symmetric if preset.symmetric else torch.per_tensor_affine
        extra = {}
    weight = fake_quant.with_args(observer=weight_observer, quant_min=-128, quant_max=127, dtype=torch.qint8,
                                  qscheme=qscheme, **extra)
    return tq.QConfig(activation=activation, weight=weight)
