"""The `kubearq` command line: operator, worker, crds, validate, demo.

This module is the composition root of the one image: it alone may import both the operator and the
worker (the import contracts in pyproject.toml keep the two apart everywhere else).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from pydantic import ValidationError

from kubearq.operator.crds import RESOURCES, write_crds
from kubearq.operator.reference import update_readme
from kubearq.operator.resources import API_VERSION, describe_validation_error

NOT_BUILT = {
    "demo": "the demo arrives in the next phase, with the Helm chart",
}
# `kubearq worker` flags; each overrides the environment variable of the same name (upper case).
WORKER_FLAGS = ("settings", "queue", "max_jobs", "job_timeout", "keep_result", "max_tries", "redis_url",
                "database_url", "http_port", "shutdown_grace", "log_level")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubearq", description="ARQ background jobs on Kubernetes, declaratively.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "operator", help="run the operator (one elected leader enqueues)",
        description="Settings come from the environment: REDIS_URL, NAMESPACE, LEASE_NAME, LEASE_NAMESPACE, "
                    "POD_NAME, STATUS_INTERVAL, QUEUES, HTTP_PORT, LOG_LEVEL.")
    worker = commands.add_parser(
        "worker", help="run an ARQ worker with the built-in and your own jobs",
        description="Settings come from the environment (REDIS_URL, DATABASE_URL, QUEUE, MAX_JOBS, ...); "
                    "a flag overrides the variable of the same name.")
    for name in WORKER_FLAGS:
        flag = "--" + name.replace("_", "-")
        helptext = "import path of your ARQ WorkerSettings, module:Class" if name == "settings" else f"${name.upper()}"
        worker.add_argument(flag, dest=name, metavar=name.upper(), help=helptext)
    crds = commands.add_parser("crds", help="write the CustomResourceDefinitions generated from the models")
    crds.add_argument("--output", type=Path, default=Path("crds"), help="directory to write into (default: crds)")
    crds.add_argument("--readme", type=Path, help="also rewrite the resource reference in this README")
    validate = commands.add_parser("validate", help="check SyncSchedule/ScrapeRequest manifests offline")
    validate.add_argument("files", nargs="+", type=Path, help="YAML files, several documents each allowed")
    commands.add_parser("demo", help="run the demo")
    return parser


def validate_manifests(paths: Sequence[Path]) -> list[str]:
    """Check every kubearq resource in the files with the same models the operator uses."""
    kinds = {resource.kind: resource for resource in RESOURCES}
    problems = []
    for path in paths:
        for index, document in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if not isinstance(document, dict) or document.get("apiVersion") != API_VERSION:
                continue
            resource = kinds.get(str(document.get("kind")))
            name = (document.get("metadata") or {}).get("name", f"document {index}")
            if resource is None:
                problems.append(f"{path}: {name}: unknown kind {document.get('kind')!r}")
                continue
            try:
                resource.spec_model.model_validate(document.get("spec"))
            except ValidationError as error:
                problems.append(f"{path}: {resource.kind} {name}: {describe_validation_error(error)}")
    return problems


def run_worker(args: argparse.Namespace) -> int:
    from kubearq.core.observability import configure_logging
    from kubearq.worker.builtins import builtin_jobs
    from kubearq.worker.main import run
    from kubearq.worker.settings import WorkerSettings

    overrides = {name: getattr(args, name) for name in WORKER_FLAGS if getattr(args, name) is not None}
    try:
        settings = WorkerSettings(**overrides)
    except ValidationError as error:
        print(f"kubearq worker: {WorkerSettings.describe_error(error)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        run(settings, builtin_jobs)
    except ValueError as error:  # a setting the user gave that turned out unusable at start
        print(f"kubearq worker: {error}", file=sys.stderr)
        return 2
    return 0


def run_operator() -> int:
    from kubearq.core.observability import configure_logging
    from kubearq.operator.main import KopfStoppedError, NoKubernetesCredentials, default_connection, run
    from kubearq.operator.settings import OperatorSettings

    try:
        settings = OperatorSettings()
        connection = default_connection()
    except ValidationError as error:
        print(f"kubearq operator: {describe_validation_error(error, prefix='settings')}", file=sys.stderr)
        return 2
    except NoKubernetesCredentials as error:
        print(f"kubearq operator: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        run(settings, connection)
    except KopfStoppedError:
        return 1  # logged already; a restart watches afresh
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "crds":
        for path in write_crds(args.output):
            print(path)
        if args.readme:
            args.readme.write_text(update_readme(args.readme.read_text(encoding="utf-8")), encoding="utf-8")
            print(args.readme)
        return 0
    if args.command == "validate":
        problems = validate_manifests(args.files)
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    if args.command == "worker":
        return run_worker(args)
    if args.command == "operator":
        return run_operator()
    print(f"kubearq {args.command}: not built yet — {NOT_BUILT[args.command]}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
