"""What is wrong with a SyncSchedule or ScrapeRequest, in words that say what to fix: the one check that
`kubearq validate` runs on files and the operator runs on stored objects.

As strict as the API server with `--validate=strict` (kubectl's default): unknown fields are errors, with a
"did you mean" where a known field is close; every problem of a document at once, each echoing the bad value.
"""

from __future__ import annotations

import difflib
import functools
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from kubearq.operator.crds import RESOURCES, custom_resource_definition
from kubearq.operator.resources import API_VERSION, GROUP, ResourceKind

M = TypeVar("M", bound=BaseModel)
KINDS: dict[str, ResourceKind] = {resource.kind: resource for resource in RESOURCES}
TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec", "status")
METADATA = ("name", "namespace", "labels", "annotations", "generateName", "finalizers", "ownerReferences", "uid",
            "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
            "managedFields", "selfLink")
# metadata.name of a custom resource: a DNS subdomain (RFC 1123), as the API server checks it.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_TYPE_NAMES = {"string_type": "a string", "int_type": "an integer", "int_parsing": "an integer",
               "int_from_float": "a whole number", "float_type": "a number", "float_parsing": "a number",
               "bool_type": "true or false", "bool_parsing": "true or false", "list_type": "a list",
               "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping"}


@dataclass(frozen=True)
class Problem:
    """One thing to fix: where (`spec.job.function`; empty for the document as a whole) and what."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidSpecError(ValueError):
    """A spec the operator cannot act on; its text is every problem, `; `-separated."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("; ".join(str(problem) for problem in problems))
        self.problems = list(problems)


def parse_spec(resource: ResourceKind, model: type[M], spec: object) -> M:
    """The spec as its model, or InvalidSpecError with every problem (unknown fields included)."""
    problems = list(unknown_fields(resource, spec, "spec"))
    try:
        parsed = model.model_validate(spec)
    except ValidationError as error:
        problems += [_problem(item, resource) for item in error.errors()]
        raise InvalidSpecError(problems) from None
    if problems:
        raise InvalidSpecError(problems)
    return parsed


def document_problems(document: object) -> tuple[ResourceKind | None, list[Problem]]:
    """The kubearq resource a manifest document is (None: not one of ours) and what is wrong with it."""
    if not isinstance(document, Mapping):
        return None, [Problem("", f"not a mapping but {type(document).__name__}: a manifest is a YAML mapping "
                                  "with apiVersion, kind, metadata and spec")]
    kind, api_version = document.get("kind"), document.get("apiVersion")
    resource = KINDS.get(kind) if isinstance(kind, str) else None
    ours = isinstance(api_version, str) and api_version.split("/")[0] == GROUP
    if resource is None:
        if not ours:
            return None, []  # another kind of object (a ConfigMap beside a ScrapeRequest): not ours to check
        return None, [Problem("kind", f"{kind!r} is not a kind kubearq serves{_did_you_mean(kind, list(KINDS))} "
                                      f"({', '.join(KINDS)})")]
    problems = []
    if api_version != API_VERSION:
        shown = "missing" if api_version is None else f"{api_version!r} is not served"
        problems.append(Problem("apiVersion", f"{shown}; {resource.kind} is served as {API_VERSION}"))
    problems += [Problem(name, f"unknown field{_did_you_mean(name, TOP_LEVEL)}")
                 for name in document if name not in TOP_LEVEL]
    problems += _metadata_problems(document.get("metadata"))
    if "spec" not in document:
        problems.append(Problem("spec", f"required — what the {resource.kind} should do"))
    else:
        try:
            parse_spec(resource, resource.spec_model, document["spec"])
        except InvalidSpecError as error:
            problems += error.problems
    return resource, problems


def unknown_fields(resource: ResourceKind, value: object, path: str) -> Iterator[Problem]:
    """Fields the resource's schema does not know, as the API server with strict field validation refuses."""
    yield from _unknown(_spec_schema(resource.kind), value, path)


@functools.cache
def _spec_schema(kind: str) -> Mapping[str, Any]:
    crd = custom_resource_definition(KINDS[kind])
    version = cast(list[dict[str, Any]], cast(dict[str, Any], crd["spec"])["versions"])[0]
    return cast(Mapping[str, Any], version["schema"]["openAPIV3Schema"]["properties"]["spec"])


def _unknown(schema: Mapping[str, Any], value: object, path: str) -> Iterator[Problem]:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, Mapping):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            where = f"{path}.{key}"
            if key in properties:
                yield from _unknown(properties[key], item, where)
            elif isinstance(extra, dict):
                yield from _unknown(extra, item, where)
            elif extra is not True:
                yield Problem(where, f"unknown field{_did_you_mean(str(key), list(properties))}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from _unknown(schema["items"], item, f"{path}[{index}]")


def _metadata_problems(metadata: object) -> list[Problem]:
    if not isinstance(metadata, Mapping):
        return [Problem("metadata.name", "required — the resource's name (lower-case letters, digits, '-' and '.')")]
    problems = [Problem(f"metadata.{key}", f"unknown field{_did_you_mean(str(key), METADATA)}")
                for key in metadata if key not in METADATA]
    name = metadata.get("name")
    if name is None and not metadata.get("generateName"):
        problems.append(Problem("metadata.name", "required — the resource's name (lower-case letters, digits, "
                                                 "'-' and '.')"))
    elif name is not None and (not isinstance(name, str) or len(name) > 253 or not _NAME.fullmatch(name)):
        problems.append(Problem("metadata.name", f"{name!r} is not a valid name: lower-case letters, digits, '-' "
                                                 "and '.', starting and ending with a letter or digit, at most "
                                                 "253 characters"))
    return problems


def _did_you_mean(name: object, known: Sequence[str]) -> str:
    if not isinstance(name, str):
        return ""
    folded = {candidate.lower(): candidate for candidate in known}
    close = folded.get(name.lower()) or next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.6)), None)
    return f"; did you mean `{close}`?" if close else ""


def _location(prefix: str, loc: tuple[int | str, ...]) -> str:
    location = prefix
    for part in loc:
        location += f"[{part}]" if isinstance(part, int) else f".{part}"
    return location


def _problem(error: ErrorDetails, resource: ResourceKind) -> Problem:
    """pydantic's error in the user's words, naming the bad value."""
    field = _location("spec", error["loc"])
    kind, context, value = error["type"], error.get("ctx") or {}, error.get("input")
    match kind:
        case "missing":
            return Problem(field, f"required — {_meaning(resource, error['loc'])}")
        case "enum" | "literal_error":
            options = re.findall(r"'([^']*)'", str(context.get("expected", "")))
            return Problem(field, f"{value!r} is not one of {', '.join(options)}")
        case "greater_than_equal":
            return Problem(field, f"{value!r} is less than the minimum, {context['ge']}")
        case "greater_than":
            return Problem(field, f"{value!r} must be greater than {context['gt']}")
        case "less_than_equal":
            return Problem(field, f"{value!r} is more than the maximum, {context['le']}")
        case "less_than":
            return Problem(field, f"{value!r} must be less than {context['lt']}")
        case "string_too_long":
            return Problem(field, f"{_short(value)} is longer than {context['max_length']} characters")
        case "string_too_short":
            return Problem(field, f"{value!r} is shorter than {context['min_length']} character(s)")
        case "too_long":
            return Problem(field, f"{context.get('actual_length')} items, at most {context['max_length']} allowed")
        case "too_short":
            return Problem(field, f"{context.get('actual_length')} items, at least {context['min_length']} needed")
        case "string_pattern_mismatch":
            return Problem(field, f"{_short(value)} does not match {context['pattern']}")
        case "value_error" | "assertion_error":
            return Problem(field, error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, "))
    if kind in _TYPE_NAMES:
        return Problem(field, f"{_short(value)} is not {_TYPE_NAMES[kind]}")
    return Problem(field, f"{_short(value)}: {error['msg']}")


def _short(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else f"{shown[:77]}..."


def _meaning(resource: ResourceKind, loc: tuple[int | str, ...]) -> str:
    """A required field's description, from the schema the models generate."""
    node: Mapping[str, Any] | None = _spec_schema(resource.kind)
    for part in loc:
        if node is None:
            break
        node = node.get("items") if isinstance(part, int) else (node.get("properties") or {}).get(part)
    if node is None or not node.get("description"):
        return "this field must be set"
    text = str(node["description"]).rstrip(".")
    return text[:1].lower() + text[1:]


# --- Files -----------------------------------------------------------------------------------------------


@dataclass
class CheckedDocument:
    """One SyncSchedule or ScrapeRequest found in a file, and its problems."""

    file: str
    index: int  # 1-based, in its file
    kind: str
    name: str | None
    problems: list[Problem]

    @property
    def label(self) -> str:
        return f"{self.kind.lower()}/{self.name}" if self.name else f"{self.kind.lower()} (document {self.index})"


@dataclass
class Report:
    documents: list[CheckedDocument]
    skipped: list[str]  # other objects in the files, `ConfigMap/pages`
    file_errors: list[str]  # a file that is empty, not YAML, or holds nothing of ours
    missing: list[str]  # paths that do not exist: a usage error

    @property
    def valid(self) -> bool:
        return not self.missing and not self.file_errors and all(not doc.problems for doc in self.documents)


def check_files(paths: Sequence[Path]) -> Report:
    """Every kubearq resource in the files (a folder: its *.yaml and *.yml files; `-`: standard input)."""
    report = Report([], [], [], [])
    for path in paths:
        if str(path) != "-" and not path.exists():
            report.missing.append(f"{path}: no such file or folder")
        elif path.is_dir():
            for file in sorted([*path.glob("*.yaml"), *path.glob("*.yml")]):
                _check_file(file, report, quiet_if_none=True)
        else:
            _check_file(path, report, quiet_if_none=False)
    return report


def _check_file(path: Path, report: Report, *, quiet_if_none: bool) -> None:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        report.file_errors.append(f"{path}: cannot be read: {error}")
        return
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        report.file_errors.append(f"{path}: not valid YAML{where}: {problem}")
        return
    if not documents:
        report.file_errors.append(f"{path}: no documents (the file is empty)")
        return
    found = 0
    for index, document in enumerate(documents, start=1):
        resource, problems = document_problems(document)
        if resource is None and not problems:
            report.skipped.append(_describe_other(document))
            continue
        found += 1
        metadata = document.get("metadata") if isinstance(document, Mapping) else None
        name = metadata.get("name") if isinstance(metadata, Mapping) else None
        kind = resource.kind if resource is not None else str(document.get("kind")) if isinstance(
            document, Mapping) else "document"
        report.documents.append(CheckedDocument(str(path), index, kind, name if isinstance(name, str) else None,
                                                problems))
    if not found and not quiet_if_none:
        report.file_errors.append(f"{path}: no SyncSchedule or ScrapeRequest in it ({API_VERSION})")


def _describe_other(document: object) -> str:
    if not isinstance(document, Mapping):
        return type(document).__name__
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    return f"{document.get('kind', '(no kind)')}/{name}" if name else str(document.get("kind", "(no kind)"))
