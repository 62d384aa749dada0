"""The distribution's layout: a namespace package that does not shadow the standard library."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubearq.cli import main
from tests.crd_rules import REPO


def run_python(code: str, cwd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_stdlib_operator_still_imports_from_the_repo_root() -> None:
    result = run_python("import operator; print(operator.add(2, 3))", cwd=str(REPO))
    assert (result.returncode, result.stdout.strip()) == (0, "5"), result.stderr


def test_every_portion_imports_from_the_repo_root_and_from_elsewhere() -> None:
    code = ("import kubearq.cli, kubearq.operator.crds, kubearq.core.contract, kubearq.worker.scrape.jobs, operator; "
            "operator.add; print('ok')")
    for cwd in (str(REPO), "/"):
        result = run_python(code, cwd=cwd)
        assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr


def test_kubearq_is_a_namespace_package_without_init_files() -> None:
    for portion in ("core", "demo", "operator", "worker"):
        assert not (REPO / portion / "kubearq" / "__init__.py").exists()


def test_help_lists_every_subcommand() -> None:
    console_script = Path(sys.executable).parent / "kubearq"
    result = subprocess.run([str(console_script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("operator", "worker", "crds", "validate", "demo"):
        assert f"    {command} " in result.stdout


def test_kubearq_demo_is_the_demo_with_its_own_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: kubearq demo [-h] [--short] [--keep-running]")


def test_operator_without_credentials_says_where_it_looked() -> None:
    console_script = Path(sys.executable).parent / "kubearq"
    env = {"PATH": "/usr/bin:/bin", "KUBECONFIG": "/nonexistent/kubeconfig", "HOME": "/nonexistent"}
    result = subprocess.run([str(console_script), "operator"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert {key: value for key, value in json.loads(line).items() if key != "time"} == {
        "level": "ERROR", "name": "kubearq.cli",
        "message": "kubearq operator: cannot read Kubernetes credentials from /nonexistent/kubeconfig "
                   "(FileNotFoundError: No such file or directory); in a pod the service account is used, elsewhere "
                   "KUBECONFIG or ~/.kube/config"}
