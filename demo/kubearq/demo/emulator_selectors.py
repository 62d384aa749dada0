"""Which objects a list or watch sees: label and field selectors, parsed and matched as kube-apiserver does."""

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import attrs
import kmock

JsonDict = dict[str, Any]
EventType = Literal['ADDED', 'MODIFIED', 'DELETED']


@attrs.frozen
class Change:
    """One write, as watchers see it: the object carries the write's resourceVersion."""

    revision: int
    resource: kmock.resource
    type: EventType
    object: JsonDict
    previous: JsonDict | None  # before the write; a label selector may stop or start matching


def bad_request(message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(400, 'BadRequest', message)


@dataclasses.dataclass(frozen=True)
class LabelRequirement:
    key: str
    operator: str  # exists, !, =, !=, in, notin
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        match self.operator:
            case 'exists':
                return value is not None
            case '!':
                return value is None
            case '=' | 'in':
                return value in self.values
            case _:  # != and notin
                return value not in self.values


_LABEL_REQUIREMENT = re.compile(r'''\s*(?:
    !\s*(?P<absent>[\w./-]+)
  | (?P<key>[\w./-]+)(?:
        \s*(?P<op>==|=|!=)\s*(?P<value>[\w.-]*)
      | \s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\)
    )?
)\s*''', re.VERBOSE)
_FIELD_REQUIREMENT = re.compile(r'\s*(?P<field>[\w.]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^,]*?)\s*')


@dataclasses.dataclass(frozen=True)
class Selector:
    """Which objects a list or watch request sees: namespace, name, labelSelector, fieldSelector."""

    namespace: str | None = None
    labels: tuple[LabelRequirement, ...] = ()
    fields: tuple[tuple[str, str, bool], ...] = ()  # (field, value, equal)

    @classmethod
    def parse(cls, request: kmock.Request) -> 'Selector':
        labels = tuple(_parse_label_requirement(text)
                       for text in _split_outside_parentheses(request.params.get('labelSelector', '')))
        fields: list[tuple[str, str, bool]] = []
        for text in filter(None, request.params.get('fieldSelector', '').split(',')):
            match = _FIELD_REQUIREMENT.fullmatch(text)
            if match is None:
                raise bad_request(f'invalid selector: {text!r}')
            if match['field'] not in ('metadata.name', 'metadata.namespace'):
                raise bad_request(f'field label not supported: {match["field"]}')
            fields.append((match['field'], match['value'], match['op'] != '!='))
        if request.name is not None:  # a watch on one object's URL
            fields.append(('metadata.name', request.name, True))
        return cls(namespace=request.namespace, labels=labels, fields=tuple(fields))

    def matches(self, obj: Mapping[str, Any]) -> bool:
        metadata = obj.get('metadata') or {}
        if self.namespace is not None and metadata.get('namespace') != self.namespace:
            return False
        labels = metadata.get('labels') or {}
        return (all(requirement.matches(labels) for requirement in self.labels)
                and all((metadata.get(field.removeprefix('metadata.'), '') == value) == equal
                        for field, value, equal in self.fields))

    def translate(self, change: Change, resource: kmock.resource) -> JsonDict | None:
        """The event a watcher with this selector gets for a change, if any (selectors are evaluated
        on the old and new object: an object that stops matching is DELETED for this watcher)."""
        if change.resource != resource:
            return None
        now = self.matches(change.object)
        before = change.previous is not None and self.matches(change.previous)
        event_type: str | None = change.type if now else None
        if change.type == 'MODIFIED':
            event_type = 'MODIFIED' if now and before else 'ADDED' if now else 'DELETED' if before else None
        return None if event_type is None else {'type': event_type, 'object': change.object}


def _split_outside_parentheses(text: str) -> Iterator[str]:
    depth, start = 0, 0
    for index, char in enumerate(text + ','):
        depth += {'(': 1, ')': -1}.get(char, 0)
        if char == ',' and depth == 0:
            if text[start:index].strip():
                yield text[start:index]
            start = index + 1


def _parse_label_requirement(text: str) -> LabelRequirement:
    match = _LABEL_REQUIREMENT.fullmatch(text)
    if match is None:
        raise bad_request(f'unable to parse requirement: {text!r}')
    if match['absent']:
        return LabelRequirement(match['absent'], '!')
    if match['op']:
        operator = '!=' if match['op'] == '!=' else '='
        return LabelRequirement(match['key'], operator, frozenset([match['value']]))
    if match['setop']:
        values = frozenset(value.strip() for value in match['values'].split(','))
        return LabelRequirement(match['key'], match['setop'], values)
    return LabelRequirement(match['key'], 'exists')


