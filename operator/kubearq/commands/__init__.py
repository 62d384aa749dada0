"""The `kubearq` subcommands that operate a running installation: schedules, scrapes, queues, failed jobs.

Each module here is one subcommand group and has `register(commands)`, which adds its parser to the `kubearq`
command line and sets `handler` (a function of the parsed arguments returning the exit code) on it; `kubearq.cli`
finds the modules by listing this package, so a new group is a new module and nothing else.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable
from typing import Protocol, TypeAlias, cast

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # what `add_subparsers()` returns
Handler: TypeAlias = Callable[[argparse.Namespace], int]


class CommandGroup(Protocol):
    def register(self, commands: Subcommands) -> None: ...  # pragma: no cover - a protocol


def groups() -> list[CommandGroup]:
    """Every subcommand group module of this package, by name."""
    found = sorted(module.name for module in pkgutil.iter_modules(__path__) if not module.name.startswith("_"))
    return [cast(CommandGroup, importlib.import_module(f"{__name__}.{name}")) for name in found]
