"""The one exception root of the platform, and the wire shape of every error.

Adapters translate etcd, Redis, S3 and HTTP failures into these classes (``raise X(...) from exc``);
services turn them into JSON ``{"error": {"kind", "type", "message"}}`` with ``http_status``.  A user
therefore always sees a kind and a message, never a traceback.

An error may also say whose it is, when the code that raised it knows and its kind does not tell:
``"fault": "function"`` (the user's code, e.g. the handler module's import raised) or ``"platform"``.
The field round-trips like the others; async retries are decided on it
(``faas/dispatcher/faults.py``).
"""

from __future__ import annotations

from typing import Any, Literal

Fault = Literal["function", "platform"]
FAULTS: tuple[Fault, ...] = ("function", "platform")


class FaasError(Exception):
    """Root of all platform errors."""

    http_status = 500
    kind = "platform_error"

    def __init__(self, message: str, *, error_type: str | None = None, fault: Fault | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type or type(self).__name__
        self.fault = fault

    def to_body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"kind": self.kind, "type": self.error_type, "message": self.message}
        if self.fault is not None:
            error["fault"] = self.fault
        return {"error": error}

    def response_headers(self) -> dict[str, str]:
        """HTTP headers that go with the error's response."""
        return {}


class InvalidRequest(FaasError):
    http_status = 400
    kind = "invalid_request"


class Unauthorized(FaasError):
    """No credential, or not a valid one: an API key at the gateway, the platform's internal token
    (``wire.INTERNAL_TOKEN``) at an internal service."""

    http_status = 401
    kind = "unauthorized"

    def response_headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="faas"'}


class Forbidden(FaasError):
    """The key is valid but its role does not allow the call (in its own namespace: nothing leaks)."""

    http_status = 403
    kind = "forbidden"


class NotFound(FaasError):
    http_status = 404
    kind = "not_found"


class Conflict(FaasError):
    http_status = 409
    kind = "conflict"


class PayloadTooLarge(FaasError):
    http_status = 413
    kind = "payload_too_large"


class TooManyRequests(FaasError):
    """A limit is reached; ``retry_after_s`` (sent as ``Retry-After``), when known, says when to come back."""

    http_status = 429
    kind = "too_many_requests"

    def __init__(
        self, message: str, *, error_type: str | None = None, fault: Fault | None = None, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message, error_type=error_type, fault=fault)
        self.retry_after_s = retry_after_s

    def response_headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"retry-after": str(self.retry_after_s)}


class Unavailable(FaasError):
    """A dependency (etcd, Redis, S3, a peer service) cannot be reached or is not ready."""

    http_status = 503
    kind = "unavailable"


class NotLeader(Unavailable):
    kind = "not_leader"

    def response_headers(self) -> dict[str, str]:
        # Tells a caller that relays web apps' answers this 503 apart from an app's own.
        return {"x-faas-not-leader": "1"}  # wire.NOT_LEADER (faas.core.wire imports nothing of errors)


class DeadlineExceeded(FaasError):
    http_status = 504
    kind = "deadline_exceeded"


class FunctionError(FaasError):
    """The user's handler raised: its exception type and message travel to the caller."""

    http_status = 500
    kind = "function_error"


class FunctionTimeout(FaasError):
    http_status = 504
    kind = "function_timeout"


class InstanceStartError(FaasError):
    """An instance could not be started or specialised (bad archive, missing module, import error)."""

    http_status = 502
    kind = "instance_start_error"


ERROR_CLASSES: dict[str, type[FaasError]] = {
    cls.kind: cls
    for cls in (
        FaasError,
        InvalidRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        PayloadTooLarge,
        TooManyRequests,
        Unavailable,
        NotLeader,
        DeadlineExceeded,
        FunctionError,
        FunctionTimeout,
        InstanceStartError,
    )
}


def error_from_body(body: Any, status: int) -> FaasError:
    """Rebuild the error a peer service sent (the inverse of ``FaasError.to_body``)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return FaasError(f"unexpected response (HTTP {status}): {str(body)[:200]}")
    cls = ERROR_CLASSES.get(str(err.get("kind")), FaasError)
    fault = err.get("fault")
    return cls(str(err.get("message", "")), error_type=err.get("type"), fault=fault if fault in FAULTS else None)
