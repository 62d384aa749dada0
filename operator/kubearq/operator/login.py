"""The operator's Kubernetes credentials: the pod's service account, else the kubeconfig, and a clear line when
neither works (a kubeconfig that is not YAML made kopf's client fail with a traceback through PyYAML)."""

from __future__ import annotations

import os
from pathlib import Path

import kopf
import yaml


class NoKubernetesCredentials(Exception):  # noqa: N818 - a user-facing condition, named as the user sees it
    """Neither a service account nor a usable kubeconfig."""


def default_connection() -> kopf.ConnectionInfo:
    """In a pod, the service account; elsewhere, the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    settings = kopf.OperatorSettings()
    looked = "in a pod the service account is used, elsewhere KUBECONFIG or ~/.kube/config"
    try:
        connection = kopf.login_with_service_account(settings=settings)
        if connection is None:
            for path in kubeconfig_paths():
                check_kubeconfig(path)
            connection = kopf.login_with_kubeconfig(settings=settings)
    except NoKubernetesCredentials:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, kopf.LoginError) as error:
        where = os.pathsep.join(str(path) for path in kubeconfig_paths())
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise NoKubernetesCredentials(
            f"cannot read Kubernetes credentials from {where} ({type(error).__name__}: {reason}); {looked}") from None
    if connection is None:
        raise NoKubernetesCredentials(
            "no service account and no kubeconfig: run in a pod, or set KUBECONFIG (or ~/.kube/config)")
    return connection


def kubeconfig_paths() -> list[Path]:
    """The kubeconfig files the client reads: each of KUBECONFIG, else ~/.kube/config."""
    value = os.environ.get("KUBECONFIG")
    return [Path(item) for item in value.split(os.pathsep) if item] if value else [Path("~/.kube/config").expanduser()]


def check_kubeconfig(path: Path) -> None:
    """A kubeconfig that is not YAML or not a mapping, in one line naming the file (kopf's client would
    fail with a traceback through PyYAML or an AttributeError)."""
    if not path.exists():
        return  # the client says so, for all the paths
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or error
        raise NoKubernetesCredentials(f"the kubeconfig {path} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise NoKubernetesCredentials(f"the kubeconfig {path} cannot be read: {error}") from None
    if document is not None and not isinstance(document, dict):
        raise NoKubernetesCredentials(f"the kubeconfig {path} is not a kubeconfig: a YAML mapping with clusters, "
                                      f"users, contexts and current-context, not a {type(document).__name__}")
