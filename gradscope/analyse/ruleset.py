"""Rule files: read with ``yaml.safe_load``, validated in full on load, merged with user overrides.

A rule is data: an id, a severity, a scope (``layer`` or ``model``), a condition tree over metric names
from :mod:`gradscope.analyse.metrics`, an optional match on module kind or name, named ``params`` that the
condition's values may refer to, and a message template. Nothing in a rule file is evaluated as Python.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import yaml

from ..errors import RuleError
from .clipping import NONE, PER_STEP
from .metrics import condition_names, template_names

SEVERITIES = ("info", "warning", "error")
SCOPES = ("layer", "model")
OPERATORS = (">", ">=", "<", "<=", "==", "!=")
RULE_KEYS = {"id", "severity", "scope", "when", "message", "params", "match", "enabled", "description", "remedy"}
REMEDIES = (NONE,) + PER_STEP + ("skip",)  # the clipping methods (analyse/clipping.py); skip: the guard
REMEDY_ALIASES = {"clip": "norm"}  # older rule files: "clip" meant norm clipping
REQUIRED_KEYS = ("id", "severity", "scope", "when", "message")
MAX_FILE_BYTES = 1 << 20
MAX_NODES = 20_000  # expanded YAML nodes, aliases counted each time they are used: bounds billion-laughs files
MAX_DEPTH = 40
MAX_FORMAT_WIDTH = 40  # widths and precisions in message formats: a finding's line, not a page
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
TEMPLATE_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)(?::([^{}]*))?\}")


@dataclasses.dataclass(frozen=True)
class Compare:
    metric: str
    op: str
    value: float


@dataclasses.dataclass(frozen=True)
class AllOf:
    items: Tuple["Condition", ...]


@dataclasses.dataclass(frozen=True)
class AnyOf:
    items: Tuple["Condition", ...]


@dataclasses.dataclass(frozen=True)
class Not:
    item: "Condition"


Condition = Union[Compare, AllOf, AnyOf, Not]


@dataclasses.dataclass(frozen=True)
class Rule:
    id: str
    severity: str
    scope: str
    when: Condition
    message: str
    match_kind: Tuple[str, ...] = ()
    match_name: Tuple[str, ...] = ()
    params: Mapping[str, float] = dataclasses.field(default_factory=dict)
    description: str = ""
    remedy: str = "none"
    source: str = ""


@dataclasses.dataclass(frozen=True)
class RuleSet:
    rules: Tuple[Rule, ...]
    sources: Tuple[str, ...]

    def get(self, rule_id: str) -> Optional[Rule]:
        return next((r for r in self.rules if r.id == rule_id), None)


def condition_lines(condition: Condition, indent: str = "") -> List[str]:
    """A condition as indented lines a person reads: ``metric > value``, ``all of:``, ``any of:``, ``not:``."""
    if isinstance(condition, Compare):
        return [f"{indent}{condition.metric} {condition.op} {condition.value:g}"]
    if isinstance(condition, Not):
        return [f"{indent}not:", *condition_lines(condition.item, indent + "  ")]
    head = "all of:" if isinstance(condition, AllOf) else "any of:"
    return [f"{indent}{head}", *(line for item in condition.items for line in condition_lines(item, indent + "  "))]


def condition_metrics(condition: Condition) -> List[str]:
    if isinstance(condition, Compare):
        return [condition.metric]
    if isinstance(condition, Not):
        return condition_metrics(condition.item)
    return list(dict.fromkeys(m for item in condition.items for m in condition_metrics(item)))


def default_rules_text() -> str:
    return resources.files("gradscope.rules").joinpath("default.yaml").read_text(encoding="utf-8")


def load_rules(path: Optional[Union[str, Path]] = None) -> RuleSet:
    """The default rule set, extended or overridden by the user file at ``path`` if one is given."""
    if path is None:
        return _default_rule_set()
    entries = _parse(default_rules_text(), "rules/default.yaml", defaults=True)
    sources = ["rules/default.yaml"]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RuleError(f"rule file not found: {path}", "check the path of the rule file")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise RuleError(f"{path}: rule file is over {MAX_FILE_BYTES // 1024} KiB", "rule files are small YAML")
        user = _parse(path.read_text(encoding="utf-8", errors="replace"), str(path), defaults=False)
        entries = _merge(entries, user)
        sources.append(str(path))
    rules = tuple(_compile(e) for e in entries.values() if e["raw"].get("enabled", True))
    return RuleSet(rules=rules, sources=tuple(sources))


@functools.lru_cache(maxsize=1)
def _default_rule_set() -> RuleSet:
    """The bundled rules, parsed once per process (a RuleSet is immutable, so it is shared)."""
    entries = _parse(default_rules_text(), "rules/default.yaml", defaults=True)
    return RuleSet(rules=tuple(_compile(e) for e in entries.values() if e["raw"].get("enabled", True)),
                   sources=("rules/default.yaml",))


def parse_rules_text(text: str, filename: str = "<rules>") -> RuleSet:
    """Validate and compile one self-contained rule file (no defaults merged)."""
    entries = _parse(text, filename, defaults=True)
    return RuleSet(tuple(_compile(e) for e in entries.values() if e["raw"].get("enabled", True)), (filename,))


# -- reading ------------------------------------------------------------------------------------------
# libyaml's safe loader where PyYAML was built with it (the wheels are): the same documents, nodes and
# marks as the pure-Python SafeLoader, about ten times faster (the default rules took 0.1 s to read).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
def _parse(text: str, filename: str, *, defaults: bool) -> Dict[str, Dict[str, Any]]:
    """Parse and structurally validate a file; returns {id: {"raw": mapping, "where": "file:line"}}."""
    if len(text.encode("utf-8", errors="replace")) > MAX_FILE_BYTES:
        raise RuleError(f"{filename}: rule file is over {MAX_FILE_BYTES // 1024} KiB", "rule files are small YAML")
    try:
        node = yaml.compose(text, Loader=_LOADER)
        _check_size(node, filename)
        data = yaml.load(text, Loader=_LOADER)
    except RecursionError:  # the composer recurses once per level of [[[...]]]
        raise _too_deep(filename) from None
    except yaml.YAMLError as exc:
        if "nesting depth" in str(exc):  # libyaml's own limit on [[[...]]]
            raise _too_deep(filename) from None
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RuleError(f"{filename}{line}: not valid rule YAML: {problem}",
                        "rule files are plain YAML; tags such as !!python/object are refused") from None
    if data is None:
        data = {"rules": []}
    if not isinstance(data, dict):
        raise RuleError(f"{filename}: the top level must be a mapping with a 'rules' list", "see docs/rules.md")
    unknown = set(data) - {"version", "rules"}
    if unknown:
        raise RuleError(f"{filename}: unknown top-level key(s) {sorted(map(str, unknown))}", "allowed: version, rules")
    if data.get("version", 1) != 1:
        raise RuleError(f"{filename}: unsupported version {_shorten(repr(data.get('version')))}", "this gradscope reads version: 1")
    rules = data.get("rules") or []
    if not isinstance(rules, list):
        raise RuleError(f"{filename}: 'rules' must be a list", "write rules: followed by '- id: ...' items")
    lines = _item_lines(node)
    out: Dict[str, Dict[str, Any]] = {}
    for i, raw in enumerate(rules):
        where = f"{filename}:{lines[i]}" if i < len(lines) else filename
        if not isinstance(raw, dict):
            raise RuleError(f"{where}: each rule must be a mapping", "start each rule with '- id: ...'")
        rule_id = raw.get("id")
        if not isinstance(rule_id, str) or not ID_PATTERN.match(rule_id):
            raise RuleError(f"{where}: rule id {_shorten(repr(rule_id))} is missing or malformed",
                            "ids are lower-case words joined by '-', e.g. global-norm-growing")
        if rule_id in out:
            raise RuleError(f"{where}: rule {rule_id}: defined twice in this file", "keep one definition per id")
        unknown = set(raw) - RULE_KEYS
        if unknown:
            raise RuleError(f"{where}: rule {rule_id}: unknown key(s) {sorted(map(str, unknown))}",
                            f"allowed keys: {', '.join(sorted(RULE_KEYS))}")
        _check_types(raw, rule_id, where)
        out[rule_id] = {"raw": dict(raw), "where": where, "complete": defaults}
    return out


def _too_deep(filename: str) -> RuleError:
    return RuleError(f"{filename}: rule file is nested too deeply (over {MAX_DEPTH} levels)",
                     "a rule file is a list of flat rules; see docs/rules.md")


def _check_size(node: Optional[yaml.Node], filename: str) -> None:
    """Refuse documents whose alias-expanded size or depth is out of bounds (billion laughs)."""
    budget = [MAX_NODES]

    def walk(n: yaml.Node, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0 or depth > MAX_DEPTH:
            raise RuleError(f"{filename}: rule file is too large or too deeply nested once aliases are expanded",
                            "write rules out plainly; anchors and aliases may not multiply the document")
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                walk(k, depth + 1)
                walk(v, depth + 1)
        elif isinstance(n, yaml.SequenceNode):
            for v in n.value:
                walk(v, depth + 1)

    if node is not None:
        walk(node, 0)


def _item_lines(node: Optional[yaml.Node]) -> List[int]:
    """1-based line of each item of the top-level 'rules' list."""
    if not isinstance(node, yaml.MappingNode):
        return []
    for key, value in node.value:
        if getattr(key, "value", None) == "rules" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def _check_types(raw: Mapping[str, Any], rule_id: str, where: str) -> None:
    def fail(problem: str, hint: str) -> None:
        raise RuleError(f"{where}: rule {rule_id}: {problem}", hint)

    if "severity" in raw and raw["severity"] not in SEVERITIES:
        fail(f"unknown severity {_shorten(repr(raw['severity']))}", f"use one of {', '.join(SEVERITIES)}")
    if "scope" in raw and raw["scope"] not in SCOPES:
        fail(f"unknown scope {_shorten(repr(raw['scope']))}", "use layer or model")
    for key in ("message", "description"):
        if key in raw and not isinstance(raw[key], str):
            fail(f"'{key}' must be text", "quote it")
    if "remedy" in raw and raw["remedy"] not in REMEDIES and raw["remedy"] not in REMEDY_ALIASES:
        fail(f"unknown remedy {_shorten(repr(raw['remedy']))}",
             "use norm, value or agc (the clipping mode that addresses it), skip (the skip-step guard), or none")
    if "enabled" in raw and not isinstance(raw["enabled"], bool):
        fail("'enabled' must be true or false", "write enabled: false to turn a rule off")
    params = raw.get("params", {})
    if not isinstance(params, dict) or not all(
            isinstance(k, str) and _as_number(v) is not None for k, v in params.items()):
        fail("'params' must map names to numbers", "e.g. params: {limit: 1.0e3}")
    match = raw.get("match", {})
    if not isinstance(match, dict) or set(match) - {"kind", "name"}:
        fail("'match' takes only 'kind' and 'name'", "e.g. match: {kind: [LSTM, GRU]}")
    for key, value in match.items():
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, str) for v in items):
            fail(f"match.{key} must be text or a list of text", "e.g. match: {name: 'encoder.*'}")


def _as_number(value: Any) -> Optional[float]:
    """A number, or None. Text such as '1.0e3' counts: YAML 1.1 reads an exponent without a sign as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if isinstance(value, str) and not NUMBER.match(value.strip()):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer with hundreds of digits
        return None
    return number if math.isfinite(number) else None  # 1e999 reads as inf: no threshold means that


# -- merging and compiling ----------------------------------------------------------------------------
def _merge(base: Dict[str, Dict[str, Any]], user: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    merged = {k: {"raw": dict(v["raw"]), "where": v["where"], "complete": True} for k, v in base.items()}
    for rule_id, entry in user.items():
        raw = entry["raw"]
        if rule_id in merged:
            if "scope" in raw and raw["scope"] != merged[rule_id]["raw"]["scope"]:
                raise RuleError(f"{entry['where']}: rule {rule_id}: an override cannot change the scope",
                                "define a new rule with its own id instead")
            target = merged[rule_id]["raw"]
            for key, value in raw.items():
                target[key] = {**target.get("params", {}), **value} if key == "params" else value
            merged[rule_id]["where"] = entry["where"]
        else:
            merged[rule_id] = {"raw": dict(raw), "where": entry["where"], "complete": True}
    return merged


def _compile(entry: Mapping[str, Any]) -> Rule:
    raw, where = entry["raw"], entry["where"]
    rule_id = raw["id"]
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise RuleError(f"{where}: rule {rule_id}: missing {', '.join(missing)}",
                        "a new rule needs id, severity, scope, when and message")
    scope = raw["scope"]
    params = {k: _as_number(v) for k, v in raw.get("params", {}).items()}
    when = _condition(raw["when"], scope, params, rule_id, where, depth=0)
    _check_template(raw["message"], scope, rule_id, where, params)
    match = raw.get("match", {})
    if match and scope != "layer":
        raise RuleError(f"{where}: rule {rule_id}: 'match' applies to layer rules only", "remove it or use scope: layer")
    as_tuple = lambda v: tuple(v) if isinstance(v, list) else (v,)  # noqa: E731
    return Rule(
        id=rule_id, severity=raw["severity"], scope=scope, when=when, message=raw["message"].strip(),
        match_kind=as_tuple(match["kind"]) if "kind" in match else (),
        match_name=as_tuple(match["name"]) if "name" in match else (),
        params=MappingProxyType(params), description=str(raw.get("description", "")).strip(), remedy=_remedy(raw),
        source=where,
    )


def _remedy(raw: Mapping[str, Any]) -> str:
    remedy = raw.get("remedy", "none")
    return REMEDY_ALIASES.get(remedy, remedy)


def _condition(node: Any, scope: str, params: Mapping[str, float], rule_id: str, where: str, depth: int) -> Condition:
    def fail(problem: str, hint: str) -> None:
        raise RuleError(f"{where}: rule {rule_id}: {problem}", hint)

    if depth > MAX_DEPTH or not isinstance(node, dict) or len(node) == 0:
        fail("a condition must be a mapping: {metric, op, value}, or all/any/not", "see docs/rules.md")
    keys = set(node)
    if keys in ({"all"}, {"any"}):
        key = keys.pop()
        items = node[key]
        if not isinstance(items, list) or not items:
            fail(f"'{key}' takes a non-empty list of conditions", f"{key}: [{{metric: ..., op: ..., value: ...}}]")
        parts = tuple(_condition(i, scope, params, rule_id, where, depth + 1) for i in items)
        return AllOf(parts) if key == "all" else AnyOf(parts)
    if keys == {"not"}:
        return Not(_condition(node["not"], scope, params, rule_id, where, depth + 1))
    if keys != {"metric", "op", "value"}:
        fail(f"unknown condition keys {sorted(map(str, keys))}", "use {metric, op, value}, all, any or not")
    metric, op, value = node["metric"], node["op"], node["value"]
    allowed = condition_names(scope)
    if metric not in allowed:
        fail(f"unknown metric {_shorten(repr(metric))} for a {scope} rule", "`gradscope metrics` lists the metrics")
    if op not in OPERATORS:
        fail(f"unknown operator {_shorten(repr(op))}", f"use one of {' '.join(OPERATORS)}")
    number = params.get(value) if isinstance(value, str) and value in params else _as_number(value)
    if number is None:
        shown = _shorten(repr(value))
        if isinstance(value, (int, float)) and not isinstance(value, bool) or (
                isinstance(value, str) and NUMBER.match(value.strip())):
            fail(f"value {shown} is not a finite number a float can hold", "write a threshold such as 1.0e3")
        if isinstance(value, str):
            fail(f"value {shown} is neither a number nor an entry of params", "add it to params, or write a number")
        fail(f"value {shown} is not a number", "write a number, or the name of one of the rule's params")
    return Compare(metric=metric, op=op, value=number)


def _shorten(text: str, most: int = 40) -> str:
    return text if len(text) <= most else text[:most - 1] + "…"


def _check_template(message: str, scope: str, rule_id: str, where: str, params: Mapping[str, Any]) -> None:
    allowed = set(template_names(scope)) | set(params)
    for name, spec in TEMPLATE_FIELD.findall(message):
        if name not in allowed:
            raise RuleError(f"{where}: rule {rule_id}: message names unknown field {{{name}}}",
                            "messages may name the scope's metrics, its context fields and the rule's params")
        widths = [int(n) for n in re.findall(r"\d+", spec)]
        if any(n > MAX_FORMAT_WIDTH for n in widths):  # {x:>999999999} would expand one field to a gigabyte
            raise RuleError(f"{where}: rule {rule_id}: format {spec!r} in {{{name}:{spec}}} asks for over "
                            f"{MAX_FORMAT_WIDTH} characters", "use a number format such as .3g or .1%")
        try:
            format(1.0, spec)
        except ValueError:
            raise RuleError(f"{where}: rule {rule_id}: bad format {spec!r} in {{{name}:{spec}}}",
                            "use a number format such as .3g or .1%") from None
    stray = TEMPLATE_FIELD.sub("", message)
    if "{" in stray or "}" in stray:
        raise RuleError(f"{where}: rule {rule_id}: message has an unbalanced or malformed {{field}}",
                        "write fields as {metric} or {metric:.3g}")
