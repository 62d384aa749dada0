"""What the CRD generator needs to know about a resource kind besides its spec and status models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ValidationError

GROUP = "kubearq.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "kubearq"


@dataclass(frozen=True)
class PrinterColumn:
    """One `kubectl get` column."""

    name: str
    type: str
    json_path: str
    description: str
    format: str | None = None
    priority: int = 0


@dataclass(frozen=True)
class ResourceKind:
    """A custom resource: names, scope, models and printer columns."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    description: str
    spec_model: type[BaseModel]
    status_model: type[BaseModel]
    printer_columns: tuple[PrinterColumn, ...] = field(default=())
    scope: Literal["Namespaced", "Cluster"] = "Namespaced"

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


def describe_validation_error(error: ValidationError, prefix: str = "spec") -> str:
    """One line a user can act on: `spec.timeZone: 'Mars/Base' is not an IANA time zone; ...`.

    Locations use the wire (camelCase) names; pydantic's "Value error, " prefix is dropped.
    """
    lines = []
    for item in error.errors():
        location = ".".join([prefix, *(f"[{part}]" if isinstance(part, int) else str(part) for part in item["loc"])])
        location = location.replace(".[", "[")
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{location}: {message}")
    return "; ".join(lines)
