"""Which jobs a worker pool runs: with ALLOWED_NAMESPACES, only those whose origin (the namespace and resource
they were enqueued for, `kubearq.core.contract.Origin`) is one of those namespaces. The others are refused before
they run: failed with the reason, kept under the dead-letter key, never retried. An origin is a declaration, not
an authentication: this guards against mistakes and stray writers, not against whoever can write to Redis."""

from __future__ import annotations

from collections.abc import Mapping

from kubearq.core.contract import CURRENT_ORIGIN, ORIGIN_FIELD, Origin, deserialize, origin_of, serialize


class JobRefused(Exception):  # noqa: N818 - a verdict on a job, not a crash
    """A job this worker pool may not run (ALLOWED_NAMESPACES): the failed result's error says why."""


def refusal(job: dict[str, object], allowed: frozenset[str]) -> str | None:
    """Why a worker pool that runs only jobs from the `allowed` namespaces refuses this decoded job; None if it
    runs it (every job runs when `allowed` is empty)."""
    if not allowed:
        return None
    origin = origin_of(job)
    if origin is not None and origin.namespace in allowed:
        return None
    if origin is not None:
        whence = f"it comes from {origin}"
    elif ORIGIN_FIELD in job:
        whence = "its origin is malformed (not {namespace, kind, name})"
    else:
        whence = "it names no origin (the namespace and resource it was enqueued for)"
    pool = f"this worker pool runs only jobs from the namespaces in ALLOWED_NAMESPACES ({', '.join(sorted(allowed))})"
    if origin is not None:
        return f"{whence}, and {pool}"
    return (f"{whence}, and {pool}; the operator's jobs name theirs, an application's name one with "
            "kubearq.client.create_pool(origin=...)")


def origin_fields(origin: Origin | None) -> dict[str, str]:
    """The log fields naming a job's origin (the fields kopf's lines name a resource with, and its kind)."""
    return {"namespace": origin.namespace, "kind": origin.kind, "name": origin.name} if origin else {}


def stamp_current_origin(job: dict[str, object]) -> bytes:
    """The worker's `job_serializer` for the jobs a job enqueues (`ctx["redis"].enqueue_job`): they carry the
    running job's origin on, so that a worker pool with ALLOWED_NAMESPACES runs them too."""
    origin = CURRENT_ORIGIN.get()
    if origin is None:
        return serialize(job)
    return serialize({**job, ORIGIN_FIELD: origin.model_dump()})


def refused_result(result_data: bytes | None, job: Mapping[str, object], reason: str) -> bytes | None:
    """ARQ's result of a job it could not decode, rewritten for a refused one: its function and arguments, and
    the refusal as its error instead of ARQ's `DeserializationError: unable to deserialize job`."""
    if result_data is None:  # ARQ could not serialize a result: none is kept
        return None
    result = deserialize(result_data)
    result.update(f=job["f"], a=job["a"], k=job["k"], et=job["et"], r=JobRefused(reason))
    return serialize(result)
