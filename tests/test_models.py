"""Bad specs get one clear message naming the field; the API server's schema refuses what it can."""

from __future__ import annotations

from typing import NamedTuple

import pytest
from pydantic import ValidationError

from kubearq.operator.crds import RESOURCES
from kubearq.operator.queuepolicy import SELECTOR_MESSAGE, VALUES_MESSAGE
from kubearq.operator.resources import describe_validation_error
from kubearq.operator.scraperequest import ScrapeRequestSpec
from kubearq.operator.syncschedule import SyncScheduleSpec
from tests.crd_rules import load_crds, server_problems

JOB = {"function": "sync_connections"}
URLS = ["https://example.com/list"]
CRON_HINT = "e.g. '*/15 * * * *' (every 15 minutes), '0 3 * * *' (daily 03:00) or '@daily'"
URL_HINT = "use a URL like 'https://example.com/events'"


class BadSpec(NamedTuple):
    kind: str
    spec: dict[str, object]
    message: str
    server: str | None
    """What the API server's schema or CEL rule says; None where only the operator can tell."""


BAD_SPECS = {
    "cron minute out of range": BadSpec(
        "SyncSchedule", {"schedule": "61 * * * *", "job": JOB},
        f"spec.schedule: '61 * * * *' is not a valid cron expression (bad minute); {CRON_HINT}", None),
    "cron with three fields": BadSpec(
        "SyncSchedule", {"schedule": "* * *", "job": JOB},
        "spec.schedule: '* * *' has 3 fields, cron needs 5 (minute hour day-of-month month day-of-week); "
        f"{CRON_HINT}", None),
    "cron with a seconds field": BadSpec(
        "SyncSchedule", {"schedule": "0 2 * * * *", "job": JOB},
        "spec.schedule: '0 2 * * * *' has 6 fields, cron needs 5 (minute hour day-of-month month day-of-week); "
        f"{CRON_HINT}", None),
    "unknown cron macro": BadSpec(
        "SyncSchedule", {"schedule": "@every 5m", "job": JOB},
        "spec.schedule: '@every 5m' is not a known macro; use one of @yearly, @annually, @monthly, @weekly, "
        f"@daily, @midnight, @hourly or 5 fields, {CRON_HINT}", None),
    "cron that never fires (30 February)": BadSpec(
        "SyncSchedule", {"schedule": "0 0 30 2 *", "job": JOB},
        f"spec.schedule: '0 0 30 2 *' is not a valid cron expression (bad day-of-month); {CRON_HINT}", None),
    "empty schedule": BadSpec(
        "SyncSchedule", {"schedule": "", "job": JOB},
        "spec.schedule: String should have at least 1 character", "spec.schedule: '' should be non-empty"),
    "unknown time zone": BadSpec(
        "SyncSchedule", {"schedule": "@daily", "timeZone": "Mars/Olympus", "job": JOB},
        "spec.timeZone: 'Mars/Olympus' is not an IANA time zone; "
        "use a name like 'UTC', 'Europe/Berlin' or 'America/New_York'", None),
    "negative jitter": BadSpec(
        "SyncSchedule", {"schedule": "@daily", "job": JOB, "jitterSeconds": -1},
        "spec.jitterSeconds: Input should be greater than or equal to 0",
        "spec.jitterSeconds: -1 is less than the minimum of 0"),
    "starting deadline under 10 s": BadSpec(
        "SyncSchedule", {"schedule": "@daily", "job": JOB, "startingDeadlineSeconds": 5},
        "spec: startingDeadlineSeconds must be at least 10 when set",
        "spec: startingDeadlineSeconds must be at least 10 when set"),
    "jitter as long as the deadline": BadSpec(
        "SyncSchedule", {"schedule": "@daily", "job": JOB, "startingDeadlineSeconds": 30, "jitterSeconds": 30},
        "spec: jitterSeconds must be less than startingDeadlineSeconds, or jittered ticks would count as missed",
        "spec: jitterSeconds must be less than startingDeadlineSeconds, or jittered ticks would count as missed"),
    "unknown concurrency policy": BadSpec(
        "SyncSchedule", {"schedule": "@daily", "job": JOB, "concurrencyPolicy": "Skip"},
        "spec.concurrencyPolicy: Input should be 'Allow', 'Forbid' or 'Replace'",
        "spec.concurrencyPolicy: 'Skip' is not one of ['Allow', 'Forbid', 'Replace']"),
    "policy in the wrong case": BadSpec(
        "SyncSchedule", {"schedule": "@daily", "job": JOB, "concurrencyPolicy": "forbid"},
        "spec.concurrencyPolicy: Input should be 'Allow', 'Forbid' or 'Replace'",
        "spec.concurrencyPolicy: 'forbid' is not one of ['Allow', 'Forbid', 'Replace']"),
    "no job": BadSpec(
        "SyncSchedule", {"schedule": "@daily"},
        "spec.job: Field required", "spec: 'job' is a required property"),
    "dotted function path": BadSpec(
        "SyncSchedule", {"schedule": "@daily", "job": {"function": "os.system"}},
        "spec.job.function: 'os.system' is not a worker function name; "
        "use the name the worker registers, e.g. 'sync_connections'",
        "spec.job.function: 'os.system' does not match '^[A-Za-z_][A-Za-z0-9_]*$'"),
    "zero job timeout": BadSpec(
        "SyncSchedule", {"schedule": "@daily", "job": {**JOB, "timeoutSeconds": 0}},
        "spec.job.timeoutSeconds: Input should be greater than or equal to 1",
        "spec.job.timeoutSeconds: 0 is less than the minimum of 1"),
    "negative max tries": BadSpec(
        "SyncSchedule", {"schedule": "@daily", "job": {**JOB, "maxTries": -3}},
        "spec.job.maxTries: Input should be greater than or equal to 1",
        "spec.job.maxTries: -3 is less than the minimum of 1"),
    "job arguments too large": BadSpec(
        "SyncSchedule", {"schedule": "@daily", "job": {**JOB, "kwargs": {"blob": "x" * 70_000}}},
        "spec.job: args and kwargs take 70018 bytes as JSON, at most 65536 fit; "
        "pass a reference (a key, a URL) instead of the data", None),
    "history limit too high": BadSpec(
        "SyncSchedule", {"schedule": "@daily", "job": JOB, "successfulRunsHistoryLimit": 1000},
        "spec.successfulRunsHistoryLimit: Input should be less than or equal to 100",
        "spec.successfulRunsHistoryLimit: 1000 is greater than the maximum of 100"),
    "empty url list": BadSpec(
        "ScrapeRequest", {"urls": []},
        "spec.urls: List should have at least 1 item after validation, not 0", "spec.urls: [] should be non-empty"),
    "neither urls nor urlsFrom": BadSpec(
        "ScrapeRequest", {},
        "spec: set exactly one of urls and urlsFrom", "spec: set exactly one of urls and urlsFrom"),
    "both urls and urlsFrom": BadSpec(
        "ScrapeRequest", {"urls": URLS, "urlsFrom": {"configMapKeyRef": {"name": "pages", "key": "urls.txt"}}},
        "spec: set exactly one of urls and urlsFrom", "spec: set exactly one of urls and urlsFrom"),
    "ftp url": BadSpec(
        "ScrapeRequest", {"urls": ["ftp://example.com/list"]},
        f"spec.urls[0]: 'ftp://example.com/list' is not an http(s) URL; {URL_HINT}",
        "spec.urls.0: 'ftp://example.com/list' does not match '^[Hh][Tt][Tt][Pp][Ss]?://'"),
    "file url": BadSpec(
        "ScrapeRequest", {"urls": ["file:///etc/passwd"]},
        f"spec.urls[0]: 'file:///etc/passwd' is not an http(s) URL; {URL_HINT}",
        "spec.urls.0: 'file:///etc/passwd' does not match '^[Hh][Tt][Tt][Pp][Ss]?://'"),
    "url without host": BadSpec(
        "ScrapeRequest", {"urls": ["https:///events"]},
        f"spec.urls[0]: 'https:///events' has no host; {URL_HINT}", None),
    "10k urls inline": BadSpec(
        "ScrapeRequest", {"urls": [f"https://example.com/list?page={page}" for page in range(10_000)]},
        "spec.urls: 10000 URLs given, at most 300 fit in the resource; put the list in a ConfigMap and use urlsFrom",
        "spec.urls: is too long"),
    "url listed twice": BadSpec(
        "ScrapeRequest", {"urls": ["https://example.com/a", "https://example.com/a"]},
        "spec.urls: 'https://example.com/a' is listed twice", "spec.urls: Duplicate value"),
    "url too long": BadSpec(
        "ScrapeRequest", {"urls": ["https://example.com/" + "a" * 3000]},
        "spec.urls[0]: String should have at most 2048 characters", "spec.urls.0: is too long"),
    "firecrawl without its key": BadSpec(
        "ScrapeRequest", {"urls": URLS, "backend": "Firecrawl"},
        "spec: backend Firecrawl needs firecrawl.apiKeySecretRef, the Secret key holding the API key",
        "spec: backend Firecrawl needs firecrawl.apiKeySecretRef, the Secret key holding the API key"),
    "unknown backend": BadSpec(
        "ScrapeRequest", {"urls": URLS, "backend": "scrapy"},
        "spec.backend: Input should be 'Http' or 'Firecrawl'",
        "spec.backend: 'scrapy' is not one of ['Http', 'Firecrawl']"),
    "zero rate": BadSpec(
        "ScrapeRequest", {"urls": URLS, "rateLimit": {"requestsPerMinute": 0}},
        "spec.rateLimit.requestsPerMinute: Input should be greater than or equal to 1",
        "spec.rateLimit.requestsPerMinute: 0 is less than the minimum of 1"),
    "negative burst": BadSpec(
        "ScrapeRequest", {"urls": URLS, "rateLimit": {"burst": -1}},
        "spec.rateLimit.burst: Input should be greater than or equal to 1",
        "spec.rateLimit.burst: -1 is less than the minimum of 1"),
    "zero tries": BadSpec(
        "ScrapeRequest", {"urls": URLS, "retry": {"maxTries": 0}},
        "spec.retry.maxTries: Input should be greater than or equal to 1",
        "spec.retry.maxTries: 0 is less than the minimum of 1"),
    "backoff above its maximum": BadSpec(
        "ScrapeRequest", {"urls": URLS, "retry": {"backoffSeconds": 600, "maxBackoffSeconds": 60}},
        "spec.retry: maxBackoffSeconds must be at least backoffSeconds",
        "spec.retry: maxBackoffSeconds must be at least backoffSeconds"),
    "timeout above its maximum": BadSpec(
        "ScrapeRequest", {"urls": URLS, "retry": {"timeoutSeconds": 300}},
        "spec.retry: maxTimeoutSeconds must be at least timeoutSeconds",
        "spec.retry: maxTimeoutSeconds must be at least timeoutSeconds"),
    "broken link regex": BadSpec(
        "ScrapeRequest", {"urls": URLS, "links": {"pattern": "([a-z"}},
        "spec.links.pattern: '([a-z' is not a valid regular expression: unterminated character set at position 1",
        None),
    "broken link selector": BadSpec(
        "ScrapeRequest", {"urls": URLS, "links": {"selector": "a[["}},
        "spec.links.selector: 'a[[' is not a valid CSS selector; e.g. 'a.event-link' or 'h1'", None),
    "negative max detail pages": BadSpec(
        "ScrapeRequest", {"urls": URLS, "links": {"maxDetailPages": -1}},
        "spec.links.maxDetailPages: Input should be greater than or equal to 0",
        "spec.links.maxDetailPages: -1 is less than the minimum of 0"),
    "css extraction without fields": BadSpec(
        "ScrapeRequest", {"urls": URLS, "extract": {"css": {"fields": {}}}},
        "spec.extract.css.fields: Dictionary should have at least 1 item after validation, not 0",
        "spec.extract.css.fields: {} should be non-empty"),
    "both extraction modes": BadSpec(
        "ScrapeRequest", {"urls": URLS, "extract": {"css": {"fields": {"title": "h1"}}, "jsonLd": {}}},
        "spec.extract: set one of jsonLd and css, not both", "spec.extract: set one of jsonLd and css, not both"),
    "broken field selector": BadSpec(
        "ScrapeRequest", {"urls": URLS, "extract": {"css": {"fields": {"title": "div >"}}}},
        "spec.extract.css.fields.title: 'div >' is not a valid CSS selector; e.g. 'a.event-link' or 'h1'", None),
    "prefixed json-ld type": BadSpec(
        "ScrapeRequest", {"urls": URLS, "extract": {"jsonLd": {"types": ["schema:Event"]}}},
        "spec.extract.jsonLd.types[0]: String should match pattern '^[A-Za-z][A-Za-z0-9]*$'",
        "spec.extract.jsonLd.types.0: 'schema:Event' does not match '^[A-Za-z][A-Za-z0-9]*$'"),
    "unknown deletion policy": BadSpec(
        "ScrapeRequest", {"urls": URLS, "deletionPolicy": "Purge"},
        "spec.deletionPolicy: Input should be 'Retain' or 'Delete'",
        "spec.deletionPolicy: 'Purge' is not one of ['Retain', 'Delete']"),
    "response cap below 1 KiB": BadSpec(
        "ScrapeRequest", {"urls": URLS, "fetch": {"maxResponseBytes": 10}},
        "spec.fetch.maxResponseBytes: Input should be greater than or equal to 1024",
        "spec.fetch.maxResponseBytes: 10 is less than the minimum of 1024"),
    "configmap ref without key": BadSpec(
        "ScrapeRequest", {"urlsFrom": {"configMapKeyRef": {"name": "pages"}}},
        "spec.urlsFrom.configMapKeyRef.key: Field required",
        "spec.urlsFrom.configMapKeyRef: 'key' is a required property"),
    "schedule enqueuing the operator's own job": BadSpec(
        "SyncSchedule", {"schedule": "@daily", "job": {"function": "delete_scrape_results"}},
        "spec.job.function: delete_scrape_results is enqueued by the operator alone (when a ScrapeRequest with "
        "deletionPolicy: Delete is deleted), never by a schedule",
        "spec.job: delete_scrape_results is enqueued by the operator alone (when a ScrapeRequest with "
        "deletionPolicy: Delete is deleted), never by a schedule"),
    "queue policy granting no namespace": BadSpec(
        "QueuePolicy", {"namespaces": {}, "queues": ["team-a:*"]},
        f"spec.namespaces: {SELECTOR_MESSAGE}", f"spec.namespaces: {SELECTOR_MESSAGE}"),
    "queue policy with no queue": BadSpec(
        "QueuePolicy", {"namespaces": {"names": ["team-a"]}, "queues": []},
        "spec.queues: List should have at least 1 item after validation, not 0", "spec.queues: [] should be non-empty"),
    "queue glob with a space": BadSpec(
        "QueuePolicy", {"namespaces": {"names": ["team-a"]}, "queues": ["team a"]},
        "spec.queues[0]: 'team a' is not a name or glob: letters, digits, '_', '.', ':', '/', '-', with * for any "
        "characters and ? for one",
        "spec.queues.0: 'team a' does not match '^[A-Za-z0-9_.:*?/-]+$'"),
    "label selector In without values": BadSpec(
        "QueuePolicy", {"namespaces": {"matchExpressions": [{"key": "team", "operator": "In"}]}, "queues": ["a"]},
        f"spec.namespaces.matchExpressions[0]: {VALUES_MESSAGE}",
        f"spec.namespaces.matchExpressions[]: {VALUES_MESSAGE}"),
    "unknown label selector operator": BadSpec(
        "QueuePolicy", {"namespaces": {"matchExpressions": [{"key": "team", "operator": "Within"}]}, "queues": ["a"]},
        "spec.namespaces.matchExpressions[0].operator: Input should be 'In', 'NotIn', 'Exists' or 'DoesNotExist'",
        "spec.namespaces.matchExpressions.0.operator: "
        "'Within' is not one of ['In', 'NotIn', 'Exists', 'DoesNotExist']"),
}
SPEC_MODELS = {resource.kind: resource.spec_model for resource in RESOURCES}
CRDS = load_crds()


def test_table_has_at_least_25_bad_specs() -> None:
    assert len(BAD_SPECS) >= 25


@pytest.mark.parametrize("case", BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_spec_gets_one_clear_message(case: BadSpec) -> None:
    with pytest.raises(ValidationError) as raised:
        SPEC_MODELS[case.kind].model_validate(case.spec)
    assert describe_validation_error(raised.value) == case.message


@pytest.mark.parametrize("case", BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_api_server_schema_refuses_what_it_can_express(case: BadSpec) -> None:
    obj = {"apiVersion": "kubearq.dev/v1alpha1", "kind": case.kind, "metadata": {"name": "bad"}, "spec": case.spec}
    problems = server_problems(CRDS[case.kind], obj)
    if case.server is None:
        assert problems == []  # admitted by the server: the operator's Ready/Succeeded condition says why
    else:
        assert problems, "the CRD schema lets this through"
        first = problems[0]
        # jsonschema quotes a whole 10k-item list in its message; compare the part a reader acts on.
        assert first == case.server or (case.server.endswith("is too long") and first.endswith("is too long")) \
            or (case.server.endswith("non-empty") and first.endswith("should be non-empty")), first


def test_scrape_request_defaults_fill_every_setting() -> None:
    spec = ScrapeRequestSpec.model_validate({"urls": URLS})
    assert spec.extract.effective_json_ld is not None
    assert spec.extract.effective_json_ld.types == ["Event"]
    assert (spec.rate_limit.requests_per_minute, spec.retry.max_tries, spec.fetch.obey_robots_txt) == (60, 3, True)
    assert spec.fetch.allow_private_networks is False


def test_macro_schedules_are_valid() -> None:
    for macro in ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"):
        assert SyncScheduleSpec.model_validate({"schedule": macro, "job": JOB}).schedule == macro
