"""What a real kube-apiserver enforces on CRDs and custom objects, checked here without one.

`kubernetes-validate` accepts non-structural schemas and unbounded CEL inputs, so these checks are
written out: structure (every node typed, no $ref, no typed anyOf, no `type: null`) and bounds on every
string, array and map (the CEL cost budget); defaulting and the CEL rules are the emulator's own
(`kubearq.demo.crdrules`), checked against a real server by the emulator's contract tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import cast

import jsonschema
import yaml

from kubearq.demo.crdrules import apply_defaults, cel_failures, node_at, walk

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
            for items in node_at(defaulted, path):
                if isinstance(items, list) and len({yaml.safe_dump(item) for item in items}) < len(items):
                    problems.append(f"{path.lstrip('.')}: Duplicate value")
    return problems or cel_failures(schema, defaulted, old_defaulted)
