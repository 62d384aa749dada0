"""What kube-apiserver does with a custom object's schema that the emulator needs: server-side defaulting and
the CRD's CEL rules (`x-kubernetes-validations`), evaluated with cel-python."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from typing import cast

import celpy
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

JsonObject = dict[str, object]


def walk(node: JsonObject, path: str = "") -> Iterator[tuple[str, JsonObject]]:
    """Every schema node with its path (`.spec.urls[]`, `.spec.job.kwargs{}`)."""
    yield path, node
    for name, sub in cast(JsonObject, node.get("properties", {})).items():
        yield from walk(cast(JsonObject, sub), f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(cast(JsonObject, node["items"]), f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(cast(JsonObject, node["additionalProperties"]), f"{path}{{}}")


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


def node_at(value: object, path: str) -> list[object]:
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
            if old is None or not node_at(old, path):
                continue
        values = node_at(obj, path)
        if ratchet and old is not None and "[]" not in path and values == node_at(old, path):
            continue
        for value in values:
            activation = {"self": json_to_cel(cast(dict[str, object], value))}
            if transition:
                assert old is not None
                activation["oldSelf"] = json_to_cel(cast(dict[str, object], node_at(old, path)[0]))
            outcome = program.evaluate(activation)
            if isinstance(outcome, CELEvalError):
                raise AssertionError(f"rule {rule!r} at {path} does not evaluate on {value!r}: {outcome}")
            if not bool(outcome):
                violations.append((path.lstrip("."), message))
    return violations


def cel_failures(schema: JsonObject, obj: JsonObject, old: JsonObject | None = None) -> list[str]:
    """Messages of the CEL rules the (defaulted) object breaks, as `path: message` (see `cel_violations`)."""
    return [f"{path}: {message}" for path, message in cel_violations(schema, obj, old)]
