"""The API access `kubearq operator` needs and nothing more: the one list the chart's roles and the README
are written from, and that a test on a real kube-apiserver runs the operator with (tests/test_rbac.py)."""

from __future__ import annotations

from typing import TypedDict

from kubearq.operator.resources import GROUP


class PolicyRule(TypedDict, total=False):
    apiGroups: list[str]
    resources: list[str]
    resourceNames: list[str]
    verbs: list[str]


WATCHED = ["syncschedules", "scraperequests"]


def operator_rules() -> list[PolicyRule]:
    """Rules on the watched namespaces (a ClusterRole, or a Role per namespace of `watchNamespaces`)."""
    return [
        # kopf's watch and the start-up listing
        PolicyRule(apiGroups=[GROUP], resources=list(WATCHED), verbs=["get", "list", "watch"]),
        # the leader's only writes to the objects: status, and its finalizer on ScrapeRequests
        PolicyRule(apiGroups=[GROUP], resources=[f"{plural}/status" for plural in WATCHED], verbs=["patch"]),
        PolicyRule(apiGroups=[GROUP], resources=["scraperequests"], verbs=["patch"]),
        # Events on the objects (the leader's and kopf's own warnings)
        PolicyRule(apiGroups=[""], resources=["events"], verbs=["create", "patch"]),
        # a ScrapeRequest's `urlsFrom`
        PolicyRule(apiGroups=[""], resources=["configmaps"], verbs=["get"]),
    ]


def lease_rules(lease_name: str) -> list[PolicyRule]:
    """Rules in the Lease's namespace: create it (RBAC cannot name what does not exist yet), then renew that one."""
    return [
        PolicyRule(apiGroups=["coordination.k8s.io"], resources=["leases"], verbs=["create"]),
        PolicyRule(apiGroups=["coordination.k8s.io"], resources=["leases"], resourceNames=[lease_name],
                   verbs=["get", "update"]),
    ]


def tenancy_rules() -> list[PolicyRule]:
    """Cluster-wide reads the leader decides tenancy with (unless TENANCY=open): the QueuePolicies, and the
    namespaces' labels their selectors match; and the policies' status (applied, or ignored and why)."""
    return [
        PolicyRule(apiGroups=[GROUP], resources=["queuepolicies"], verbs=["get", "list", "watch"]),
        PolicyRule(apiGroups=[GROUP], resources=["queuepolicies/status"], verbs=["patch"]),
        PolicyRule(apiGroups=[""], resources=["namespaces"], verbs=["get", "list", "watch"]),
    ]
