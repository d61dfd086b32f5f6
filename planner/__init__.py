"""qat-planner: plan QuantStub/DeQuantStub placement, fusion and fp32 islands for eager-mode QAT."""

from .errors import EmitError, ModelSpecError, PlanError, PlannerError, PlannerWarning, RuleError, TraceError
from .emit import emit
from .optimize import gelu_folds, merge_dequantize
from .plan import Plan, plan
from .report import render
from .rules import Fusion, Match, QConfigPreset, Rule, RuleSet, Substitution, load_rules
from .trace import trace

__all__ = [
    "plan",
    "emit",
    "merge_dequantize",
    "gelu_folds",
    "render",
    "trace",
    "Plan",
    "Match",
    "Rule",
    "Fusion",
    "Substitution",
    "QConfigPreset",
    "RuleSet",
    "load_rules",
    "PlannerError",
    "TraceError",
    "RuleError",
    "PlanError",
    "EmitError",
    "ModelSpecError",
    "PlannerWarning",
]
