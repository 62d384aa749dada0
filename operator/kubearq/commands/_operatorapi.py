"""The operator's failed-jobs API (kubearq.operator.console.failedjobs, on its dashboard port) as `kubearq jobs
retry|discard` asks it: with the caller's own bearer token, which the operator checks with a TokenReview and then a
SubjectAccessReview for `redrive` or `discard` on `failedjobs.kubearq.dev`, so that Kubernetes RBAC decides."""

from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import ValidationError

from kubearq.commands._cluster import FAILED, FORBIDDEN, USAGE, CommandError, login
from kubearq.operator.console.failedjobs import API_PATH, Action, FailedJobsAnswer, FailedJobsRequest
from kubearq.operator.login import NoKubernetesCredentials

PORT_FORWARD = "kubectl -n kubearq port-forward svc/kubearq-operator 8081"
REQUEST_TIMEOUT = httpx.Timeout(15.0, read=300.0)  # re-driving every matching job of 100,000 takes a while
LOGIN_HINT = '--token "$(kubectl create token NAME -n NAMESPACE)" (a ServiceAccount\'s) or your identity provider\'s'


def operator_url(text: str) -> str:
    """`--operator`: the base URL of the operator's dashboard, without a trailing slash."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise CommandError(f"--operator {text!r}: give the URL of the operator's dashboard port, e.g. "
                           f"http://localhost:8081 after `{PORT_FORWARD}`, or its https:// address", USAGE)
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def sends_token_in_clear(url: str) -> bool:
    """Whether a token sent to `url` crosses a network unencrypted (http:// to anything but this machine)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname in (None, "localhost"):
        return False
    try:
        return not ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return True


def caller_token(given: str | None) -> str:
    """`--token`, else the bearer token of the current kubeconfig context's user (else the pod's service account),
    found as `kubearq schedule` and `scrape` log in (kubectl's order)."""
    if given is not None:
        if not given.strip() or any(char.isspace() for char in given.strip()):
            raise CommandError(f"--token {given!r} is not a bearer token: give one, e.g. {LOGIN_HINT}", USAGE)
        return given.strip()
    try:
        connection = login()
    except NoKubernetesCredentials as error:
        raise CommandError(f"{error}; or give a token with {LOGIN_HINT}", USAGE) from None
    if connection.token and (connection.scheme or "Bearer").lower() == "bearer":
        return connection.token
    if connection.certificate_path or connection.certificate_data:
        how = "a client certificate, which only the API server itself can check"
    elif connection.username:
        how = "a user name and password"
    else:
        how = "no bearer token kubearq can read (an exec plugin, say)"
    raise CommandError(f"your kubeconfig user logs in with {how}; the operator checks a bearer token (TokenReview): "
                       f"give one with {LOGIN_HINT}", FORBIDDEN)


async def ask(url: str, token: str, action: Action, request: FailedJobsRequest) -> FailedJobsAnswer:
    """POST the request as the caller; the operator's refusal as a CommandError with its own sentence."""
    endpoint = f"{url}{API_PATH}{action}"
    try:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
            response = await client.post(
                endpoint, json=request.model_dump(mode="json", by_alias=True, exclude_none=True),
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    except (httpx.TransportError, TimeoutError, OSError) as error:
        raise CommandError(f"cannot reach the operator at {url}: {type(error).__name__}: {error} (is the dashboard "
                           f"enabled, and `{PORT_FORWARD}` running?)", FAILED) from None
    if response.status_code == 200:
        try:
            return FailedJobsAnswer.model_validate_json(response.content)
        except ValidationError as error:
            raise CommandError(f"the operator at {url} answered {endpoint} with something else than kubearq's answer "
                               f"(another kubearq version?): {error.errors(include_url=False)[0]['msg']}",
                               FAILED) from None
    message = _status_message(response)
    if message is None:
        if response.status_code == 404:
            raise CommandError(f"{url} serves no POST {API_PATH}{action}: is it the operator's dashboard port "
                               "(dashboard.enabled, port 8081), of a kubearq version that has this API?", FAILED)
        message = f"HTTP {response.status_code} {response.reason_phrase}, not kubearq's JSON (is {url} the operator?)"
    if response.status_code == 401:
        raise CommandError(f"the operator at {url} did not accept your token: {message}", FORBIDDEN)
    if response.status_code == 403:
        raise CommandError(message, FORBIDDEN)
    if response.status_code in (400, 413):
        raise CommandError(f"the operator at {url} refused the request: {message}", USAGE)
    raise CommandError(f"the operator at {url} could not {action}: {message}", FAILED)


def _status_message(response: httpx.Response) -> str | None:
    """The `message` of the Kubernetes-style Status the operator refuses with; None if the body is not one."""
    try:
        body = json.loads(response.content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(body, dict) and body.get("kind") == "Status" and isinstance(body.get("message"), str):
        return str(body["message"])
    return None
