"""Build torch.ao QConfig objects from the named presets that rule files use."""

from __future__ import annotations

import torch.ao.quantization as tq

from .rules import QConfigPreset


def build_qconfig(preset: QConfigPreset) -> tq.QConfig:
    """Return the QAT qconfig that ``preset`` names.

    ``per_channel`` weights use torch's default QAT qconfig for the backend (qnnpack has no
    per-channel default, so it gets per-tensor weights); ``per_tensor`` keeps the backend's
    activation fake-quant and uses `default_weight_fake_quant` for weights.
    """
    if preset.scheme == "float_qparams_weight_only":
        return tq.float_qparams_weight_only_qconfig
    qconfig = tq.get_default_qat_qconfig(preset.backend)
    if preset.weight == "per_tensor":
        return tq.QConfig(activation=qconfig.activation, weight=tq.default_weight_fake_quant)
    return qconfig
