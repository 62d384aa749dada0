"""The container image without a container engine: the Dockerfile's shape, and its one install step
(docker/install.sh) run for real: the built wheel into a fresh venv that serves both roles from outside the repo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.chart import chart

REPO = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = REPO / "docker" / "install.sh"
pytestmark = pytest.mark.timeout(300)


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions (continuation lines joined), as (INSTRUCTION, arguments)."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text(encoding="utf-8"))
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, arguments = line.strip().partition(" ")
            found.append((instruction.upper(), arguments.strip()))
    return found


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(index for index, (instruction, _) in enumerate(steps) if instruction == "FROM")
    return steps[last_from:]


def test_the_image_is_built_in_two_stages_and_the_last_has_no_build_tools() -> None:
    stages = [arguments for instruction, arguments in instructions() if instruction == "FROM"]
    assert len(stages) == 2
    assert stages[0].endswith(" AS build")
    final = final_stage()
    assert ("COPY", "--from=build /opt/kubearq /opt/kubearq") in final
    runs = " ".join(arguments for instruction, arguments in final if instruction == "RUN")
    assert not re.search(r"\b(pip|gcc|apt-get|build-essential)\b", runs), runs
    build = " ".join(arguments for instruction, arguments in instructions()[:len(instructions()) - len(final)]
                     if instruction == "RUN")
    assert "kubearq-install /dist/kubearq-*.whl /opt/kubearq" in build  # the one install step, tested below


def test_the_image_runs_kubearq_as_a_numeric_non_root_user_with_only_tmp_writable() -> None:
    final = dict(final_stage())
    user = final["USER"]
    assert re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", user), user
    assert user == "65532:65532"
    # the chart's pods run as the same user
    values = chart().values["podSecurityContext"]
    assert (values["runAsUser"], values["runAsGroup"]) == (65532, 65532)
    assert json.loads(final["ENTRYPOINT"]) == ["/opt/kubearq/bin/kubearq"]  # exec form: signals reach kubearq
    env = final["ENV"]
    for setting in ("PYTHONDONTWRITEBYTECODE=1", "HOME=/tmp", "TMPDIR=/tmp"):
        assert setting in env


def test_the_image_carries_oci_labels() -> None:
    labels = " ".join(arguments for instruction, arguments in final_stage() if instruction == "LABEL")
    for label in ("source", "version", "licenses", "title", "description"):
        assert f"org.opencontainers.image.{label}=" in labels
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels
    assert re.search(r"^ARG VERSION=" + re.escape(chart().metadata["appVersion"]) + "$",
                     (REPO / "Dockerfile").read_text(), re.MULTILINE)


def test_the_build_context_holds_only_what_the_image_needs() -> None:
    ignored = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert ignored[0] == "*"  # everything left out, then what the COPY steps take let back in
    copied = {arguments.split()[0] for instruction, arguments in instructions() if instruction == "COPY"
              and not arguments.startswith("--from")}
    for source in copied:
        assert f"!{source}" in ignored or f"!{source.rstrip('/')}/" in ignored, source


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kubearq's wheel, built from the repo as the image's first stage builds it."""
    out = tmp_path_factory.mktemp("dist")
    # --no-build-isolation: hatchling is in the test extras, so the build needs no index
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(out), str(REPO)], check=True, capture_output=True, timeout=240)
    (built,) = out.glob("kubearq-*.whl")
    return built


@pytest.fixture(scope="module")
def dependencies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kubearq's dependencies as already installed, without kubearq itself: the test's venv's site-packages
    minus the project, so the install runs offline (PIP_NO_INDEX) and proves the wheel's requirements are met."""
    folder = tmp_path_factory.mktemp("site")
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("kubearq", "_kubearq", "__editable__")) or name.endswith(".pth"):
            continue
        (folder / entry.name).symlink_to(entry)
    return folder


def test_the_install_script_puts_the_wheel_in_a_fresh_venv_that_runs_both_roles_outside_the_repo(
        wheel: Path, dependencies: Path, tmp_path: Path) -> None:
    venv = tmp_path / "opt" / "kubearq"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": sys.executable, "PYTHONPATH": str(dependencies),
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_CONSTRAINT": "", "PIP_CONFIG_FILE": os.devnull}
    installed = subprocess.run(["sh", str(INSTALL_SCRIPT), str(wheel), str(venv)], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=240)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    assert installed.stdout.strip().endswith(f"kubearq installed in {venv}")

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    top = run(str(venv / "bin" / "kubearq"), "--help")
    assert top.returncode == 0, top.stderr
    assert "operator" in top.stdout
    assert "worker" in top.stdout
    worker = run(str(venv / "bin" / "kubearq"), "worker", "--help")
    assert worker.returncode == 0, worker.stderr
    assert "--settings" in worker.stdout
    plugin = run(str(venv / "bin" / "kubectl-kubearq"), "schedule", "--help")  # `kubectl kubearq schedule ...`
    assert plugin.returncode == 0, plugin.stderr
    assert "trigger" in plugin.stdout
    imported = run(str(venv / "bin" / "python"), "-c",
                   "import kubearq.operator, kubearq.worker, kubearq.core, operator; operator.add; "
                   "print(*(list(module.__path__)[0] for module in (kubearq.operator, kubearq.worker, kubearq.core)))")
    assert imported.returncode == 0, imported.stderr
    for path in imported.stdout.split():
        assert Path(path).is_relative_to(venv), path  # the wheel's copy, not the repo's
