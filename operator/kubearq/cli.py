"""The `kubearq` command line: operator, worker, crds, validate, demo."""

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
    "operator": "the operator arrives with its issue (leader election, scheduler, scrape requests)",
    "worker": "the worker arrives with its issue (ARQ runtime, scrape pipeline)",
    "demo": "the demo arrives in the next phase, with the Helm chart",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubearq", description="ARQ background jobs on Kubernetes, declaratively."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("operator", help="run the operator (one elected leader enqueues)")
    commands.add_parser("worker", help="run an ARQ worker with the built-in and your own jobs")
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
    print(f"kubearq {args.command}: not built yet — {NOT_BUILT[args.command]}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
