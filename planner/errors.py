"""Exceptions raised by qat-planner. Every project error derives from `PlannerError`."""

from __future__ import annotations


class PlannerError(Exception):
    """Base class of every error qat-planner raises on purpose."""


class TraceError(PlannerError):
    """The model could not be traced into an operator graph."""


class RuleError(PlannerError):
    """A rule file or rule object is invalid."""


class PlanError(PlannerError):
    """No valid plan exists for the model and rules, or a plan file is invalid."""


class EmitError(PlannerError):
    """The plan could not be applied to the model."""


class ModelSpecError(PlannerError):
    """A model name, folder or factory given on the command line could not be resolved."""


class PlannerWarning(UserWarning):
    """A plan or emitted model is valid but carries a limitation the user should know about."""
