"""The API access `kubearq operator` needs and nothing more: the one list the chart's roles and the README
are written from, and that a test on a real kube-apiserver runs the operator with (tests/test_rbac.py); and the
roles for people that the dashboard's SubjectAccessReviews are answered from (the viewer, the operator-user)."""

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


# --- the dashboard (kubearq.operator.console) ---------------------------------------------------------------------

FAILED_JOBS = "failedjobs"
"""A virtual resource of kubearq.dev: no API serves it, but RBAC rules and SubjectAccessReviews may name it, so
that who may see, re-drive or discard failed jobs is decided by Kubernetes RBAC as for the two real kinds."""
QUEUES = "queues"
"""A virtual resource of kubearq.dev too: the dashboard's queue statistics (ready, running, deferred, oldest age)."""
VIEW_VERBS = ["get", "list", "watch"]
USER_VERBS: dict[str, list[str]] = {
    "syncschedules": ["trigger", "suspend"],  # `suspend` covers resuming too, as `patch` would
    "scraperequests": ["cancel"],
    FAILED_JOBS: ["redrive", "discard"],
}
"""The custom verbs the dashboard authorizes its actions with (SubjectAccessReview), by resource."""


def dashboard_review_rules() -> list[PolicyRule]:
    """Cluster-wide, for the dashboard only: who a bearer token is (TokenReview), and whether that user may do what
    a view or a button asks (SubjectAccessReview)."""
    return [
        PolicyRule(apiGroups=["authentication.k8s.io"], resources=["tokenreviews"], verbs=["create"]),
        PolicyRule(apiGroups=["authorization.k8s.io"], resources=["subjectaccessreviews"], verbs=["create"]),
    ]


def dashboard_write_rules() -> list[PolicyRule]:
    """On the watched namespaces, for the dashboard only: an authorized trigger or suspend/resume is carried out as
    the operator, by patching the SyncSchedule (an annotation, or `spec.suspend`); ScrapeRequests it may patch
    already (its finalizer), which the cancel annotation needs."""
    return [PolicyRule(apiGroups=[GROUP], resources=["syncschedules"], verbs=["patch"])]


def viewer_rules() -> list[PolicyRule]:
    """The ClusterRole `<release>-viewer`, for people: see schedules, scrape requests and failed jobs (bind it with a
    RoleBinding for one namespace, or a ClusterRoleBinding for all, failed jobs of no resource included)."""
    return [
        PolicyRule(apiGroups=[GROUP], resources=[*WATCHED, f"{WATCHED[0]}/status", f"{WATCHED[1]}/status"],
                   verbs=list(VIEW_VERBS)),
        PolicyRule(apiGroups=[GROUP], resources=[FAILED_JOBS, QUEUES], verbs=["get", "list"]),
    ]


def operator_user_rules() -> list[PolicyRule]:
    """The ClusterRole `<release>-operator-user`, for people who run things: the viewer's reads, and every action.

    The dashboard checks the custom verbs and acts as the operator; the CLI (`kubearq schedule trigger`, `scrape
    cancel`, ...) patches the resource as its caller, so the role grants `patch` on both resources too (which also
    lets its holders edit their spec, as `kubectl edit` would)."""
    return [
        *viewer_rules(),
        *(PolicyRule(apiGroups=[GROUP], resources=[resource], verbs=list(verbs))
          for resource, verbs in USER_VERBS.items()),
        PolicyRule(apiGroups=[GROUP], resources=list(WATCHED), verbs=["patch"]),
    ]
