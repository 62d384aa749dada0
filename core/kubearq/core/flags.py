"""Command-line flags from a pydantic-settings model: one flag per setting, its help the setting's own docstring
with its environment variable and default, so `--help`, the environment and the README say the same."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings


@dataclass(frozen=True)
class Setting:
    """One setting as a user meets it."""

    name: str  # the model's field
    variable: str  # REDIS_URL
    flag: str  # --redis-url
    default: str  # as shown: `redis://localhost:6379/0`, or "unset"
    meaning: str
    secret: bool  # no flag: a command line is visible to every user of the host (ps, /proc)


def settings_of(model: type[BaseSettings]) -> Iterator[Setting]:
    for name, field in model.model_fields.items():
        secret = "Secret" in str(field.annotation) or field.repr is False
        yield Setting(name, name.upper(), "--" + name.replace("_", "-"), _shown_default(field),
                      " ".join((field.description or "").split()), secret)


def add_flags(parser: argparse.ArgumentParser, model: type[BaseSettings]) -> None:
    """A flag per setting (secrets excepted); each overrides the environment variable of the same name."""
    for setting in settings_of(model):
        if setting.secret:
            continue
        text = f"{setting.meaning} (${setting.variable}; default: {setting.default})".replace("%", "%%")
        parser.add_argument(setting.flag, dest=setting.name, metavar=setting.variable, help=text)


def flag_values(args: argparse.Namespace, model: type[BaseSettings]) -> dict[str, Any]:
    """The settings given as flags, by field name (the model validates them as it does the environment)."""
    return {setting.name: getattr(args, setting.name) for setting in settings_of(model)
            if getattr(args, setting.name, None) is not None}


def settings_table(models: Mapping[str, type[BaseSettings]]) -> str:
    """A Markdown table per role of every setting: variable, flag, default, meaning."""
    parts = []
    for role, model in models.items():
        rows = [f"`kubearq {role}`:", "", "| variable | flag | default | meaning |", "|---|---|---|---|"]
        for setting in settings_of(model):
            flag = "(environment only: a secret)" if setting.secret else f"`{setting.flag}`"
            meaning = setting.meaning.replace("|", "\\|")
            rows.append(f"| `{setting.variable}` | {flag} | {setting.default} | {meaning} |")
        parts.append("\n".join(rows))
    return "\n\n".join(parts) + "\n"


def _shown_default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined or field.default is None:
        return "unset"
    if isinstance(field.default, bool):
        return f"`{str(field.default).lower()}`"
    return f"`{field.default}`" if field.default != "" else "unset"
