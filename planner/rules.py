"""Rule sets as data: Pydantic models, JSON loading with precise errors, and the built-in sets."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from .errors import RuleError

__all__ = [
    "Match",
    "Layers",
    "Rule",
    "Fusion",
    "Substitution",
    "QConfigPreset",
    "RuleSet",
    "load_rules",
    "builtin_rule_sets",
    "resolve_rules",
    "flatten_rules",
    "ResolvedRules",
    "RuleOrigin",
    "SUBSTITUTION_TARGETS",
]

Action = Literal["quantize", "float", "passthrough"]
Backend = Literal["x86", "fbgemm", "qnnpack", "onednn"]

# Replacement module types the emitter can build, with the source types each accepts
# ("*" means any module without parameters). A substitution outside this table is rejected at load.
SUBSTITUTION_TARGETS: dict[str, tuple[str, ...]] = {
    "torch.nn.Linear": ("transformers.pytorch_utils.Conv1D",),
    "torch.nn.GELU": ("*",),
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _as_tuple(value: Any) -> Any:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    return value


class Layers(_Model):
    """Block selector: the repeated blocks a rule covers, by the index in the fqn (``transformer.h.3`` is 3).

    Set exactly one of ``first`` (the first N blocks), ``last`` (the last N), ``range`` (inclusive
    ``[start, end]``) or ``index`` (a list of indices). A node outside any repeated block never matches.
    """

    first: int | None = Field(default=None, ge=1)
    last: int | None = Field(default=None, ge=1)
    range: tuple[int, int] | None = None
    index: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Layers":
        chosen = [name for name in ("first", "last", "range", "index") if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError(f"set exactly one of 'first', 'last', 'range' or 'index'; got {chosen or 'none'}")
        if self.range is not None and not 0 <= self.range[0] <= self.range[1]:
            raise ValueError(f"'range' needs 0 <= start <= end; got {list(self.range)}")
        return self

    def covers(self, index: int, count: int) -> bool:
        """Return whether block ``index`` of a container with ``count`` blocks is selected."""
        if self.first is not None:
            return index < self.first
        if self.last is not None:
            return index >= count - self.last
        if self.range is not None:
            return self.range[0] <= index <= self.range[1]
        return index in (self.index or ())


class Match(_Model):
    """Node selector of a rule. Every field that is set must match (AND), and a list means OR.

    ``type`` matches a module node by its class name, short (``Linear``) or qualified
    (``torch.nn.modules.linear.Linear``). A substituted module also matches its replacement type, and
    subclasses match only with ``subclasses: true``. ``fqn``/``fqn_regex`` match the module path
    (for op nodes, the enclosing module's path). ``op`` matches op nodes by canonical op name
    (``softmax``, ``add``). ``within_type``/``within_fqn`` match any enclosing module. ``layers``
    selects repeated blocks by index, and ``rank`` the rank of the node's output tensor. ``where`` is
    a Python predicate on the traced `planner.graph.Node`; it cannot be written in JSON.
    """

    type: tuple[str, ...] | None = None
    subclasses: bool = False
    fqn: tuple[str, ...] | None = None
    fqn_regex: str | None = None
    op: tuple[str, ...] | None = None
    within_type: tuple[str, ...] | None = None
    within_fqn: tuple[str, ...] | None = None
    layers: Layers | None = None
    rank: tuple[int, ...] | None = None
    where: SkipJsonSchema[Callable[[Any], bool] | None] = Field(default=None, exclude=True, repr=False)

    _normalize = field_validator("type", "fqn", "op", "within_type", "within_fqn", "rank", mode="before")(_as_tuple)

    @field_validator("fqn_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> "Match":
        selectors = ("type", "fqn", "fqn_regex", "op", "within_type", "within_fqn", "layers", "rank", "where")
        if all(getattr(self, name) is None for name in selectors):
            raise ValueError(f"a match needs at least one of {', '.join(repr(n) for n in selectors[:-1])}")
        if self.type is not None and self.op is not None:
            raise ValueError("'type' matches module nodes and 'op' matches op nodes, so a match with both matches nothing")
        if self.subclasses and self.type is None:
            raise ValueError("'subclasses' needs 'type'")
        return self

    @property
    def specificity(self) -> int:
        """Rank used to order rules of equal priority; see the precedence section of the rules guide.

        An exact ``fqn`` scores 4 and a glob or ``fqn_regex`` 2. ``type`` scores 1 (0 with
        ``subclasses``), and ``op``, ``within_*``, ``layers``, ``rank`` and ``where`` 1 each. The
        scores add up.
        """
        score = 0
        if self.fqn is not None:
            score += 4 if all(not any(c in p for c in "*?[") for p in self.fqn) else 2
        if self.fqn_regex is not None:
            score += 2
        if self.type is not None and not self.subclasses:
            score += 1
        for name in ("op", "within_type", "within_fqn", "layers", "rank", "where"):
            if getattr(self, name) is not None:
                score += 1
        return score


class Rule(_Model):
    """Decide the domain of matching nodes: run them quantized, keep them float, or let the planner choose."""

    match: Match
    action: Action
    qconfig: str | None = None
    reason: str | None = None
    priority: int = 0


class Fusion(_Model):
    """An ordered chain of module types to fuse with ``fuse_modules_qat`` (``["Linear", "ReLU"]``)."""

    types: tuple[str, ...] = Field(min_length=2)

    _normalize = field_validator("types", mode="before")(_as_tuple)


class Substitution(_Model):
    """Replace modules of type ``source`` by an equivalent ``target`` that eager quantization maps."""

    source: str
    target: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    reason: str | None = None

    @model_validator(mode="after")
    def _known_target(self) -> "Substitution":
        if self.target not in SUBSTITUTION_TARGETS:
            raise ValueError(f"unknown substitution target {self.target!r}; accepted: {sorted(SUBSTITUTION_TARGETS)}")
        sources = SUBSTITUTION_TARGETS[self.target]
        if "*" not in sources and self.source not in sources:
            raise ValueError(f"no converter from {self.source!r} to {self.target!r}; accepted sources: {list(sources)}")
        return self


class QConfigPreset(_Model):
    """A named qconfig, so rule files choose quantization schemes without code.

    ``scheme="activation_and_weight"`` builds a QAT qconfig: fake-quantized activations (``quint8`` or
    ``qint8``) and ``qint8`` weights, per-channel or per-tensor, symmetric or affine.
    ``reduce_range`` defaults to the backend's choice (true for x86 and fbgemm, whose int8 kernels can
    overflow with full-range activations). ``fake_quant="fused"`` uses torch's fused observer and
    fake-quant module, ``"standard"`` the separate `FakeQuantize`; ``observer`` picks its activation
    observer. ``scheme="float_qparams_weight_only"`` is the only scheme embeddings accept.
    """

    scheme: Literal["activation_and_weight", "float_qparams_weight_only"] = "activation_and_weight"
    backend: Backend = "x86"
    weight: Literal["per_channel", "per_tensor"] = "per_channel"
    symmetric: bool = True
    activation_dtype: Literal["quint8", "qint8"] = "quint8"
    reduce_range: bool | None = None
    fake_quant: Literal["fused", "standard"] = "fused"
    observer: Literal["moving_average_minmax", "minmax"] = "moving_average_minmax"


class RuleSet(_Model):
    """A named collection of rules, fusions, substitutions and qconfig presets.

    Precedence among rules that match one node: higher ``priority`` wins, then higher
    `Match.specificity`, then the rule that comes later (rules of an extended set come before the
    extending set's own rules). A node no rule matches stays fp32.
    """

    version: Literal[1] = 1
    name: str
    description: str | None = None
    extends: tuple[str, ...] = ()
    default_qconfig: str = "x86"
    presets: dict[str, QConfigPreset] = Field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    fusions: Union[Literal["torch"], tuple[Fusion, ...]] = ()
    substitutions: tuple[Substitution, ...] = ()

    _normalize = field_validator("extends", mode="before")(_as_tuple)

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Return the JSON Schema of rule files: what `load_rules` accepts, not only what it stores.

        List fields also take a single value, ``name`` may be left out (the file name is used), and
        ``$schema`` is allowed so editors can find the schema.
        """
        schema = super().model_json_schema(*args, **kwargs)
        for definition in [schema, *schema.get("$defs", {}).values()]:
            for name in _LIST_FIELDS:
                field = definition.get("properties", {}).get(name)
                if field is not None:
                    _accept_single_value(field)
        schema["properties"] = {"$schema": {"type": "string", "description": "Path or URL of this JSON Schema."},
                                **schema["properties"]}
        schema["required"] = [name for name in schema.get("required", []) if name != "name"]
        if not schema["required"]:
            del schema["required"]
        return schema

    def to_json(self, indent: int = 2) -> str:
        """Return the rule set as JSON.

        Raises:
            RuleError: a rule contains a Python ``where=`` predicate, which JSON cannot store.
        """
        with_code = [i for i, rule in enumerate(self.rules) if rule.match.where is not None]
        if with_code:
            raise RuleError(
                f"rule set {self.name!r} cannot be saved as JSON: rules[{with_code[0]}] has a Python where= predicate; "
                "express it with JSON match fields (fqn, fqn_regex, layers, within_type, ...) or keep this set in Python"
            )
        return self.model_dump_json(indent=indent, exclude_defaults=True)

    def save(self, path: str | Path) -> None:
        """Write the rule set to a JSON file that `load_rules` reads back; raises like `to_json`."""
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")


# Fields that `_as_tuple` widens from one value to a list, so the schema accepts both spellings.
_LIST_FIELDS = ("type", "fqn", "op", "within_type", "within_fqn", "rank", "extends")


def _accept_single_value(field: dict[str, Any]) -> None:
    """Widen a schema property that accepts an array so it also accepts one item of that array."""
    options = field.get("anyOf", [field])
    arrays = [option for option in options if option.get("type") == "array" and "items" in option]
    if not arrays:
        return
    single = arrays[0]["items"]
    if "anyOf" in field:
        field["anyOf"].append(single)
    else:
        items = {key: value for key, value in field.items() if key not in ("title", "description", "default")}
        field.clear()
        field.update({"anyOf": [items, single]})


BUILTIN_PRESETS: dict[str, QConfigPreset] = {
    "x86": QConfigPreset(backend="x86"),
    "fbgemm": QConfigPreset(backend="fbgemm"),
    "qnnpack": QConfigPreset(backend="qnnpack", weight="per_tensor"),
    "onednn": QConfigPreset(backend="onednn"),
    "x86_per_tensor": QConfigPreset(backend="x86", weight="per_tensor"),
    "float_qparams_weight_only": QConfigPreset(scheme="float_qparams_weight_only"),
}


def _builtin_dir() -> Path:
    """Return the folder of built-in rule files: inside an installed wheel, or ``rules/`` in a checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "builtin_rules", package.parent / "rules"):
        if candidate.is_dir() and any(candidate.glob("*.json")):
            return candidate
    raise RuleError(f"built-in rule files not found next to {package}; reinstall qat-planner")


def builtin_rule_sets() -> dict[str, Path]:
    """Return the built-in rule sets, name -> JSON file."""
    return {p.stem: p for p in sorted(_builtin_dir().glob("*.json"))}


def load_rules(name_or_path: str | Path | RuleSet) -> RuleSet:
    """Load one rule set by built-in name (``"default"``) or from a JSON file, without resolving ``extends``.

    Raises:
        RuleError: the file is missing, is not valid JSON, or does not match the schema. The message
            names the file, the JSON path of the bad value (``rules[3].match.type``), the value and what
            is accepted.
    """
    if isinstance(name_or_path, RuleSet):
        return name_or_path
    builtin = builtin_rule_sets()
    text_name = str(name_or_path)
    if text_name in builtin:
        path = builtin[text_name]
    else:
        path = Path(text_name)
        if not path.is_file():
            raise RuleError(
                f"rule set {text_name!r} not found: it is neither a built-in set ({', '.join(builtin)}) nor a JSON file"
            )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RuleError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except OSError as exc:
        raise RuleError(f"{path}: cannot read rule file: {exc.strerror}") from None
    if isinstance(data, dict):
        # Editors read "$schema" to find the JSON Schema; it is not part of the rule set itself.
        data = {key: value for key, value in data.items() if key != "$schema"}
        data.setdefault("name", path.stem)
    try:
        return RuleSet.model_validate(data)
    except ValidationError as exc:
        raise RuleError(_format_validation_error(path, exc)) from None


def _format_validation_error(path: Path, exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        location = _json_path(error["loc"])
        value = error.get("input")
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown key; accepted keys: {_accepted_keys(error['loc'])}"
        elif error["type"] == "literal_error":
            message = f"invalid value; {message[0].lower()}{message[1:]}"
        lines.append(f"{path}: {location}: {message} (got {value!r})")
    return "\n".join(_dedupe(lines))


def _dedupe(lines: list[str]) -> list[str]:
    seen: list[str] = []
    for line in lines:
        if line not in seen:
            seen.append(line)
    return seen


def _json_path(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in ("tuple[Fusion, ...]", "literal['torch']"):
            continue
        else:
            text += f".{part}" if text else str(part)
    return text or "<root>"


def _accepted_keys(loc: tuple[Any, ...]) -> str:
    """Return the field names of the model that contains the unknown key at ``loc``."""
    model: Any = RuleSet
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            continue
        annotation = field.annotation
        for candidate in (Rule, Match, Fusion, Substitution, QConfigPreset):
            if candidate is annotation or candidate.__name__ in str(annotation):
                model = candidate
                break
    return ", ".join(name for name, field in model.model_fields.items() if not field.exclude)


@dataclass(frozen=True)
class RuleOrigin:
    """Rule location: the rule set's name, its file (``None`` for sets built in Python) and index."""

    ruleset: str
    file: str | None
    index: int

    def __str__(self) -> str:
        return f"{self.ruleset}:rules[{self.index}]"


@dataclass(frozen=True)
class ResolvedRules:
    """Rule sets after ``extends`` is applied: rules in precedence order of writing, with their origin."""

    name: str
    rules: tuple[tuple[Rule, RuleOrigin], ...]
    substitutions: tuple[Substitution, ...]
    fusions: tuple[tuple[str, ...], ...] | Literal["torch"]
    presets: dict[str, QConfigPreset]
    default_qconfig: str


def resolve_rules(rules: str | Path | RuleSet | list[str | Path | RuleSet]) -> ResolvedRules:
    """Load rule sets and merge their ``extends`` chains into one `ResolvedRules`.

    A list means the sets are applied in order, as if each later one extended the earlier ones.

    Raises:
        RuleError: a set cannot be loaded, ``extends`` names a missing set or forms a cycle, or a rule
            names a qconfig preset that is not defined.
    """
    items = rules if isinstance(rules, list) else [rules]
    if not items:
        raise RuleError("no rule set given; pass a built-in name such as 'default' or a JSON file")
    ordered: list[tuple[Rule, RuleOrigin]] = []
    substitutions: list[Substitution] = []
    presets = dict(BUILTIN_PRESETS)
    fusions: list[tuple[str, ...]] | Literal["torch"] = []
    names: list[str] = []
    default_qconfig = "x86"
    for item in items:
        for ruleset, file in _expand(item, stack=()):
            names.append(ruleset.name)
            ordered.extend((rule, RuleOrigin(ruleset.name, file, i)) for i, rule in enumerate(ruleset.rules))
            substitutions.extend(ruleset.substitutions)
            presets.update(ruleset.presets)
            if ruleset.fusions == "torch" or fusions == "torch":
                fusions = "torch"
            else:
                fusions.extend(f.types for f in ruleset.fusions)
            if "default_qconfig" in ruleset.model_fields_set:
                default_qconfig = ruleset.default_qconfig
    resolved = ResolvedRules(
        name="+".join(dict.fromkeys(names)),
        rules=tuple(ordered),
        substitutions=tuple(substitutions),
        fusions=fusions if fusions == "torch" else tuple(fusions),
        presets=presets,
        default_qconfig=default_qconfig,
    )
    _check_presets(resolved)
    return resolved


def flatten_rules(resolved: ResolvedRules) -> RuleSet:
    """Return one `RuleSet` equivalent to ``resolved``, with no ``extends`` (what `resolve_rules` read)."""
    builtin = set(BUILTIN_PRESETS)
    return RuleSet(
        name=resolved.name,
        default_qconfig=resolved.default_qconfig,
        presets={k: v for k, v in resolved.presets.items() if k not in builtin or v != BUILTIN_PRESETS[k]},
        rules=tuple(rule for rule, _ in resolved.rules),
        fusions=resolved.fusions if resolved.fusions == "torch" else tuple(Fusion(types=t) for t in resolved.fusions),
        substitutions=resolved.substitutions,
    )


def _expand(item: str | Path | RuleSet, stack: tuple[str, ...], base: Path | None = None) -> list[tuple[RuleSet, str | None]]:
    """Load ``item`` and, before it, every set it extends; ``base`` is the folder of the extending file."""
    if not isinstance(item, RuleSet):
        item = _locate(item, base, stack)
    ruleset = load_rules(item)
    file = None if isinstance(item, RuleSet) else str(_rule_file(item))
    if ruleset.name in stack:
        raise RuleError(f"rule set {ruleset.name!r} extends itself: {' -> '.join((*stack, ruleset.name))}")
    chain: list[tuple[RuleSet, str | None]] = []
    folder = Path(file).parent if file else None
    for parent in ruleset.extends:
        chain.extend(_expand(parent, (*stack, ruleset.name), folder))
    chain.append((ruleset, file))
    return chain


def _locate(name: str | Path, base: Path | None, stack: tuple[str, ...]) -> str | Path:
    """Find a set named in ``extends``: a built-in name, a path, or a path relative to the extending file."""
    text = str(name)
    base = base.resolve() if base is not None else None
    if text in builtin_rule_sets() or Path(text).is_file() or base is None:
        return name
    for candidate in (base / text, base / f"{text}.json"):
        if candidate.is_file():
            return candidate
    raise RuleError(
        f"rule set {text!r}, extended by {stack[-1]!r}, not found: it is neither a built-in set "
        f"({', '.join(builtin_rule_sets())}) nor a file in {base}"
    )


def _rule_file(name_or_path: str | Path) -> Path:
    return builtin_rule_sets().get(str(name_or_path), Path(name_or_path).resolve())


def _check_presets(resolved: ResolvedRules) -> None:
    known = sorted(resolved.presets)
    if resolved.default_qconfig not in resolved.presets:
        raise RuleError(f"rule set {resolved.name!r}: default_qconfig {resolved.default_qconfig!r} is not a preset; accepted: {known}")
    for rule, origin in resolved.rules:
        if rule.qconfig is not None and rule.qconfig not in resolved.presets:
            where = origin.file or origin.ruleset
            raise RuleError(f"{where}: rules[{origin.index}].qconfig: unknown preset {rule.qconfig!r}; accepted: {known}")
