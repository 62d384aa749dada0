"""What kube-apiserver does with a custom object before it stores it, per the CRD's structural schema:
unknown fields found (refused under `fieldValidation=Strict`, else pruned with a warning), nulls of
non-nullable fields dropped, defaults applied, then OpenAPI validation and, unless that found a blocking
error, the CEL rules (`kubearq.demo.crdrules` evaluates them). Messages are the server's, as v1.36 words them
(k8s.io/apiextensions-apiserver and kube-openapi's validate); it lists causes in Go map order, random,
so the order here is the schema's and the contract tests compare causes as sets.
"""

import datetime
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any, cast

import attrs

from kubearq.demo.crdrules import apply_defaults, cel_rules, cel_violations

JsonDict = dict[str, Any]

# apiextensions-apiserver's hasBlockingErr(): after these, CEL rules are not run.
BLOCKING = frozenset({'FieldValueNotSupported', 'FieldValueRequired', 'FieldValueTooLong', 'FieldValueTooMany',
                      'FieldValueTypeInvalid'})
NOT_CHECKED = ('Invalid value: null: some validation rules were not checked because the object was invalid; '
               'correct the existing errors to complete validation')
OBJECT_META_FIELDS = frozenset({
    'name', 'generateName', 'namespace', 'selfLink', 'uid', 'resourceVersion', 'generation', 'creationTimestamp',
    'deletionTimestamp', 'deletionGracePeriodSeconds', 'labels', 'annotations', 'ownerReferences', 'finalizers',
    'managedFields'})
_RFC3339 = re.compile(r'\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})')


@attrs.frozen
class Cause:
    """One problem, as a `Status` cause: reason, message, field."""

    reason: str
    message: str
    field: str

    def as_json(self) -> JsonDict:
        return {'reason': self.reason, 'message': self.message, 'field': self.field}

    def __str__(self) -> str:
        return f'{self.field}: {self.message}'


@attrs.frozen
class CustomResourceSchema:
    """One served version's `openAPIV3Schema`, with what the server does with it."""

    schema: JsonDict

    @property
    def has_rules(self) -> bool:
        return bool(cel_rules(self.schema))

    def unknown_fields(self, obj: Mapping[str, Any]) -> list[str]:
        """Paths of the fields the schema does not know: metadata's first, then the rest in path order."""
        metadata = obj.get('metadata')
        in_metadata = ([f'metadata.{key}' for key in metadata if key not in OBJECT_META_FIELDS]
                       if isinstance(metadata, dict) else [])
        rest = sorted(path for path in _unknown(self.schema, obj, '') if not path.startswith('metadata.'))
        return in_metadata + rest

    def admit(self, obj: JsonDict) -> JsonDict:
        """The object as it would be stored: unknown fields pruned, null values dropped, defaults applied."""
        pruned = cast(JsonDict, _pruned(self.schema, obj, root=True))
        return cast(JsonDict, apply_defaults(self.schema, pruned))

    def problems(self, obj: JsonDict, old: JsonDict | None = None) -> list[Cause]:
        """What the server refuses in `obj` (already admitted), an update of `old` if given."""
        causes = list(_validate(self.schema, obj, '', leaf=''))
        if any(cause.reason in BLOCKING for cause in causes):
            return [*causes, Cause('FieldValueInvalid', NOT_CHECKED, '<nil>')] if self.has_rules else causes
        causes += [Cause('FieldValueInvalid', f'Invalid value: {message}', path)
                   for path, message in cel_violations(self.schema, obj, old, ratchet=True)]
        return causes


def invalid_message(kind: str, name: str, causes: list[Cause]) -> str:
    """The 422 message: `Kind.group "name" is invalid: a: x` or `…: [a: x, b: y]` for several causes."""
    listed = str(causes[0]) if len(causes) == 1 else f'[{", ".join(str(cause) for cause in causes)}]'
    return f'{kind} "{name}" is invalid: {listed}'


def go_value(value: object) -> str:
    """A value as field.Invalid prints it: strings quoted, numbers and booleans bare, objects as JSON."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if value is None:
        return 'null'
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, separators=(',', ':'))


def _json_type(value: object) -> str:
    match value:
        case bool():
            return 'boolean'
        case int():
            return 'integer'
        case float():
            return 'integer' if value.is_integer() else 'number'
        case str():
            return 'string'
        case list():
            return 'array'
        case dict():
            return 'object'
    return 'null'


def _unknown(schema: Mapping[str, Any], value: object, path: str) -> Iterator[str]:
    if schema.get('x-kubernetes-preserve-unknown-fields'):
        return
    if isinstance(value, dict):
        properties = schema.get('properties') or {}
        extra = schema.get('additionalProperties')
        for key, item in value.items():
            where = f'{path}.{key}' if path else key
            if not path and key in ('apiVersion', 'kind', 'metadata'):
                continue  # the object's type and ObjectMeta, decoded apart from the schema
            if key in properties:
                yield from _unknown(properties[key], item, where)
            elif isinstance(extra, dict):
                yield from _unknown(extra, item, where)
            elif extra is not True:
                yield where
    elif isinstance(value, list) and isinstance(schema.get('items'), dict):
        for index, item in enumerate(value):
            yield from _unknown(schema['items'], item, f'{path}[{index}]')


def _pruned(schema: Mapping[str, Any], value: object, *, root: bool = False) -> object:
    if schema.get('x-kubernetes-preserve-unknown-fields'):
        return value
    if isinstance(value, dict):
        properties = schema.get('properties') or {}
        extra = schema.get('additionalProperties')
        result: JsonDict = {}
        for key, item in value.items():
            sub = properties.get(key, extra if isinstance(extra, dict) else None)
            if root and key in ('apiVersion', 'kind', 'metadata'):
                result[key] = item
            elif sub is not None:
                if item is None and not sub.get('nullable'):
                    continue  # "null values for fields that are not nullable are pruned before defaulting"
                result[key] = _pruned(sub, item)
            elif extra is True:
                result[key] = item
        return result
    if isinstance(value, list) and isinstance(schema.get('items'), dict):
        return [_pruned(schema['items'], item) for item in value]
    return value


def _validate(schema: Mapping[str, Any], value: object, path: str, leaf: str) -> Iterator[Cause]:
    """kube-openapi's checks, in the order of the schema's keywords (the server's order is random)."""
    field = path or '<nil>'
    if value is None and schema.get('nullable'):
        return
    expected = schema.get('type')
    actual = _json_type(value)
    if expected and actual != expected and not (expected == 'number' and actual == 'integer'):
        yield Cause('FieldValueTypeInvalid',
                    f'Invalid value: "{actual}": {path} in body must be of type {expected}: "{actual}"', field)
        if expected == 'integer' and actual == 'number':
            yield Cause('FieldValueInvalid', f'Invalid value: "": Checked value must be of type integer '
                                             f'(default format) in {path}', '<nil>')
        return
    if 'enum' in schema and value not in schema['enum']:
        supported = ', '.join(go_value(option) for option in schema['enum'])
        yield Cause('FieldValueNotSupported', f'Unsupported value: {go_value(value)}: supported values: {supported}',
                    field)
    if isinstance(value, str):
        yield from _validate_string(schema, value, path, leaf)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if 'minimum' in schema and value < schema['minimum']:
            yield Cause('FieldValueInvalid', f'Invalid value: {go_value(value)}: {path} in body should be greater '
                                             f'than or equal to {schema["minimum"]}', field)
        if 'maximum' in schema and value > schema['maximum']:
            yield Cause('FieldValueInvalid', f'Invalid value: {go_value(value)}: {path} in body should be less '
                                             f'than or equal to {schema["maximum"]}', field)
    elif isinstance(value, list):
        yield from _validate_list(schema, value, path)
    elif isinstance(value, dict):
        yield from _validate_object(schema, value, path)


def _validate_string(schema: Mapping[str, Any], value: str, path: str, leaf: str) -> Iterator[Cause]:
    field = path or '<nil>'
    if 'minLength' in schema and len(value) < schema['minLength']:
        yield Cause('FieldValueInvalid', f'Invalid value: {go_value(value)}: {path} in body should be at least '
                                         f'{schema["minLength"]} chars long', field)
    if 'maxLength' in schema and len(value.encode()) > schema['maxLength']:
        yield Cause('FieldValueTooLong', f'Too long: may not be more than {schema["maxLength"]} bytes', field)
    if 'pattern' in schema and not re.search(schema['pattern'], value):
        yield Cause('FieldValueInvalid', f"Invalid value: {go_value(value)}: {path} in body should match "
                                         f"'{schema['pattern']}'", field)
    if schema.get('format') == 'date-time' and not _is_date_time(value):
        yield Cause('FieldValueTypeInvalid', f'Invalid value: {go_value(value)}: {leaf} in body must be of type '
                                             f'date-time: {go_value(value)}', field)


def _validate_list(schema: Mapping[str, Any], value: list[Any], path: str) -> Iterator[Cause]:
    field = path or '<nil>'
    if 'minItems' in schema and len(value) < schema['minItems']:
        yield Cause('FieldValueInvalid', f'Invalid value: {len(value)}: {path} in body should have at least '
                                         f'{schema["minItems"]} items', field)
    if 'maxItems' in schema and len(value) > schema['maxItems']:
        yield Cause('FieldValueTooMany', f'Too many: {len(value)}: must have at most {schema["maxItems"]} items',
                    field)
    items = schema.get('items')
    if isinstance(items, dict):
        for index, item in enumerate(value):
            yield from _validate(items, item, f'{path}[{index}]', leaf=f'{path.rpartition(".")[2]}[{index}]')
    list_type = schema.get('x-kubernetes-list-type')
    seen: set[str] = set()
    for index, item in enumerate(value):
        if list_type == 'set':
            identity, shown = json.dumps(item, sort_keys=True), go_value(item)
        elif list_type == 'map' and isinstance(item, dict):
            keys = {key: item.get(key) for key in schema.get('x-kubernetes-list-map-keys', [])}
            identity = shown = json.dumps(keys, separators=(',', ':'))
        else:
            continue
        if identity in seen:
            yield Cause('FieldValueDuplicate', f'Duplicate value: {shown}', f'{path}[{index}]')
        seen.add(identity)


def _validate_object(schema: Mapping[str, Any], value: JsonDict, path: str) -> Iterator[Cause]:
    field = path or '<nil>'
    if 'maxProperties' in schema and len(value) > schema['maxProperties']:
        yield Cause('FieldValueTooMany', f'Too many: {len(value)}: must have at most {schema["maxProperties"]} '
                                         'items', field)
    properties = schema.get('properties') or {}
    for name, sub in properties.items():
        if name in value and name != 'metadata':
            yield from _validate(sub, value[name], f'{path}.{name}' if path else name, leaf=name)
    extra = schema.get('additionalProperties')
    if isinstance(extra, dict):
        for name, item in value.items():
            if name not in properties:
                yield from _validate(extra, item, f'{path}.{name}' if path else name, leaf=name)
    for name in schema.get('required') or []:
        if name not in value:
            yield Cause('FieldValueRequired', 'Required value', f'{path}.{name}' if path else name)


def _is_date_time(text: str) -> bool:
    if not _RFC3339.fullmatch(text):
        return False
    try:
        datetime.datetime.fromisoformat(text.replace('z', 'Z').replace('t', 'T'))
    except ValueError:
        return False
    return True
