"""Unit tests of whose fault a failed async attempt is, and of the retry policy built on it."""

from __future__ import annotations

from typing import Any

import pytest

from faas.core.errors import (
    DeadlineExceeded,
    FaasError,
    FunctionError,
    FunctionTimeout,
    InstanceStartError,
    NotFound,
    NotLeader,
    TooManyRequests,
    Unavailable,
    error_from_body,
)
from faas.core.queue import AsyncEnvelope
from faas.dispatcher.consumer import error_of
from faas.dispatcher.faults import (
    FUNCTION_KINDS,
    PLATFORM_KINDS,
    GiveUp,
    Retry,
    fault_of,
    function_backoff,
    next_step,
    platform_backoff,
)


def _start_error(error_type: str, fault: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "instance_start_error", "type": error_type, "message": "m"}
    if fault is not None:
        body["fault"] = fault
    return body


# (error object, HTTP status or None for a raised error, expected fault)
FAULT_TABLE = [
    # The function's own failures, as the host reports them (through the dispatcher's result).
    pytest.param({"kind": "function_error", "type": "ValueError", "message": "m"}, 500, "function", id="handler-raised"),
    pytest.param({"kind": "function_timeout", "type": "TimeoutError", "message": "m"}, 504, "function", id="timeout"),
    pytest.param({"kind": "out_of_memory", "type": "MemoryError", "message": "m"}, 500, "function", id="oom"),
    pytest.param({"kind": "invalid_request", "type": "InvalidRequest", "message": "m"}, 400, "function", id="bad-event"),
    pytest.param({"kind": "partial_batch_failure", "type": "BatchItemFailures", "message": "m"}, None, "function",
                 id="batch-items"),  # fmt: skip
    pytest.param({"kind": "not_found", "type": "NotFound", "message": "m"}, None, "function", id="gone"),
    # Start failures of the user's code: the host marks them, whatever the exception's name.
    pytest.param(_start_error("ImportError", "function"), None, "function", id="import-error"),
    pytest.param(_start_error("SyntaxError", "function"), None, "function", id="syntax-error"),
    pytest.param(_start_error("AttributeError", "function"), None, "function", id="no-handler"),
    pytest.param(_start_error("BadZipFile", "function"), None, "function", id="bad-archive"),
    pytest.param(_start_error("TimeoutError", "function"), None, "function", id="import-raised-timeout"),
    pytest.param(_start_error("OSError", "function"), None, "function", id="import-raised-oserror"),
    # Start failures of the platform: unmarked, whatever their name.
    pytest.param(_start_error("TimeoutError"), None, "platform", id="no-host-ready"),
    pytest.param(_start_error("HostCrashed"), None, "platform", id="host-crashed"),
    pytest.param(_start_error("DockerError"), None, "platform", id="docker"),
    pytest.param(_start_error("Conflict"), None, "platform", id="conflict"),
    pytest.param(_start_error("OSError"), None, "platform", id="cache-oserror"),
    pytest.param(_start_error("DownloadError"), None, "platform", id="s3-download"),
    pytest.param(_start_error("ChecksumMismatch"), None, "platform", id="checksum"),
    pytest.param(_start_error("InstanceStartError"), None, "platform", id="scheduler-start-timeout"),
    # An instance that died during the call: the dispatcher marks whose it is.
    pytest.param(_start_error("InstanceCrashed", "function"), 502, "function", id="crash-exit-reported"),
    pytest.param(_start_error("InstanceCrashed", "platform"), 502, "platform", id="crash-agent-silent"),
    # Errors the dispatcher raises for the platform.
    pytest.param({"kind": "unavailable", "type": "Unavailable", "message": "m"}, None, "platform", id="no-agent"),
    pytest.param({"kind": "not_leader", "type": "NotLeader", "message": "m"}, None, "platform", id="not-leader"),
    pytest.param({"kind": "deadline_exceeded", "type": "DeadlineExceeded", "message": "m"}, None, "platform",
                 id="no-instance-in-time"),  # fmt: skip
    pytest.param({"kind": "too_many_requests", "type": "TooManyRequests", "message": "m"}, None, "platform",
                 id="throttled"),  # fmt: skip
    pytest.param({"kind": "platform_error", "type": "BadResponse", "message": "m"}, 500, "platform", id="bad-json"),
    # A mark that is not one of the two is ignored.
    pytest.param({"kind": "function_error", "type": "E", "message": "m", "fault": "nobody"}, 500, "function",
                 id="bogus-mark"),  # fmt: skip
    # Bodies of no known kind: by status.
    pytest.param({"kind": "error", "type": "HTTP 400", "message": "m"}, 400, "function", id="unknown-400"),
    pytest.param({"kind": "error", "type": "HTTP 429", "message": "m"}, 429, "platform", id="unknown-429"),
    pytest.param({"kind": "error", "type": "HTTP 500", "message": "m"}, 500, "platform", id="unknown-500"),
    pytest.param({"kind": "error", "type": "HTTP 502", "message": "m"}, 502, "platform", id="unknown-502"),
    pytest.param({}, None, "platform", id="empty"),
]


@pytest.mark.parametrize(("error", "status", "expected"), FAULT_TABLE)
def test_fault_of(error: dict[str, Any], status: int | None, expected: str) -> None:
    assert fault_of(error, status) == expected


def test_every_error_class_has_a_fault_by_its_kind() -> None:
    kinds = {cls.kind for cls in (FaasError, NotFound, TooManyRequests, Unavailable, NotLeader, DeadlineExceeded,
                                  FunctionError, FunctionTimeout, InstanceStartError)}  # fmt: skip
    assert kinds <= FUNCTION_KINDS | PLATFORM_KINDS
    assert not FUNCTION_KINDS & PLATFORM_KINDS


def test_the_errors_the_dispatcher_raises_are_classified_through_their_wire_shape() -> None:
    def wire(exc: FaasError) -> dict[str, Any]:
        # What the consumer sees after the error crossed a service (scheduler -> dispatcher).
        return error_from_body(exc.to_body(), exc.http_status).to_body()["error"]

    assert fault_of(wire(DeadlineExceeded("no instance of 'f' became available before the deadline"))) == "platform"
    assert fault_of(wire(Unavailable("no node agent answers"))) == "platform"
    assert fault_of(wire(TooManyRequests("at max_instances", retry_after_s=3))) == "platform"
    assert fault_of(wire(InstanceStartError("x", error_type="TimeoutError"))) == "platform"
    user = wire(InstanceStartError("importing handler module 'app' raised TimeoutError: x", error_type="TimeoutError",
                                   fault="function"))  # fmt: skip
    assert user["fault"] == "function" and fault_of(user) == "function"
    # A result body the dispatcher returned (an instance's answer), parsed as the consumer does.
    assert fault_of(error_of(504, b'{"error": {"kind": "function_timeout", "type": "TimeoutError"}}'), 504) == "function"
    assert fault_of(error_of(502, b"<html>bad gateway</html>"), 502) == "platform"


def test_the_fault_mark_round_trips_and_is_absent_when_unset() -> None:
    assert "fault" not in Unavailable("x").to_body()["error"]
    body = InstanceStartError("x", error_type="ImportError", fault="function").to_body()
    assert body["error"]["fault"] == "function"
    assert error_from_body(body, 502).fault == "function"
    assert error_from_body({"error": {"kind": "unavailable", "message": "x", "fault": "someone"}}, 503).fault is None


def _fixed(fraction: float) -> Any:
    """A uniform(lo, hi) that always returns the point ``fraction`` of the way from lo to hi."""
    return lambda lo, hi: lo + (hi - lo) * fraction


def test_function_backoff_doubles_with_half_jitter_either_way() -> None:
    assert [function_backoff(a, base_s=1.0, uniform=_fixed(0.5)) for a in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert function_backoff(3, base_s=1.0, uniform=_fixed(0.0)) == 2.0
    assert function_backoff(3, base_s=1.0, uniform=_fixed(1.0)) == 6.0


def test_platform_backoff_doubles_up_to_its_cap_within_the_upper_half() -> None:
    highs = [platform_backoff(n, base_s=1.0, cap_s=60.0, uniform=_fixed(1.0)) for n in range(1, 10)]
    assert highs == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    lows = [platform_backoff(n, base_s=1.0, cap_s=60.0, uniform=_fixed(0.0)) for n in range(1, 10)]
    assert lows == [h / 2 for h in highs]
    # A thousand retries in, the exponent does not overflow.
    assert platform_backoff(1000, base_s=1.0, cap_s=60.0, uniform=_fixed(1.0)) == 60.0


def test_platform_backoff_honours_retry_after() -> None:
    assert platform_backoff(1, base_s=1.0, cap_s=60.0, retry_after_s=7, uniform=_fixed(1.0)) == 7.0
    # Only as a minimum: a longer backoff stays.
    assert platform_backoff(6, base_s=1.0, cap_s=60.0, retry_after_s=7, uniform=_fixed(1.0)) == 32.0


POLICY = {"base_s": 1.0, "platform_cap_s": 60.0, "uniform": _fixed(1.0)}


def test_function_faults_use_up_max_retries() -> None:
    args = {"platform_retries": 0, "max_retries": 2, "age_s": 5.0, "max_event_age_s": 3600.0, **POLICY}
    assert next_step("function", attempt=1, **args) == Retry(1.5, platform=False)
    assert next_step("function", attempt=2, **args) == Retry(3.0, platform=False)
    assert next_step("function", attempt=3, **args) == GiveUp("RetriesExhausted")
    assert next_step("function", attempt=1, **{**args, "max_retries": 0}) == GiveUp("RetriesExhausted")


def test_platform_faults_do_not_use_up_max_retries() -> None:
    args = {"attempt": 1, "max_retries": 0, "age_s": 5.0, "max_event_age_s": 3600.0, **POLICY}
    assert next_step("platform", platform_retries=0, **args) == Retry(1.0, platform=True)
    assert next_step("platform", platform_retries=3, **args) == Retry(8.0, platform=True)  # the 4th
    # Past max_retries function attempts, a platform fault still gets its retry.
    assert next_step("platform", platform_retries=100, **{**args, "attempt": 3}) == Retry(60.0, platform=True)
    assert next_step("platform", platform_retries=0, retry_after_s=9, **args) == Retry(9.0, platform=True)


def test_no_retry_comes_due_after_the_event_age() -> None:
    args = {"attempt": 1, "platform_retries": 6, "max_retries": 2, "max_event_age_s": 3600.0, **POLICY}
    assert next_step("platform", age_s=3500.0, **args) == Retry(60.0, platform=True)
    assert next_step("platform", age_s=3550.0, **args) == GiveUp("EventAgeExceeded")
    assert next_step("function", age_s=3599.0, **args) == GiveUp("EventAgeExceeded")
    assert next_step("platform", age_s=3700.0, **args) == GiveUp("EventAgeExceeded")


def test_envelopes_written_before_platform_retries_existed_still_load() -> None:
    old = '{"v": 1, "id": "a", "namespace": "default", "function": "f", "version": 1, "payload": "{}", "attempt": 2}'
    env = AsyncEnvelope.model_validate_json(old)
    assert (env.attempt, env.platform_retries) == (2, 0)
