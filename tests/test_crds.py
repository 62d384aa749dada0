"""The committed CRDs are what the models generate, and a real API server would accept them."""

from __future__ import annotations

import filecmp
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import kubernetes_validate
import pytest
import yaml

from kubearq.cli import main
from kubearq.demo.crdrules import apply_defaults, cel_failures, cel_rules, is_transition_rule, walk
from kubearq.operator.crds import RESOURCES, custom_resource_definition
from kubearq.operator.queuepolicy import QueuePolicySpec, QueuePolicyStatus
from kubearq.operator.reference import update_readme
from kubearq.operator.scraperequest import (
    FROZEN_SPEC_FIELDS,
    FROZEN_SPEC_MESSAGE,
    ScrapeRequestSpec,
    ScrapeRequestStatus,
)
from kubearq.operator.syncschedule import SyncScheduleSpec, SyncScheduleStatus
from kubearq.operator.validation import check_files
from tests.crd_rules import (
    REPO,
    JsonObject,
    load_crds,
    schema_of,
    server_problems,
    structural_problems,
    unbounded,
    version_of,
)

CRDS = load_crds()
EXAMPLES = sorted((REPO / "manifests" / "examples").glob("*.yaml"))


def example_objects() -> list[JsonObject]:
    objects = []
    for path in EXAMPLES:
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(document, dict) and document.get("apiVersion") == "kubearq.dev/v1alpha1":
                objects.append(cast(JsonObject, document))
    return objects


@pytest.mark.parametrize("folder", ["crds", "charts/kubearq/crds"])
def test_committed_crds_are_what_the_models_generate(tmp_path: Path, folder: str) -> None:
    assert main(["crds", "--output", str(tmp_path)]) == 0
    generated = sorted(path.name for path in tmp_path.iterdir())
    assert generated == ["kubearq.dev_queuepolicies.yaml", "kubearq.dev_scraperequests.yaml",
                         "kubearq.dev_syncschedules.yaml"]
    comparison = filecmp.dircmp(tmp_path, REPO / folder)
    assert comparison.left_only == comparison.right_only == []
    _, mismatch, errors = filecmp.cmpfiles(tmp_path, REPO / folder, generated, shallow=False)
    assert mismatch == errors == [], f"regenerate with `kubearq crds --output {folder}`"


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_schema_is_structural(kind: str) -> None:
    assert structural_problems(schema_of(CRDS[kind])) == []


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_every_string_list_and_map_is_bounded(kind: str) -> None:
    assert unbounded(schema_of(CRDS[kind])) == []


def test_unknown_fields_are_preserved_only_in_job_arguments() -> None:
    preserved = [
        f"{kind}{path}"
        for kind, crd in CRDS.items()
        for path, node in walk(schema_of(crd))
        if node.get("x-kubernetes-preserve-unknown-fields")
    ]
    assert preserved == ["SyncSchedule.spec.job.args[]", "SyncSchedule.spec.job.kwargs"]


def test_worst_case_spec_fits_far_below_etcd_limit() -> None:
    """Every bounded string at its maxLength, every list at its maxItems: still under 1 MiB."""

    def worst(node: JsonObject) -> float:
        kind = node.get("type")
        if kind == "string":
            return float(cast(int, node.get("maxLength", 64))) + 3
        if kind == "array":
            return cast(int, node["maxItems"]) * (worst(cast(JsonObject, node.get("items", {}))) + 2)
        if kind == "object" and "properties" in node:
            return sum(worst(cast(JsonObject, sub)) + 32 for sub in cast(JsonObject, node["properties"]).values())
        if kind == "object":
            return cast(int, node.get("maxProperties", 0)) * (64 + worst(cast(JsonObject, node.get(
                "additionalProperties", {}))))
        return 24.0

    for crd in CRDS.values():
        spec = cast(JsonObject, cast(JsonObject, schema_of(crd)["properties"])["spec"])
        if "kwargs" not in str(spec):
            assert worst(spec) < 1024 * 1024


@pytest.mark.parametrize("version", ["1.30.0", "1.33.0", kubernetes_validate.latest_version()])
@pytest.mark.parametrize("kind", sorted(CRDS))
def test_crd_is_a_valid_custom_resource_definition(kind: str, version: str) -> None:
    kubernetes_validate.validate(CRDS[kind], version, strict=True)


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_crd_has_status_subresource_short_names_and_category(kind: str) -> None:
    crd = CRDS[kind]
    names = cast(JsonObject, cast(JsonObject, crd["spec"])["names"])
    assert version_of(crd)["subresources"] == {"status": {}}
    assert names["categories"] == ["kubearq"]
    assert names["shortNames"]


@pytest.mark.parametrize(("kind", "columns"), [
    ("SyncSchedule", ["Schedule", "Suspend", "Last Schedule", "Next", "Active", "Age"]),
    ("ScrapeRequest", ["Phase", "Progress", "Failed", "Age"]),
])
def test_printer_columns_point_at_real_fields(kind: str, columns: list[str]) -> None:
    crd = CRDS[kind]
    printed = cast(list[JsonObject], version_of(crd)["additionalPrinterColumns"])
    assert [column["name"] for column in printed] == columns
    paths = {path for path, _ in walk(schema_of(crd))}
    for column in printed:
        path = cast(str, column["jsonPath"])
        assert path == ".metadata.creationTimestamp" or path in paths, path


def test_examples_cover_both_kinds() -> None:
    assert {obj["kind"] for obj in example_objects()} == {"SyncSchedule", "ScrapeRequest"}


@pytest.mark.parametrize("obj", example_objects(), ids=lambda obj: cast(JsonObject, obj["metadata"])["name"])
def test_example_passes_the_api_server_schema_and_cel_rules(obj: JsonObject) -> None:
    assert server_problems(CRDS[cast(str, obj["kind"])], obj) == []


def test_examples_pass_kubearq_validate() -> None:
    report = check_files(EXAMPLES)
    assert report.valid
    assert [str(problem) for document in report.documents for problem in document.problems] == []


def test_validate_reports_the_field_and_the_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: kubearq.dev/v1alpha1\nkind: SyncSchedule\nmetadata: {name: nightly}\n"
        "spec: {schedule: '0 3 * *', job: {function: compact_snapshots}}\n"
    )
    [document] = check_files([bad]).documents
    assert [str(problem) for problem in document.problems] == [
        "spec.schedule: '0 3 * *' has 4 fields, cron needs 5 "
        "(minute hour day-of-month month day-of-week); e.g. '*/15 * * * *' (every 15 minutes), "
        "'0 3 * * *' (daily 03:00) or '@daily'"
    ]
    assert main(["validate", str(bad)]) == 1


FULL_SYNC_SCHEDULE = {
    "schedule": "*/5 * * * *", "timeZone": "Europe/Berlin", "suspend": True,
    "job": {"function": "sync_connections", "args": [1, "two", {"three": [3]}], "kwargs": {"mode": "backfill"},
            "queue": "arq:sync", "timeoutSeconds": 60, "maxTries": 2, "keepResultSeconds": 3600},
    "concurrencyPolicy": "Replace", "startingDeadlineSeconds": 120, "jitterSeconds": 7,
    "successfulRunsHistoryLimit": 5, "failedRunsHistoryLimit": 2,
}
FULL_SCRAPE_REQUEST = {
    "urls": ["https://example.com/a", "http://example.com/b"],
    "links": {"selector": "a.card", "pattern": "/e/[0-9]+", "sameSite": False, "maxDetailPages": 10},
    "extract": {"css": {"fields": {"title": "h1", "start": "time @datetime"}}},
    "backend": "Firecrawl",
    "firecrawl": {"apiKeySecretRef": {"name": "fc", "key": "token"}, "url": "https://fc.internal.example"},
    "rateLimit": {"requestsPerMinute": 120, "burst": 4, "perHost": True},
    "retry": {"maxTries": 5, "backoffSeconds": 2, "maxBackoffSeconds": 60, "timeoutSeconds": 10,
              "maxTimeoutSeconds": 40},
    "fetch": {"obeyRobotsTxt": False, "allowPrivateNetworks": True, "maxResponseBytes": 2048, "userAgent": "bot/1"},
    "queue": "arq:scrape", "deletionPolicy": "Delete",
}
FULL_SYNC_STATUS = {
    "observedGeneration": 3,
    "conditions": [{"type": "Ready", "status": "True", "reason": "Scheduled", "message": "next tick at 10:05",
                    "lastTransitionTime": "2026-11-24T10:00:00Z", "observedGeneration": 3}],
    "lastScheduleTime": "2026-11-24T10:00:00Z", "nextScheduleTime": "2026-11-24T10:05:00Z",
    "active": ["kubearq:ss:abc:1764000000"], "activeCount": 1,
    "runs": [{"jobId": "kubearq:ss:abc:1764000000", "scheduledTime": "2026-11-24T10:00:00Z",
              "enqueuedTime": "2026-11-24T10:00:00.2Z", "outcome": "Failed", "finishTime": "2026-11-24T10:01:00Z",
              "error": "ValueError: boom", "trigger": "Backfill"}],
    "skippedTicks": 2, "missedTicks": 1,
    "lastTrigger": {"id": "20261124T100000-0a1b2c3d", "outcome": "Done", "message": "enqueued job j on queue q",
                    "handledTime": "2026-11-24T10:00:01Z", "requestedBy": "alice",
                    "jobId": "kubearq:manual:abc:20261124T100000-0a1b2c3d"},
    "lastBackfill": {"id": "20261124T100000-0a1b2c3e", "outcome": "Refused", "message": "too many ticks",
                     "handledTime": "2026-11-24T10:00:01Z", "requestedBy": "alice", "from": "2026-11-23T00:00:00Z",
                     "to": "2026-11-24T00:00:00Z", "ticks": 0, "enqueued": 0},
}
FULL_SCRAPE_STATUS = {
    "observedGeneration": 1,
    "conditions": [{"type": "Succeeded", "status": "False", "reason": "PagesFailed", "message": "2 pages failed",
                    "lastTransitionTime": "2026-11-24T10:00:00Z", "observedGeneration": 1}],
    "phase": "PartiallySucceeded",
    "listingPages": {"total": 2, "done": 2, "failed": 0, "deferred": 0},
    "detailPages": {"total": 10, "done": 8, "failed": 2, "deferred": 0},
    "progress": "12/12", "failedPages": 2,
    "startTime": "2026-11-24T09:00:00Z", "completionTime": "2026-11-24T10:00:00Z",
    "failedUrls": [{"url": "https://example.com/e/1", "error": "HTTP 500", "tries": 5}],
    "lastCancel": {"id": "20261124T100000-0a1b2c3d", "outcome": "Refused", "message": "already finished",
                     "handledTime": "2026-11-24T10:00:01Z", "requestedBy": "alice", "removed": 0, "aborted": 0},
}
SCRAPE_REQUEST_FROM_CONFIGMAP = {
    **{key: value for key, value in FULL_SCRAPE_REQUEST.items() if key != "urls"},
    "urlsFrom": {"configMapKeyRef": {"name": "pages", "key": "urls.txt"}},
    "extract": {"jsonLd": {"types": ["Event", "Product"]}},
}
FULL_QUEUE_POLICY = {
    "namespaces": {"names": ["team-a"], "matchLabels": {"kubearq.dev/tenant": "yes"},
                   "matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]}]},
    "queues": ["team-a:*", "arq:shared"], "functions": ["sync_*", "report"],
    "scrapeRequests": {"allowPrivateNetworks": True, "maxRequestsPerMinute": 600},
}
FULL_QUEUE_POLICY_STATUS = {
    "observedGeneration": 2,
    "conditions": [{"type": "Ready", "status": "True", "reason": "Applied", "message": "grants 3 namespaces",
                    "lastTransitionTime": "2026-11-24T10:00:00Z", "observedGeneration": 2}],
}
ROUND_TRIPS = [
    ("SyncSchedule", SyncScheduleSpec, FULL_SYNC_SCHEDULE, SyncScheduleStatus, FULL_SYNC_STATUS),
    ("ScrapeRequest", ScrapeRequestSpec, FULL_SCRAPE_REQUEST, ScrapeRequestStatus, FULL_SCRAPE_STATUS),
    ("ScrapeRequest", ScrapeRequestSpec, SCRAPE_REQUEST_FROM_CONFIGMAP, ScrapeRequestStatus, FULL_SCRAPE_STATUS),
    ("QueuePolicy", QueuePolicySpec, FULL_QUEUE_POLICY, QueuePolicyStatus, FULL_QUEUE_POLICY_STATUS),
]


def value_paths(value: object, path: str) -> set[str]:
    """Schema-style paths of every field set in a value (`.spec.urls[]`, `.spec.extract.css.fields{}`)."""
    paths = {path}
    if isinstance(value, list):
        for item in value:
            paths |= value_paths(item, f"{path}[]")
    elif isinstance(value, dict):
        for key, item in value.items():
            paths |= value_paths(item, f"{path}.{key}")
    return paths


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_round_trip_fixtures_set_every_field_of_spec_and_status(kind: str) -> None:
    schema_paths = {path for path, _ in walk(schema_of(CRDS[kind])) if path.startswith((".spec", ".status"))}
    covered: set[str] = set()
    for row in ROUND_TRIPS:
        if row[0] == kind:
            covered |= value_paths(row[2], ".spec") | value_paths(row[4], ".status")
    # Map values (`fields{}`) and free-form job arguments have no fixed names below them.
    covered = {path.split("{")[0] for path in covered}
    missing = {path for path in schema_paths - covered if not path.endswith("{}")}
    assert missing == set()


@pytest.mark.parametrize(("kind", "spec_model", "spec", "status_model", "status"), ROUND_TRIPS,
                         ids=["SyncSchedule", "ScrapeRequest-urls", "ScrapeRequest-urlsFrom", "QueuePolicy"])
def test_every_field_round_trips_model_schema_and_back(
    kind: str, spec_model: type[SyncScheduleSpec], spec: JsonObject,
    status_model: type[SyncScheduleStatus], status: JsonObject,
) -> None:
    for model, value in ((spec_model, spec), (status_model, status)):
        dumped = model.model_validate(value).model_dump(mode="json", by_alias=True, exclude_none=True)
        assert model.model_validate(dumped) == model.model_validate(value)
    obj = {"apiVersion": "kubearq.dev/v1alpha1", "kind": kind, "metadata": {"name": "full"},
           "spec": spec, "status": status}
    assert server_problems(CRDS[kind], obj) == []


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_server_defaults_equal_the_model_defaults(kind: str) -> None:
    """What the API server fills in is what the operator assumes when it re-validates the object."""
    resource = next(resource for resource in RESOURCES if resource.kind == kind)
    minimal = {"SyncSchedule": {"schedule": "@daily", "job": {"function": "f"}},
               "ScrapeRequest": {"urls": ["https://example.com/"]},
               "QueuePolicy": {"namespaces": {"names": ["team-a"]}, "queues": ["team-a:*"]}}[kind]
    spec_schema = cast(JsonObject, cast(JsonObject, schema_of(CRDS[kind])["properties"])["spec"])
    server_defaulted = apply_defaults(spec_schema, minimal)
    model_defaulted = resource.spec_model.model_validate(minimal).model_dump(
        mode="json", by_alias=True, exclude_none=True)
    assert server_defaulted == model_defaulted


def test_every_cel_rule_is_exercised_true_and_false() -> None:
    """Each rule holds on the examples and fails on a bad spec of the table with its own message."""
    from tests.test_models import BAD_SPECS

    for kind, crd in CRDS.items():
        schema = schema_of(crd)
        broken: set[str] = set()
        for case in BAD_SPECS.values():
            if case.kind == kind:
                obj = cast(JsonObject, apply_defaults(schema, {"spec": case.spec}))
                broken.update(failure.split(": ", 1)[1] for failure in cel_failures(schema, obj))
        rules = {message for _, rule, message in cel_rules(schema) if not is_transition_rule(rule)}
        assert rules, kind
        assert rules <= broken, f"rules never seen failing: {rules - broken}"
        for obj in example_objects():
            if obj["kind"] == kind:
                assert cel_failures(schema, cast(JsonObject, apply_defaults(schema, obj))) == []


# --- A ScrapeRequest's spec is fixed once created, but for deletionPolicy ----------------------------------

# One edit per frozen field of FULL_SCRAPE_REQUEST (as `kubectl apply` of a changed manifest would send).
FROZEN_EDITS: dict[str, dict[str, object]] = {
    "links": {"links": {**FULL_SCRAPE_REQUEST["links"], "maxDetailPages": 11}},  # type: ignore[dict-item]
    "extract": {"extract": {"css": {"fields": {"title": "h2", "start": "time @datetime"}}}},
    "backend": {"backend": "Http"},
    "firecrawl": {"firecrawl": {"apiKeySecretRef": {"name": "fc", "key": "other"}, "url": "https://fc.internal.example"}},
    "rateLimit": {"rateLimit": {"requestsPerMinute": 600, "burst": 4, "perHost": True}},
    "retry": {"retry": {**FULL_SCRAPE_REQUEST["retry"], "maxTries": 6}},  # type: ignore[dict-item]
    "fetch": {"fetch": {**FULL_SCRAPE_REQUEST["fetch"], "userAgent": "bot/2"}},  # type: ignore[dict-item]
    "queue": {"queue": "arq:other"},
    "urls": {"urls": ["https://example.com/a", "http://example.com/b", "https://example.com/c"]},
    "urlsFrom": {"urls": None, "urlsFrom": {"configMapKeyRef": {"name": "pages", "key": "urls.txt"}}},
}


def scrape_request(spec: Mapping[str, object]) -> dict[str, object]:
    return {"apiVersion": "kubearq.dev/v1alpha1", "kind": "ScrapeRequest", "metadata": {"name": "full"},
            "spec": {key: value for key, value in spec.items() if value is not None}}


def test_every_spec_field_but_deletion_policy_is_frozen_and_has_an_edit() -> None:
    properties = cast(JsonObject, cast(JsonObject, schema_of(CRDS["ScrapeRequest"])["properties"])["spec"])
    assert set(cast(JsonObject, properties["properties"])) - {"deletionPolicy"} == set(FROZEN_SPEC_FIELDS)
    assert set(FROZEN_EDITS) == set(FROZEN_SPEC_FIELDS)


@pytest.mark.parametrize("field", FROZEN_SPEC_FIELDS)
def test_the_api_server_refuses_an_edit_of_a_frozen_spec_field(field: str) -> None:
    edited = scrape_request({**FULL_SCRAPE_REQUEST, **FROZEN_EDITS[field]})
    assert server_problems(CRDS["ScrapeRequest"], edited) == []  # as a new object it is fine
    assert server_problems(CRDS["ScrapeRequest"], edited, old=scrape_request(FULL_SCRAPE_REQUEST)) == [
        f"spec: {FROZEN_SPEC_MESSAGE}"]


def test_removing_an_optional_spec_field_is_an_edit_too() -> None:
    without_firecrawl = scrape_request({**FULL_SCRAPE_REQUEST, "backend": "Http", "firecrawl": None})
    old = scrape_request({**FULL_SCRAPE_REQUEST, "backend": "Http"})
    assert server_problems(CRDS["ScrapeRequest"], without_firecrawl, old=old) == [f"spec: {FROZEN_SPEC_MESSAGE}"]


def test_deletion_policy_and_an_unchanged_spec_may_be_applied_again() -> None:
    old = scrape_request(FULL_SCRAPE_REQUEST)
    assert server_problems(CRDS["ScrapeRequest"], scrape_request(FULL_SCRAPE_REQUEST), old=old) == []
    retained = scrape_request({**FULL_SCRAPE_REQUEST, "deletionPolicy": "Retain"})
    assert server_problems(CRDS["ScrapeRequest"], retained, old=old) == []
    # Defaults the server filled in on create are not an edit when the manifest leaves them out.
    minimal = scrape_request({"urls": ["https://example.com/a"]})
    assert server_problems(CRDS["ScrapeRequest"], minimal, old=minimal) == []


def test_generator_inlines_refs_and_drops_null_branches() -> None:
    crd = custom_resource_definition(RESOURCES[1])
    spec = cast(JsonObject, cast(JsonObject, version_of(crd)["schema"])["openAPIV3Schema"])
    keys = {key for _, node in walk(spec) for key in node}
    assert not keys & {"$ref", "$defs", "anyOf", "title"}
    assert all(node.get("type") != "null" for _, node in walk(spec))


def test_readme_reference_is_what_the_models_generate() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert update_readme(readme) == readme, "regenerate with `kubearq crds --readme README.md`"
