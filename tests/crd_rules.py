"""What a real kube-apiserver enforces on CRDs and custom objects, checked here without one.

`kubernetes-validate` accepts non-structural schemas and unbounded CEL inputs, so these checks are
written out: structure (every node typed, no $ref, no typed anyOf, no `type: null`), bounds on every
string, array and map (the CEL cost budget), server-side defaulting, and CEL rule evaluation.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import cast

import celpy
import jsonschema
import yaml
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

JsonObject = dict[str, object]
REPO = Path(__file__).resolve().parent.parent
NOT_STRUCTURAL = ("$ref", "$defs", "definitions", "patternProperties", "propertyNames", "dependencies",
                  "additionalItems", "const", "$schema", "id", "title")
LOGIC = ("anyOf", "oneOf", "allOf", "not")


def load_crds(folder: Path = REPO / "crds") -> dict[str, JsonObject]:
    """CRDs by kind."""
    crds = {}
    for path in sorted(folder.glob("*.yaml")):
        crd = cast(JsonObject, yaml.safe_load(path.read_text(encoding="utf-8")))
        crds[cast(str, cast(JsonObject, cast(JsonObject, crd["spec"])["names"])["kind"])] = crd
    return crds


def version_of(crd: JsonObject) -> JsonObject:
    versions = cast(list[JsonObject], cast(JsonObject, crd["spec"])["versions"])
    assert len(versions) == 1
    return versions[0]


def schema_of(crd: JsonObject) -> JsonObject:
    return cast(JsonObject, cast(JsonObject, version_of(crd)["schema"])["openAPIV3Schema"])


def walk(node: JsonObject, path: str = "") -> Iterator[tuple[str, JsonObject]]:
    """Every schema node with its path (`.spec.urls[]`, `.spec.job.kwargs{}`)."""
    yield path, node
    for name, sub in cast(JsonObject, node.get("properties", {})).items():
        yield from walk(cast(JsonObject, sub), f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(cast(JsonObject, node["items"]), f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(cast(JsonObject, node["additionalProperties"]), f"{path}{{}}")


def structural_problems(schema: JsonObject) -> list[str]:
    problems = []
    for path, node in walk(schema):
        problems += [f"{path}: {key} is not allowed" for key in NOT_STRUCTURAL if key in node]
        kind = node.get("type")
        if kind is None and not node.get("x-kubernetes-preserve-unknown-fields"):
            problems.append(f"{path}: no type")
        if kind == "null":
            problems.append(f"{path}: type null")
        problems += [f"{path}: {key} is not allowed here" for key in LOGIC if key in node]
        if "default" in node and node["default"] is None:
            problems.append(f"{path}: null default")
        if "exclusiveMinimum" in node and not isinstance(node["exclusiveMinimum"], bool):
            problems.append(f"{path}: exclusiveMinimum must be a boolean in OpenAPI v3")
    return problems


def unbounded(schema: JsonObject) -> list[str]:
    """Strings without maxLength, arrays without maxItems, maps without maxProperties, in spec and status."""
    problems = []
    for path, node in walk(schema):
        if not path.startswith((".spec", ".status")):
            continue
        kind = node.get("type")
        if kind == "string" and "maxLength" not in node and "enum" not in node and node.get("format") != "date-time":
            problems.append(f"{path}: string without maxLength")
        if kind == "array" and "maxItems" not in node:
            problems.append(f"{path}: array without maxItems")
        is_map = "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields")
        if kind == "object" and is_map and "maxProperties" not in node:
            problems.append(f"{path}: map without maxProperties")
    return problems


def apply_defaults(node: JsonObject, value: object) -> object:
    """Server-side defaulting: absent properties with a default get it, recursively (before CEL runs)."""
    if isinstance(value, dict):
        result = dict(value)
        for name, sub in cast(JsonObject, node.get("properties", {})).items():
            sub_schema = cast(JsonObject, sub)
            if name not in result and "default" in sub_schema:
                result[name] = copy.deepcopy(sub_schema["default"])
            if name in result:
                result[name] = apply_defaults(sub_schema, result[name])
        return result
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [apply_defaults(cast(JsonObject, node["items"]), item) for item in value]
    return value


def _node_at(value: object, path: str) -> list[object]:
    """Values at a schema path such as `.spec.extract` or `.spec.urls[]` (lists fan out)."""
    values = [value]
    for part in [p for p in path.replace("[]", ".[]").split(".") if p]:
        next_values: list[object] = []
        for current in values:
            if part == "[]" and isinstance(current, list):
                next_values.extend(current)
            elif isinstance(current, dict) and part in current:
                next_values.append(current[part])
        values = next_values
    return values


def cel_rules(schema: JsonObject) -> list[tuple[str, str, str]]:
    """(schema path, rule, message) of every x-kubernetes-validations entry."""
    found = []
    for path, node in walk(schema):
        for rule in cast(list[JsonObject], node.get("x-kubernetes-validations", [])):
            found.append((path, cast(str, rule["rule"]), cast(str, rule["message"])))
    return found


def is_transition_rule(rule: str) -> bool:
    """A rule comparing with the stored object (`oldSelf`): the server checks it on updates only."""
    return "oldSelf" in rule


@functools.cache
def _program(rule: str) -> celpy.Runner:
    environment = celpy.Environment()
    return environment.program(environment.compile(rule))


def cel_violations(schema: JsonObject, obj: JsonObject, old: JsonObject | None = None, *,
                   ratchet: bool = False) -> list[tuple[str, str]]:
    """(schema path, message) of the CEL rules the (defaulted) object breaks.

    Transition rules run only with `old` (an update) and where the old object has the value too, as the
    server runs them; they are supported on object paths, not inside lists (no item correlation here).
    With `ratchet`, a rule whose value is unchanged from `old` is not run (the server's validation
    ratcheting: an unchanged value that breaks a rule does not fail an update).
    """
    violations = []
    for path, rule, message in cel_rules(schema):
        program = _program(rule)
        transition = is_transition_rule(rule)
        if transition:
            assert "[]" not in path, f"transition rule inside a list at {path}: correlate items first"
            if old is None or not _node_at(old, path):
                continue
        values = _node_at(obj, path)
        if ratchet and old is not None and "[]" not in path and values == _node_at(old, path):
            continue
        for value in values:
            activation = {"self": json_to_cel(cast(dict[str, object], value))}
            if transition:
                assert old is not None
                activation["oldSelf"] = json_to_cel(cast(dict[str, object], _node_at(old, path)[0]))
            outcome = program.evaluate(activation)
            if isinstance(outcome, CELEvalError):
                raise AssertionError(f"rule {rule!r} at {path} does not evaluate on {value!r}: {outcome}")
            if not bool(outcome):
                violations.append((path.lstrip("."), message))
    return violations


def cel_failures(schema: JsonObject, obj: JsonObject, old: JsonObject | None = None) -> list[str]:
    """Messages of the CEL rules the (defaulted) object breaks, as `path: message` (see `cel_violations`)."""
    return [f"{path}: {message}" for path, message in cel_violations(schema, obj, old)]


def server_problems(crd: JsonObject, obj: Mapping[str, object], old: Mapping[str, object] | None = None) -> list[str]:
    """What the API server would refuse in `obj` (an update of `old`, if given): OpenAPI validation after
    defaulting, then CEL."""
    schema = schema_of(crd)
    defaulted = cast(JsonObject, apply_defaults(schema, obj))
    old_defaulted = None if old is None else cast(JsonObject, apply_defaults(schema, old))
    validator = jsonschema.Draft4Validator(schema)
    problems = [
        f"{'.'.join(str(part) for part in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(defaulted)
    ]
    for path, node in walk(schema):
        if node.get("x-kubernetes-list-type") == "set":
            for items in _node_at(defaulted, path):
                if isinstance(items, list) and len({yaml.safe_dump(item) for item in items}) < len(items):
                    problems.append(f"{path.lstrip('.')}: Duplicate value")
    return problems or cel_failures(schema, defaulted, old_defaulted)
