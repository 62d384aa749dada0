"""One JSON log format for both processes, carrying the context of the work being done."""

from __future__ import annotations

import io
import json
import logging

import kopf
import pytest
from kopf._cogs.structs.bodies import Body
from kopf._core.actions.loggers import ObjectLogger

from kubearq.core.observability import ContextFilter, configure_logging, log_context


def test_log_lines_are_json_with_job_and_object_context() -> None:
    configure_logging("INFO")
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    try:
        with log_context(job_id="kubearq:tick:u:1", namespace="shop", name="nightly"):
            logging.getLogger("kubearq.test").info("enqueued")
    finally:
        logging.getLogger().handlers.clear()
    line = json.loads(stream.getvalue())
    assert (line["message"], line["level"], line["name"]) == ("enqueued", "INFO", "kubearq.test")
    assert (line["job_id"], line["namespace"], line["object_name"]) == ("kubearq:tick:u:1", "shop", "nightly")


def test_context_never_overwrites_the_records_own_fields() -> None:
    record = logging.LogRecord("logger.name", logging.INFO, "f.py", 1, "m", (), None)
    with log_context(name="resource", msg="not the message"):
        ContextFilter().filter(record)
    assert (record.name, record.msg) == ("logger.name", "m")
    assert (record.object_name, record.object_msg) == ("resource", "not the message")  # type: ignore[attr-defined]


def test_kopf_object_log_lines_are_json_with_the_object_and_no_formatting_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    """kopf logs per object with its settings attached; they must not break (or bloat) the JSON line."""
    configure_logging("INFO")
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    body = Body({"apiVersion": "kubearq.dev/v1alpha1", "kind": "SyncSchedule",
                 "metadata": {"name": "nightly", "namespace": "shop", "uid": "u-1"}})
    objects = logging.getLogger("kopf.objects")
    level = objects.level
    objects.setLevel(logging.NOTSET)  # run_operator quiets it to WARNING, process-wide, for any later test
    try:
        ObjectLogger(body=body, settings=kopf.OperatorSettings()).info("Handler 'spy' succeeded.")
    finally:
        logging.getLogger().handlers.clear()
        objects.setLevel(level)
    assert "Logging error" not in capsys.readouterr().err
    # Only this line counts: a thread an earlier test left behind may log to the root handler meanwhile.
    lines = [json.loads(text) for text in stream.getvalue().splitlines()]
    line = next(line for line in lines if line["message"] == "Handler 'spy' succeeded.")
    assert (line["object"]["kind"], line["object"]["namespace"], line["object"]["name"]) == (
        "SyncSchedule", "shop", "nightly")
    assert "settings" not in line


def test_httpx_request_lines_are_left_out_at_info() -> None:
    configure_logging("INFO")
    try:
        assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
        assert logging.getLogger("httpx").isEnabledFor(logging.WARNING)
        assert logging.getLogger("kubearq.operator").isEnabledFor(logging.INFO)
    finally:
        logging.getLogger().handlers.clear()
