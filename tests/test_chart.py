"""The Helm chart, rendered with the real Helm v4 engine: lint-clean, valid on every Kubernetes minor from 1.30,
restricted pods, exactly the operator's RBAC, bad values refused with the message a user sees, and the two
files generated from it (the README's values table, the kustomize base) in step with it."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml

from kubearq.operator.queuestats import label_safe
from kubearq.operator.rbac import (
    dashboard_review_rules,
    dashboard_write_rules,
    lease_rules,
    operator_rules,
    operator_user_rules,
    tenancy_rules,
    viewer_rules,
)
from tests.chart import (
    CHART_DIR,
    CHART_README,
    MANIFESTS,
    NAMESPACE,
    KubeObject,
    base_drift,
    by_kind,
    chart,
    documented_values,
    env_of,
    kubernetes_minors,
    leaf_paths,
    lint,
    named,
    pod_specs,
    readme_with_table,
    render,
    render_error,
    validation_errors,
)

SCHEMA_REFUSED = "values don't meet the specifications of the schema(s) in the following chart(s):\nkubearq:\n"
THREE_POOLS: list[dict[str, Any]] = [
    {"name": "default", "queue": "arq:queue"},
    {"name": "scrape", "queue": "scrape", "maxJobs": 32, "autoscaling": {"maxReplicas": 40}},
    {"name": "reports", "queue": "reports.nightly", "settings": "myapp.jobs:WorkerSettings",
     "jobTimeoutSeconds": 1800, "shutdownGraceSeconds": 120,
     "autoscaling": {"minReplicas": 2, "targetBusyJobsPerReplica": 4}},
]
# The value sets every structural test runs on: what users are expected to install with.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "keda": {"autoscaling": {"provider": "keda", "keda": {"authenticationRef": "prometheus-auth"}},
             "workers": [{"name": "default", "queue": "arq:queue", "autoscaling": {"minReplicas": 0}}]},
    "no-monitoring": {"monitoring": {"serviceMonitor": {"enabled": False}, "podMonitor": {"enabled": False}},
                      "autoscaling": {"prometheusAdapter": {"rulesConfigMap": False}},
                      "workerDefaults": {"autoscaling": {"enabled": False}, "replicas": 3},
                      "operator": {"podDisruptionBudget": {"enabled": False}},
                      "rbac": {"aggregateToDefaultRoles": False}},
    "three-pools": {"workers": THREE_POOLS, "workerDefaults": {"podDisruptionBudget": {"enabled": True}}},
    "tls-redis": {"redis": {"existingSecret": "redis-auth", "urlKey": "", "host": "redis.data.svc", "port": 6380,
                            "database": 2, "username": "kubearq", "passwordKey": "redis-password",
                            "tls": {"enabled": True, "caBundle": {"secretName": "redis-ca", "key": "ca.pem"}}}},
    "existing-secrets": {
        "redis": {"existingSecret": "shared-redis", "urlKey": "connection-url"},
        "postgresql": {"existingSecret": "shared-postgres", "urlKey": "dsn"},
        "firecrawl": {"apiKey": {"secretName": "firecrawl-global"},
                      "namespaceKeys": [{"namespace": "team-a", "name": "firecrawl", "fromSecret": "team-a-firecrawl"},
                                        {"namespace": "team-b", "name": "fc", "key": "token"}]},
        "sync": {"secrets": ["ad-tokens", "meta-tokens"]},
        "operator": {"serviceAccount": {"create": False, "name": "platform-kubearq"}},
        "workerServiceAccount": {"create": False, "name": "platform-workers"}},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "network-policy": {"networkPolicy": {"enabled": True, "redisTo": [{"namespaceSelector": {"matchLabels": {
                           "kubernetes.io/metadata.name": "data"}}}]},
                       "postgresql": {"existingSecret": "pg", "urlKey": "", "host": "pg.data.svc",
                                      "caBundle": {"configMapName": "pg-ca"}}},
    "custom-image": {"image": {"repository": "registry.example/myapp-kubearq", "tag": "1.4.2",
                               "digest": "sha256:" + "ab" * 32, "pullPolicy": "Always"},
                     "imagePullSecrets": ["registry-auth"], "fullnameOverride": "jobs"},
    "dashboard": {"dashboard": {"enabled": True, "secureCookie": True},
                  "postgresql": {"existingSecret": "pg", "urlKey": "", "host": "pg.data.svc",
                                 "caBundle": {"configMapName": "pg-ca"}},
                  "networkPolicy": {"enabled": True}},
    "monitoring-on": {"monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                                     "podMonitor": {"enabled": True}, "scrapeAnnotations": True}},
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[KubeObject]]:
    """Every value set rendered once for the module (CRDs included, as `helm install` applies them)."""
    return {name: render(values, crds=True) for name, values in VALUE_SETS.items()}


def all_rendered(rendered: dict[str, list[KubeObject]]) -> Iterator[tuple[str, KubeObject]]:
    for name, objects in rendered.items():
        for obj in objects:
            yield name, obj


def test_helm_lint_finds_nothing() -> None:
    for values in VALUE_SETS.values():
        report = lint(values)
        problems = [message for message in report["messages"] if message["severity"] >= 2]  # warning, error
        assert (report["errors"], problems) == ([], [])


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_object_is_valid_on_every_kubernetes_minor_from_1_30(
        rendered: dict[str, list[KubeObject]], value_set: str) -> None:
    minors = kubernetes_minors()
    assert minors[0] == "1.30"
    assert len(minors) >= 8
    errors = [error for minor in minors for obj in rendered[value_set] for error in validation_errors(obj, minor)]
    assert errors == []


def test_value_sets_render_what_they_turn_on(rendered: dict[str, list[KubeObject]]) -> None:
    kinds = {name: sorted({obj["kind"] for obj in objects}) for name, objects in rendered.items()}
    assert "HorizontalPodAutoscaler" in kinds["defaults"]
    assert "ScaledObject" not in kinds["defaults"]
    assert "ScaledObject" in kinds["keda"]
    assert "HorizontalPodAutoscaler" not in kinds["keda"]
    assert {"HorizontalPodAutoscaler", "ConfigMap", "PodDisruptionBudget"}.isdisjoint(kinds["no-monitoring"])
    assert {"ServiceMonitor", "PodMonitor"} <= set(kinds["monitoring-on"])
    assert "NetworkPolicy" in kinds["network-policy"]
    assert "NetworkPolicy" not in kinds["defaults"]
    assert len(by_kind(rendered["three-pools"], "Deployment")) == 4  # the operator and three pools
    assert len(by_kind(rendered["three-pools"], "PodDisruptionBudget")) == 4


# --- pods ----------------------------------------------------------------------------------------------------

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret"}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """What the Pod Security Standards' `restricted` profile (and `baseline` below it) refuse in a pod spec.
    https://kubernetes.io/docs/concepts/security/pod-security-standards/"""
    problems = []
    pod = spec.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            problems.append(f"{flag} is set")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            problems.append(f"volume {volume['name']} is {kinds}")
    for container in spec.get("initContainers", []) + spec["containers"]:
        context = container.get("securityContext", {})
        where = f"container {container['name']}"
        if context.get("privileged"):
            problems.append(f"{where} is privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where} may escalate privileges")
        if context.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            problems.append(f"{where} may run as root")
        if context.get("runAsUser", pod.get("runAsUser")) == 0:
            problems.append(f"{where} runs as uid 0")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{where} does not drop ALL capabilities")
        if not set(capabilities.get("add", [])) <= {"NET_BIND_SERVICE"}:
            problems.append(f"{where} adds capabilities {capabilities['add']}")
        seccomp = context.get("seccompProfile", pod.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where} has seccomp profile {seccomp}")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"{where} uses a host port")
    return problems


def test_every_pod_meets_the_restricted_pod_security_standard(rendered: dict[str, list[KubeObject]]) -> None:
    problems = {(name, workload): violations for name, objects in rendered.items()
                for workload, spec in pod_specs(objects) if (violations := restricted_violations(spec))}
    assert problems == {}


def test_every_pod_has_a_read_only_root_filesystem_and_a_writable_tmp(
        rendered: dict[str, list[KubeObject]]) -> None:
    for _, objects in rendered.items():
        for workload, spec in pod_specs(objects):
            volumes = {volume["name"]: volume for volume in spec["volumes"]}
            for container in spec["containers"]:
                assert container["securityContext"]["readOnlyRootFilesystem"] is True, workload
                tmp = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/tmp"]
                assert len(tmp) == 1, workload
                assert "emptyDir" in volumes[tmp[0]["name"]], workload


def test_workers_never_get_a_service_account_token(rendered: dict[str, list[KubeObject]]) -> None:
    for name, objects in rendered.items():
        operator = named(objects, "Deployment", f"{fullname(name)}-operator")["spec"]["template"]["spec"]
        for workload, spec in pod_specs(objects):
            if workload.endswith("-operator"):
                continue
            assert spec["automountServiceAccountToken"] is False
            assert spec["serviceAccountName"] != operator["serviceAccountName"]
        for account in by_kind(objects, "ServiceAccount"):
            if account["metadata"]["labels"]["app.kubernetes.io/component"] == "worker":
                assert account["automountServiceAccountToken"] is False


def fullname(value_set: str) -> str:
    return str(VALUE_SETS[value_set].get("fullnameOverride", "kubearq"))


def test_the_operator_runs_two_replicas_with_probes_a_budget_and_a_spread_across_nodes() -> None:
    objects = render()
    deployment = named(objects, "Deployment", "kubearq-operator")
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = env_of(container)
    assert deployment["spec"]["replicas"] == 2
    assert container["args"] == ["operator"]
    assert (container["livenessProbe"]["httpGet"]["path"], container["readinessProbe"]["httpGet"]["path"]) == (
        "/healthz", "/readyz")
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert (env["LEASE_NAME"], env["LEASE_NAMESPACE"], env["NAMESPACE"]) == ("kubearq-operator", NAMESPACE, "")
    assert env["QUEUES"] == "arq:queue"  # the pools' queues are exported before any resource names them
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert spec["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"] == \
        deployment["spec"]["selector"]["matchLabels"]
    budget = named(objects, "PodDisruptionBudget", "kubearq-operator")["spec"]
    assert budget == {"minAvailable": 1, "selector": deployment["spec"]["selector"]}


def test_selectors_never_hold_the_chart_version(rendered: dict[str, list[KubeObject]]) -> None:
    for _, obj in all_rendered(rendered):
        selector = obj.get("spec", {}).get("selector")
        if isinstance(selector, dict):
            labels = selector.get("matchLabels", selector)
            assert {"helm.sh/chart", "app.kubernetes.io/version"}.isdisjoint(labels), obj["kind"]


def test_a_pools_grace_period_covers_its_drain() -> None:
    objects = render({"workers": THREE_POOLS})
    for pool, (grace, period) in {"default": ("25", 40), "reports": ("120", 135)}.items():
        spec = named(objects, "Deployment", f"kubearq-worker-{pool}")["spec"]["template"]["spec"]
        assert (env_of(spec["containers"][0])["SHUTDOWN_GRACE"], spec["terminationGracePeriodSeconds"]) == (
            grace, period)
    reports = named(objects, "Deployment", "kubearq-worker-reports")["spec"]["template"]["spec"]["containers"][0]
    assert reports["args"] == ["worker", "--settings", "myapp.jobs:WorkerSettings"]
    assert (env_of(reports)["QUEUE"], env_of(reports)["JOB_TIMEOUT"]) == ("reports.nightly", "1800")


def test_a_pool_that_can_outgrow_the_workers_default_read_limit_reads_twice_its_slots() -> None:
    # a worker reads only the first QUEUE_READ_LIMIT due ids and running jobs sit at the head: a limit below
    # replicas * maxJobs leaves new replicas nothing to run (the worker's default: max(1000, 20 * maxJobs))
    objects = render({"workers": [pool(name="wide", maxJobs=32, autoscaling={"maxReplicas": 40}),
                                  pool(name="fixed", queue="f", replicas=100, autoscaling={"enabled": False}),
                                  pool(name="small", queue="s")]})
    limits = {name: worker_env(objects, name).get("QUEUE_READ_LIMIT") for name in ("wide", "fixed", "small")}
    assert limits == {"wide": "2560", "fixed": "3200", "small": None}


def test_a_false_in_a_pool_overrides_worker_defaults() -> None:
    # sprig's merge and mergeOverwrite drop false and 0: a pool could not turn autoscaling off
    objects = render({"workers": [{"name": "fixed", "queue": "q", "replicas": 0, "autoscaling": {"enabled": False}},
                                  {"name": "scaled", "queue": "r"}]})
    assert named(objects, "Deployment", "kubearq-worker-fixed")["spec"]["replicas"] == 0
    assert [hpa["metadata"]["name"] for hpa in by_kind(objects, "HorizontalPodAutoscaler")] == [
        "kubearq-worker-scaled"]
    assert "replicas" not in named(objects, "Deployment", "kubearq-worker-scaled")["spec"]  # the HPA owns it


# --- credentials -----------------------------------------------------------------------------------------------

def worker_env(objects: list[KubeObject], pool: str = "default", name: str = "kubearq") -> dict[str, Any]:
    deployment = named(objects, "Deployment", f"{name}-worker-{pool}")
    return env_of(deployment["spec"]["template"]["spec"]["containers"][0])


def operator_pod(objects: list[KubeObject], name: str = "kubearq") -> dict[str, Any]:
    spec: dict[str, Any] = named(objects, "Deployment", f"{name}-operator")["spec"]["template"]["spec"]
    return spec


def test_the_redis_url_comes_from_the_secret_by_default() -> None:
    objects = render()
    for env in (worker_env(objects), env_of(operator_pod(objects)["containers"][0])):
        assert env["REDIS_URL"] == {"secretKeyRef": {"name": "kubearq-redis", "key": "url"}}
        assert "DATABASE_URL" not in env


def test_redis_over_tls_from_parts_gets_a_rediss_url_and_the_ca_in_both_roles(
        rendered: dict[str, list[KubeObject]]) -> None:
    objects = rendered["tls-redis"]
    for spec in (operator_pod(objects), named(objects, "Deployment", "kubearq-worker-default")["spec"]["template"][
            "spec"]):
        env = env_of(spec["containers"][0])
        assert env["KUBEARQ_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "redis-auth", "key": "redis-password"}}
        assert env["REDIS_URL"] == "rediss://kubearq:$(KUBEARQ_REDIS_PASSWORD)@redis.data.svc:6380/2"
        assert env["REDIS_CA_FILE"] == "/etc/kubearq/redis-ca/ca.pem"
        volume = next(volume for volume in spec["volumes"] if volume["name"] == "redis-ca")
        assert volume["secret"] == {"secretName": "redis-ca", "items": [{"key": "ca.pem", "path": "ca.pem"}]}
        # the password is referenced before REDIS_URL, or the kubelet leaves $(…) unexpanded
        names = [item["name"] for item in spec["containers"][0]["env"]]
        assert names.index("KUBEARQ_REDIS_PASSWORD") < names.index("REDIS_URL")


def test_existing_secrets_feed_postgresql_and_firecrawl(rendered: dict[str, list[KubeObject]]) -> None:
    objects = rendered["existing-secrets"]
    env = worker_env(objects)
    assert env["REDIS_URL"] == {"secretKeyRef": {"name": "shared-redis", "key": "connection-url"}}
    assert env["DATABASE_URL"] == {"secretKeyRef": {"name": "shared-postgres", "key": "dsn"}}
    assert env["FIRECRAWL_API_KEY"] == {"secretKeyRef": {"name": "firecrawl-global", "key": "apiKey"}}
    assert env["FIRECRAWL_SECRETS_DIR"] == "/etc/kubearq/firecrawl"
    spec = named(objects, "Deployment", "kubearq-worker-default")["spec"]["template"]["spec"]
    keys = next(volume for volume in spec["volumes"] if volume["name"] == "firecrawl-keys")["projected"]["sources"]
    # <namespace>/<secret name>/<key>: what the worker looks a request's apiKeySecretRef up by
    assert keys == [
        {"secret": {"name": "team-a-firecrawl", "items": [{"key": "apiKey", "path": "team-a/firecrawl/apiKey"}]}},
        {"secret": {"name": "fc", "items": [{"key": "token", "path": "team-b/fc/token"}]}}]
    assert spec["serviceAccountName"] == "platform-workers"
    assert operator_pod(objects)["serviceAccountName"] == "platform-kubearq"
    # the sync connections' credentials: SYNC_SECRETS_DIR/<secret name>/<key>, each Secret mounted whole
    assert env["SYNC_SECRETS_DIR"] == "/etc/kubearq/sync"
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert [volumes[mounts[f"/etc/kubearq/sync/{name}"]]["secret"] for name in ("ad-tokens", "meta-tokens")] == [
        {"secretName": "ad-tokens"}, {"secretName": "meta-tokens"}]
    assert by_kind(objects, "ServiceAccount") == []


def test_postgresql_from_parts_verifies_the_server_against_its_ca(rendered: dict[str, list[KubeObject]]) -> None:
    env = worker_env(rendered["network-policy"])
    assert env["DATABASE_URL"] == ("postgresql://kubearq:$(KUBEARQ_DATABASE_PASSWORD)@pg.data.svc:5432/kubearq"
                                   "?sslmode=verify-full&sslrootcert=/etc/kubearq/postgresql-ca/ca.crt")
    assert env["KUBEARQ_DATABASE_PASSWORD"] == {"secretKeyRef": {"name": "pg", "key": "password"}}
    without_ca = worker_env(render({"postgresql": {"existingSecret": "pg", "urlKey": "", "host": "db"}}))
    assert without_ca["DATABASE_URL"].endswith("?sslmode=verify-full&sslrootcert=/etc/ssl/certs/ca-certificates.crt")


def test_no_credential_is_ever_a_plain_value(rendered: dict[str, list[KubeObject]]) -> None:
    for _, objects in rendered.items():
        for _, spec in pod_specs(objects):
            for container in spec["containers"]:
                for name, value in env_of(container).items():
                    if name in ("REDIS_URL", "DATABASE_URL") and isinstance(value, str):
                        assert "$(KUBEARQ_" in value or "@" not in value, (name, value)
                    if "PASSWORD" in name or "API_KEY" in name:
                        assert isinstance(value, dict), name
                        assert "secretKeyRef" in value, name


def test_a_custom_image_is_pinned_by_digest_for_both_roles(rendered: dict[str, list[KubeObject]]) -> None:
    for _, spec in pod_specs(rendered["custom-image"]):
        container = spec["containers"][0]
        assert (container["image"], container["imagePullPolicy"]) == (
            "registry.example/myapp-kubearq@sha256:" + "ab" * 32, "Always")
        assert spec["imagePullSecrets"] == [{"name": "registry-auth"}]
    default_image = {spec["containers"][0]["image"] for _, spec in pod_specs(rendered["defaults"])}
    assert default_image == {f"ghcr.io/kubearq/kubearq:{chart().metadata['appVersion']}"}


# --- RBAC ------------------------------------------------------------------------------------------------------

def rules_of(obj: KubeObject) -> list[dict[str, Any]]:
    return [{key: value for key, value in rule.items() if value} for rule in obj["rules"]]


def test_the_operators_cluster_role_is_exactly_kubearq_operator_rbac() -> None:
    objects = render()
    assert rules_of(named(objects, "ClusterRole", "kubearq-operator")) == operator_rules()
    lease_name = env_of(operator_pod(objects)["containers"][0])["LEASE_NAME"]
    lease_role = named(objects, "Role", "kubearq-operator-lease")
    assert (lease_role["metadata"]["namespace"], rules_of(lease_role)) == (NAMESPACE, lease_rules(lease_name))
    subject = {"kind": "ServiceAccount", "name": operator_pod(objects)["serviceAccountName"], "namespace": NAMESPACE}
    for kind, binding in (("ClusterRoleBinding", "kubearq-operator"), ("RoleBinding", "kubearq-operator-lease")):
        assert named(objects, kind, binding)["subjects"] == [subject]


def test_watch_namespaces_give_a_role_in_each_and_no_cluster_role(rendered: dict[str, list[KubeObject]]) -> None:
    objects = rendered["namespaced"]
    roles = [role for role in by_kind(objects, "Role") if role["metadata"]["name"] == "kubearq-operator"]
    assert sorted(role["metadata"]["namespace"] for role in roles) == ["team-a", "team-b"]
    assert all(rules_of(role) == operator_rules() for role in roles)
    bindings = [binding for binding in by_kind(objects, "RoleBinding")
                if binding["metadata"]["name"] == "kubearq-operator"]
    assert sorted(binding["metadata"]["namespace"] for binding in bindings) == ["team-a", "team-b"]
    assert sorted(role["metadata"]["name"] for role in by_kind(objects, "ClusterRole")) == [
        "kubearq-edit", "kubearq-operator-tenancy", "kubearq-operator-user", "kubearq-queuepolicy-reader",
        "kubearq-view", "kubearq-viewer"]  # the last two grant nothing until someone binds them to people
    # the one cluster-wide grant of a namespaced install: the tenancy reads (QueuePolicies, namespace labels)
    assert [binding["roleRef"]["name"] for binding in by_kind(objects, "ClusterRoleBinding")] == [
        "kubearq-operator-tenancy"]
    assert env_of(operator_pod(objects)["containers"][0])["NAMESPACE"] == "team-a,team-b"


# Everything any role of the chart may grant: (API group, resource, verb); the operator's are also
# checked equal to kubearq.operator.rbac above, these are a second, independent list.
ALLOWED_GRANTS = {
    *(("kubearq.dev", resource, verb) for resource in ("syncschedules", "scraperequests")
       for verb in ("get", "list", "watch", "patch")),
    ("kubearq.dev", "syncschedules/status", "patch"), ("kubearq.dev", "scraperequests/status", "patch"),
    ("", "events", "create"), ("", "events", "patch"), ("", "configmaps", "get"),
    ("coordination.k8s.io", "leases", "create"), ("coordination.k8s.io", "leases", "get"),
    ("coordination.k8s.io", "leases", "update"),
    *(("kubearq.dev", "queuepolicies", verb) for verb in ("get", "list", "watch")),
    ("kubearq.dev", "queuepolicies/status", "patch"),  # Ready: applied, or ignored and why
    *(("", "namespaces", verb) for verb in ("get", "list", "watch")),
    # the dashboard: who a token is and what its user may do
    ("authentication.k8s.io", "tokenreviews", "create"), ("authorization.k8s.io", "subjectaccessreviews", "create"),
    # the roles for people: reads, the virtual resources, and the dashboard's custom verbs
    *(("kubearq.dev", f"{resource}/status", verb) for resource in ("syncschedules", "scraperequests")
      for verb in ("get", "list", "watch")),
    *(("kubearq.dev", resource, verb) for resource in ("failedjobs", "queues") for verb in ("get", "list")),
    ("kubearq.dev", "syncschedules", "trigger"), ("kubearq.dev", "syncschedules", "suspend"),
    ("kubearq.dev", "scraperequests", "cancel"),
    ("kubearq.dev", "failedjobs", "redrive"), ("kubearq.dev", "failedjobs", "discard"),
}
# The aggregated roles: application teams write (edit/admin) and read (view) the two resources.
AGGREGATED_GRANTS = {
    *(("kubearq.dev", resource, verb) for resource in ("syncschedules", "scraperequests")
       for verb in ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")),
    *(("kubearq.dev", f"{resource}/status", verb) for resource in ("syncschedules", "scraperequests")
       for verb in ("get", "list", "watch")),
    *(("kubearq.dev", "queuepolicies", verb) for verb in ("get", "list", "watch")),  # admin reads, never writes
}


def grants(role: KubeObject) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_no_role_grants_a_wildcard_or_anything_off_the_allow_list(rendered: dict[str, list[KubeObject]]) -> None:
    for value_set, objects in rendered.items():
        lease_name = env_of(operator_pod(objects, fullname(value_set))["containers"][0])["LEASE_NAME"]
        for role in by_kind(objects, "Role") + by_kind(objects, "ClusterRole"):
            for rule in role["rules"]:
                assert set(rule) <= {"apiGroups", "resources", "resourceNames", "verbs"}, rule  # no nonResourceURLs
                for field in ("apiGroups", "resources", "resourceNames", "verbs"):
                    assert not any("*" in item for item in rule.get(field, [])), rule
                if "leases" in rule["resources"] and set(rule["verbs"]) & {"get", "update"}:
                    assert rule["resourceNames"] == [lease_name]  # the one Lease it may read or renew
            aggregated = any(label.startswith("rbac.authorization.k8s.io/aggregate-to-")
                             for label in role["metadata"]["labels"])
            assert grants(role) <= (AGGREGATED_GRANTS if aggregated else ALLOWED_GRANTS), role["metadata"]["name"]


@pytest.mark.parametrize(("mode", "tenancy_role"), [("namespaced", True), ("policy", True), ("open", False)])
def test_the_tenancy_mode_reaches_the_operator_with_the_reads_it_needs(mode: str, tenancy_role: bool) -> None:
    objects = render({"tenancy": {"mode": mode}})
    assert env_of(operator_pod(objects)["containers"][0])["TENANCY"] == mode
    roles = {role["metadata"]["name"]: role for role in by_kind(objects, "ClusterRole")}
    assert ("kubearq-operator-tenancy" in roles) == tenancy_role
    if tenancy_role:
        assert rules_of(roles["kubearq-operator-tenancy"]) == tenancy_rules()


def test_only_cluster_admins_write_queue_policies() -> None:
    roles = {role["metadata"]["name"]: role for role in by_kind(render(), "ClusterRole")}
    reader = roles["kubearq-queuepolicy-reader"]
    assert {label for label, value in reader["metadata"]["labels"].items() if value == "true"} == {
        "rbac.authorization.k8s.io/aggregate-to-admin"}  # namespace admins read; not edit, not view
    assert grants(reader) == {("kubearq.dev", "queuepolicies", verb) for verb in ("get", "list", "watch")}
    # The operator writes a policy's status, never its spec; nobody else writes either.
    assert not any(resource == "queuepolicies" for role in roles.values() if role is not reader
                   for _, resource, verb in grants(role) if verb not in ("get", "list", "watch"))
    assert {(name, verb) for name, role in roles.items() for _, resource, verb in grants(role)
            if resource == "queuepolicies/status"} == {("kubearq-operator-tenancy", "patch")}


def test_edit_admin_and_view_are_aggregated_the_two_resources() -> None:
    objects = render()
    edit, view = named(objects, "ClusterRole", "kubearq-edit"), named(objects, "ClusterRole", "kubearq-view")
    assert {label for label, value in edit["metadata"]["labels"].items() if value == "true"} == {
        "rbac.authorization.k8s.io/aggregate-to-admin", "rbac.authorization.k8s.io/aggregate-to-edit"}
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert ("kubearq.dev", "scraperequests", "create") in grants(edit)
    assert {verb for _, _, verb in grants(view)} == {"get", "list", "watch"}


def test_the_roles_for_people_are_exactly_kubearq_operator_rbac() -> None:
    objects = render()
    assert rules_of(named(objects, "ClusterRole", "kubearq-viewer")) == viewer_rules()
    assert rules_of(named(objects, "ClusterRole", "kubearq-operator-user")) == operator_user_rules()
    assert not [binding for binding in by_kind(objects, "ClusterRoleBinding") + by_kind(objects, "RoleBinding")
                if binding["roleRef"]["name"] in ("kubearq-viewer", "kubearq-operator-user")]  # yours to bind


# --- the dashboard ---------------------------------------------------------------------------------------------

def test_the_dashboard_is_off_by_default_and_grants_the_operator_nothing_then(
        rendered: dict[str, list[KubeObject]]) -> None:
    objects = rendered["defaults"]
    container = operator_pod(objects)["containers"][0]
    assert not [name for name in env_of(container) if name.startswith("DASHBOARD_")]
    assert [port["name"] for port in container["ports"]] == ["http"]
    assert [port["name"] for port in named(objects, "Service", "kubearq-operator")["spec"]["ports"]] == [
        "http-metrics"]
    assert not [role for role in by_kind(objects, "ClusterRole") if "dashboard" in role["metadata"]["name"]]


def test_one_value_turns_the_dashboard_on_with_exactly_its_rbac(rendered: dict[str, list[KubeObject]]) -> None:
    objects = rendered["dashboard"]
    container = operator_pod(objects)["containers"][0]
    env = env_of(container)
    assert {name: env[name] for name in env if name.startswith("DASHBOARD_")} == {
        "DASHBOARD_ENABLED": "true", "DASHBOARD_PORT": "8081", "DASHBOARD_AUTH_CACHE_SECONDS": "10",
        "DASHBOARD_SECURE_COOKIE": "true", "DASHBOARD_DATABASE_URL": "$(DATABASE_URL)"}
    assert list(env).index("DATABASE_URL") < list(env).index("DASHBOARD_DATABASE_URL")  # $(…) needs it first
    assert {"name": "dashboard", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    assert {"name": "postgresql-ca", "mountPath": "/etc/kubearq/postgresql-ca", "readOnly": True} in \
        container["volumeMounts"]
    service = named(objects, "Service", "kubearq-operator")
    assert {"name": "http-dashboard", "port": 8081, "targetPort": "dashboard", "protocol": "TCP"} in \
        service["spec"]["ports"]
    role = named(objects, "ClusterRole", "kubearq-operator-dashboard")
    assert rules_of(role) == [*dashboard_review_rules(), *dashboard_write_rules()]
    assert named(objects, "ClusterRoleBinding", "kubearq-operator-dashboard")["roleRef"]["name"] == \
        "kubearq-operator-dashboard"
    policy = named(objects, "NetworkPolicy", "kubearq-operator")
    assert {"ports": [{"protocol": "TCP", "port": "dashboard"}]} in policy["spec"]["ingress"]
    assert {"ports": [{"protocol": "TCP", "port": 5432}]} in policy["spec"]["egress"]


def test_a_namespaced_dashboard_patches_schedules_only_in_the_watched_namespaces() -> None:
    objects = render({"dashboard": {"enabled": True}, "watchNamespaces": ["team-a", "team-b"]})
    assert rules_of(named(objects, "ClusterRole", "kubearq-operator-dashboard")) == dashboard_review_rules()
    roles = [role for role in by_kind(objects, "Role") if role["metadata"]["name"] == "kubearq-operator-dashboard"]
    assert sorted(role["metadata"]["namespace"] for role in roles) == ["team-a", "team-b"]
    assert all(rules_of(role) == dashboard_write_rules() for role in roles)
    assert "DASHBOARD_DATABASE_URL" not in env_of(operator_pod(objects)["containers"][0])  # no PostgreSQL: Redis


# --- bad values --------------------------------------------------------------------------------------------------

def pool(**fields: Any) -> dict[str, Any]:
    return {"name": "default", "queue": "arq:queue", **fields}


@pytest.mark.parametrize(("values", "message"), [
    pytest.param({"autoscaling": {"provider": "prometheus"}},
                 "- at '/autoscaling/provider': value must be one of 'hpa', 'keda'\n", id="unknown-provider"),
    pytest.param({"autoscaling": {"provider": ["hpa", "keda"]}},
                 "- at '/autoscaling/provider': value must be one of 'hpa', 'keda'\n", id="both-providers"),
    pytest.param({"workers": [pool(autoscaling={"provider": "keda"})]},
                 "- at '/workers/0/autoscaling': additional properties 'provider' not allowed\n",
                 id="a-pool-with-the-other-provider"),
    pytest.param({"operator": {"replicas": -1}}, "- at '/operator/replicas': minimum: got -1, want 0\n",
                 id="negative-operator-replicas"),
    pytest.param({"workers": [pool(replicas=-2)]}, "- at '/workers/0/replicas': minimum: got -2, want 0\n",
                 id="negative-pool-replicas"),
    pytest.param({"workers": [{"name": "scrape", "maxJobs": 8}]}, "- at '/workers/0': missing property 'queue'\n",
                 id="a-pool-without-a-queue"),
    pytest.param({"redis": {"existingSecret": None}}, "- at '/redis': missing property 'existingSecret'\n",
                 id="no-redis-secret"),
    pytest.param({"redis": {"existingSecret": ""}}, "- at '/redis/existingSecret': minLength: got 0, want 1\n",
                 id="empty-redis-secret"),
    pytest.param({"redis": {"password": "hunter2"}}, "- at '/redis': additional properties 'password' not allowed\n",
                 id="a-password-in-values"),
    pytest.param({"workers": [pool(queue="a,b")]},
                 "- at '/workers/0/queue': 'a,b' does not match pattern '^[^,\\\\s]([^,]*[^,\\\\s])?$'\n",
                 id="a-queue-with-a-comma"),
    pytest.param({"redis": {"urlKey": "", "host": "redis://redis:6379"}},
                 "- at '/redis/host': 'redis://redis:6379' does not match pattern", id="a-url-as-host"),
    pytest.param({"dashboard": {"enabled": "yes"}}, "- at '/dashboard/enabled': got string, want boolean",
                 id="dashboard-enabled-not-a-boolean"),
])
def test_the_schema_refuses_bad_values_with_a_message_naming_them(values: dict[str, Any], message: str) -> None:
    error = render_error(values)
    assert error.startswith(SCHEMA_REFUSED)
    assert message in error


@pytest.mark.parametrize(("values", "message"), [
    pytest.param({"workers": [pool(autoscaling={"minReplicas": 3, "maxReplicas": 2})]},
                 "workers[0] (default): autoscaling.maxReplicas (2) must be at least autoscaling.minReplicas (3)",
                 id="max-below-min"),
    pytest.param({"workers": [pool(), pool(queue="other")]},
                 'workers[1] (default): two worker pools are named "default" (workers[0] and workers[1]); '
                 "every pool needs a name of its own", id="two-pools-one-name"),
    pytest.param({"workers": [pool(autoscaling={"minReplicas": 0})]},
                 "workers[0] (default): autoscaling.minReplicas 0 needs autoscaling.provider keda "
                 "(an HPA cannot scale to zero)", id="zero-replicas-on-hpa"),
    pytest.param({"redis": {"tls": {"caBundle": {"secretName": "a", "configMapName": "b"}}}},
                 "redis.tls.caBundle: set secretName or configMapName, not both", id="two-ca-sources"),
    pytest.param({"redis": {"urlKey": "", "host": "redis", "tls": {"caBundle": {"secretName": "ca"}}}},
                 "redis.tls.caBundle is set but redis.tls.enabled is false", id="ca-without-tls"),
    pytest.param({"postgresql": {"existingSecret": "pg", "caBundle": {"secretName": "ca"}}},
                 "postgresql.caBundle is set but postgresql.urlKey names a whole URL", id="ca-with-a-whole-url"),
    pytest.param({"operator": {"serviceAccount": {"create": False}}},
                 "operator.serviceAccount.name: name the existing ServiceAccount", id="no-service-account"),
    pytest.param({"dashboard": {"enabled": True, "port": 8080}},
                 "dashboard.port: 8080 is the operator's probes and metrics port (unauthenticated); pick another",
                 id="dashboard-on-the-metrics-port"),
])
def test_templates_refuse_values_that_would_break_with_a_message_naming_them(
        values: dict[str, Any], message: str) -> None:
    error = render_error(values)
    assert error.startswith("execution error at (kubearq/templates/")
    assert message in error


@pytest.mark.parametrize(("values", "message"), [
    pytest.param({"redis": {"urlKey": "", "host": ""}}, "redis.host: set the Redis host name to build the URL from, "
                 "or redis.urlKey to the key of redis.existingSecret that holds the whole URL", id="redis-host"),
    pytest.param({"postgresql": {"existingSecret": "pg", "urlKey": "", "host": ""}},
                 "postgresql.host: set the PostgreSQL host name to build the URL from", id="postgresql-host"),
])
def test_without_the_schema_a_url_that_would_break_still_fails_naming_the_value(
        tmp_path: Path, values: dict[str, Any], message: str) -> None:
    # `helm install --skip-schema-validation` passes the schema by: the templates refuse on their own
    copy = tmp_path / "kubearq"
    shutil.copytree(CHART_DIR, copy)
    (copy / "values.schema.json").unlink()
    with helm.Chart.load(copy) as unchecked, pytest.raises(helm.HelmRenderError) as refused:
        unchecked.render(values, name="kubearq", namespace=NAMESPACE)
    assert message in str(refused.value)


# --- autoscaling -------------------------------------------------------------------------------------------------

def test_each_pool_scales_on_its_own_queues_busy_jobs_only() -> None:
    objects = render({"workers": THREE_POOLS})
    selected = {hpa["spec"]["scaleTargetRef"]["name"]: hpa["spec"]["metrics"] for hpa in
                by_kind(objects, "HorizontalPodAutoscaler")}
    assert selected == {
        f"kubearq-worker-{item['name']}": [{"type": "External", "external": {
            "metric": {"name": "kubearq_queue_busy_jobs", "selector": {"matchLabels": {
                "queue_label": label_safe(item["queue"])}}},
            "target": {"type": "AverageValue", "averageValue": str(target)}}}]
        for item, target in zip(THREE_POOLS, (16, 32, 4), strict=True)}


def test_each_scaled_object_queries_its_own_queue_without_turning_no_data_into_zero() -> None:
    objects = render({"autoscaling": {"provider": "keda"}, "workers": THREE_POOLS[:2]})
    triggers: dict[str, list[dict[str, Any]]] = {
        obj["spec"]["scaleTargetRef"]["name"]: obj["spec"]["triggers"] for obj in by_kind(objects, "ScaledObject")}
    assert {name: [(trigger["type"], trigger["metadata"]["query"], trigger["metadata"]["threshold"],
                    trigger["metadata"]["ignoreNullValues"]) for trigger in found]
            for name, found in triggers.items()} == {
        "kubearq-worker-default": [("prometheus", 'max(kubearq_queue_busy_jobs{namespace="kubearq",'
                                    'queue_label="arq-queue-1df91f41fe"})', "16", "false")],
        "kubearq-worker-scrape": [("prometheus", 'max(kubearq_queue_busy_jobs{namespace="kubearq",'
                                   'queue_label="scrape"})', "32", "false")],
    }
    assert by_kind(objects, "HorizontalPodAutoscaler") == []
    assert by_kind(objects, "ConfigMap") == []


@pytest.mark.parametrize("queue", [
    "arq:queue", "default", "scrape.high", "a/b", "a:b", "-edge-", "x" * 63, "y" * 64, "über-queue", "日本", "a b",
    "A_" + "z" * 70 + ":tail", ":::",
])
def test_the_chart_names_a_queue_as_the_operator_labels_it(queue: str) -> None:
    objects = render({"workers": [pool(queue=queue)]})
    hpa = named(objects, "HorizontalPodAutoscaler", "kubearq-worker-default")
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["selector"]["matchLabels"] == {
        "queue_label": label_safe(queue)}


@pytest.mark.parametrize(("job_timeout", "window"), [(60, 300), (300, 300), (1800, 1800), (86_400, 3600)])
def test_default_behavior_scales_up_at_once_and_down_slower_than_the_longest_job(
        job_timeout: int, window: int) -> None:
    objects = render({"workers": [pool(jobTimeoutSeconds=job_timeout)]})
    behavior = named(objects, "HorizontalPodAutoscaler", "kubearq-worker-default")["spec"]["behavior"]
    assert behavior == {
        "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max", "policies": [
            {"type": "Percent", "value": 100, "periodSeconds": 15}, {"type": "Pods", "value": 4, "periodSeconds": 15}]},
        "scaleDown": {"stabilizationWindowSeconds": window, "selectPolicy": "Max", "policies": [
            {"type": "Pods", "value": 1, "periodSeconds": 60}]},
    }


def test_a_pools_behavior_replaces_the_default_for_the_hpa_and_keda() -> None:
    custom = {"scaleDown": {"stabilizationWindowSeconds": 900, "policies": [
        {"type": "Percent", "value": 10, "periodSeconds": 120}]}}
    for provider, kind, path in (("hpa", "HorizontalPodAutoscaler", ("spec", "behavior")),
                                 ("keda", "ScaledObject", ("spec", "advanced", "horizontalPodAutoscalerConfig",
                                                           "behavior"))):
        values = {"autoscaling": {"provider": provider}, "workers": [pool(autoscaling={"behavior": custom})]}
        found: Any = named(render(values), kind, "kubearq-worker-default")
        for key in path:
            found = found[key]
        assert found == custom


def test_the_adapter_rule_serves_the_busy_gauge_per_queue_label_with_max_over_replicas() -> None:
    config = named(render(), "ConfigMap", "kubearq-prometheus-adapter")["data"]
    rule = {"seriesQuery": 'kubearq_queue_busy_jobs{namespace!="",queue_label!=""}',
            "resources": {"overrides": {"namespace": {"resource": "namespace"}}},
            "name": {"matches": "^kubearq_queue_busy_jobs$", "as": "kubearq_queue_busy_jobs"},
            "metricsQuery": "max by (queue_label) (<<.Series>>{<<.LabelMatchers>>})"}
    assert yaml.safe_load(config["config.yaml"]) == {"externalRules": [rule]}
    assert yaml.safe_load(config["values.yaml"]) == {"rules": {"external": [rule]}}
    # the rule documented in the chart's README is this one
    assert "metricsQuery: max by (queue_label) (<<.Series>>{<<.LabelMatchers>>})" in CHART_README.read_text()


def test_the_busy_target_decides_replicas_as_the_hpa_computes_them() -> None:
    hpa = named(render({"workers": [pool(maxJobs=8, autoscaling={"minReplicas": 1, "maxReplicas": 5})]}),
                "HorizontalPodAutoscaler", "kubearq-worker-default")["spec"]
    target = float(hpa["metrics"][0]["external"]["target"]["averageValue"])
    desired = {busy: min(hpa["maxReplicas"], max(hpa["minReplicas"], math.ceil(busy / target)))
               for busy in (0, 1, 8, 9, 33, 100)}
    assert desired == {0: 1, 1: 1, 8: 1, 9: 2, 33: 5, 100: 5}


# --- network policy ----------------------------------------------------------------------------------------------

def test_workers_reach_the_internet_but_no_private_or_metadata_address(rendered: dict[str, list[KubeObject]]) -> None:
    objects = rendered["network-policy"]
    worker = named(objects, "NetworkPolicy", "kubearq-worker")["spec"]
    blocks = [peer["ipBlock"] for rule in worker["egress"] for peer in rule.get("to", []) if "ipBlock" in peer]
    assert blocks[0] == {"cidr": "0.0.0.0/0", "except": [
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "127.0.0.0/8"]}
    assert blocks[1]["cidr"] == "::/0"
    assert "fe80::/10" in blocks[1]["except"]
    ports = {(port["protocol"], port["port"]) for rule in worker["egress"] for port in rule.get("ports", [])}
    assert ports == {("UDP", 53), ("TCP", 53), ("TCP", 6379), ("TCP", 5432)}
    redis_rule = next(rule for rule in worker["egress"] if {"protocol": "TCP", "port": 6379} in rule.get("ports", []))
    assert redis_rule["to"] == VALUE_SETS["network-policy"]["networkPolicy"]["redisTo"]
    operator = named(objects, "NetworkPolicy", "kubearq-operator")["spec"]
    operator_ports = {port["port"] for rule in operator["egress"] for port in rule.get("ports", [])}
    assert operator_ports == {53, 443, 6443, 6379}  # DNS, the API server, Redis: no internet
    for policy in (worker, operator):
        assert policy["policyTypes"] == ["Ingress", "Egress"]
        assert policy["ingress"] == [{"ports": [{"protocol": "TCP", "port": "http"}]}]


def test_monitoring_scrapes_the_operator_service_and_the_worker_pods(rendered: dict[str, list[KubeObject]]) -> None:
    objects = rendered["monitoring-on"]
    service = named(objects, "Service", "kubearq-operator")
    monitor = named(objects, "ServiceMonitor", "kubearq-operator")["spec"]
    assert monitor["selector"]["matchLabels"] == service["spec"]["selector"]
    assert monitor["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert named(objects, "ServiceMonitor", "kubearq-operator")["metadata"]["labels"]["release"] == "prometheus"
    pods = named(objects, "PodMonitor", "kubearq-worker")["spec"]
    assert pods["selector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    for _, spec in pod_specs(objects):
        assert spec["containers"][0]["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]


# --- values: documented, in the schema, and the generated files ---------------------------------------------------

def values_text() -> str:
    return (CHART_DIR / "values.yaml").read_text(encoding="utf-8")


def test_every_value_is_documented_with_a_helm_docs_comment() -> None:
    documented = {value.path for value in documented_values(values_text())}
    undocumented = [".".join(path) for path in leaf_paths(yaml.safe_load(values_text()))
                    if not any(".".join(path[:depth]) in documented for depth in range(1, len(path) + 1))]
    assert undocumented == []
    assert all(value.description for value in documented_values(values_text()))


def schema_at(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    definitions = schema["$defs"]
    node: dict[str, Any] | None = schema
    for key in path:
        assert node is not None
        while "$ref" in node:
            node = definitions[node["$ref"].rsplit("/", 1)[1]]
        properties, free_form = node.get("properties", {}), node.get("additionalProperties")
        if key not in properties and not isinstance(free_form, dict):
            return None
        node = properties.get(key, free_form)
    return node


def test_the_schema_covers_every_value_and_refuses_unknown_ones() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    values = yaml.safe_load(values_text())
    missing = [".".join(path) for path in leaf_paths(values) if schema_at(schema, path) is None]
    assert missing == []
    pool_item = schema["properties"]["workers"]["items"]["properties"]
    assert set(pool_item) - {"name", "queue"} == set(schema["properties"]["workerDefaults"]["properties"])
    for path in leaf_paths(values["workers"][0]):
        assert path[0] in pool_item
    assert render_error({"operatr": {"replicas": 3}}).endswith("- at '': additional properties 'operatr' not allowed\n")


def test_the_schema_is_draft_07_so_helm_3s_validator_reads_it_the_same() -> None:
    # Helm before 3.18 validates with gojsonschema (drafts 4 to 7); Helm 4 reads draft-07 too
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    checker = jsonschema.Draft7Validator(schema)
    for values in VALUE_SETS.values():
        assert list(checker.iter_errors(chart().merge_values(values))) == []
    assert [error.message for error in checker.iter_errors(chart().merge_values(
        {"autoscaling": {"provider": "both"}}))] == ["'both' is not one of ['hpa', 'keda']"]


def test_the_chart_readme_values_table_is_generated_from_values_yaml() -> None:
    readme = CHART_README.read_text(encoding="utf-8")
    assert readme_with_table(readme, values_text()) == readme, "run: .venv/bin/python -m tests.chart --write"


def test_the_kustomize_base_is_the_chart_rendered_with_its_defaults() -> None:
    assert base_drift() == [], "run: .venv/bin/python -m tests.chart --write"


def test_kubectl_kustomize_builds_the_default_render_offline_and_it_validates(
        rendered: dict[str, list[KubeObject]]) -> None:
    built = subprocess.run(["kubectl", "kustomize", str(MANIFESTS)], capture_output=True, text=True, check=True,
                           timeout=60)
    objects = [doc for doc in yaml.safe_load_all(built.stdout) if doc]

    def key(obj: KubeObject) -> str:
        return json.dumps(obj, sort_keys=True)

    namespace = [obj for obj in objects if obj["kind"] == "Namespace"]
    assert [obj["metadata"]["name"] for obj in namespace] == [NAMESPACE]
    assert namespace[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert sorted(map(key, (obj for obj in objects if obj["kind"] != "Namespace"))) == sorted(
        map(key, rendered["defaults"]))
    errors = [error for minor in kubernetes_minors() for obj in objects for error in validation_errors(obj, minor)]
    assert errors == []
