"""What the operator keeps per watched object, and which log lines it drops."""

from __future__ import annotations

import logging

from loraplex.operator.handlers import indexed
from loraplex.operator.main import quiet_event_handlers


def test_index_drops_managed_fields_and_client_side_apply_copy_only() -> None:
    body = {
        "apiVersion": "loraplex.dev/v1alpha1",
        "metadata": {
            "name": "sql",
            "namespace": "llm",
            "finalizers": ["loraplex.dev/unload"],
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "a": "b"},
        },
        "spec": {"baseModel": {"name": "tiny"}},
        "status": {"phase": "Ready"},
    }
    kept = indexed(body)
    assert "managedFields" not in kept["metadata"]
    assert kept["metadata"]["annotations"] == {"a": "b"}
    assert kept["metadata"]["finalizers"] == ["loraplex.dev/unload"]
    assert kept["spec"] == body["spec"] and kept["status"] == body["status"]
    assert "managedFields" in body["metadata"]  # the watched body itself is left alone


def record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("kopf.objects", level, __file__, 1, message, None, None)


def test_only_wake_only_handlers_successes_are_dropped() -> None:
    assert not quiet_event_handlers(record(logging.INFO, "Handler 'adapter_event' succeeded."))
    assert not quiet_event_handlers(record(logging.INFO, "Handler 'pod_changed' succeeded."))
    assert quiet_event_handlers(record(logging.INFO, "Handler 'apply_children' succeeded."))
    assert quiet_event_handlers(record(logging.ERROR, "Handler 'adapter_event' failed with an exception."))
