"""A small synchronous client of the gateway's public API (``docs/contracts.md``, section Gateway).

Every failure reaches the caller as a ``FaasError``: ``GatewayUnreachable`` when nothing answers at
the URL, ``DeadlineExceeded`` when the gateway does not answer in time, and ``GatewayError`` (carrying
the gateway's ``kind``, ``type``, ``message`` and the HTTP ``status``) when it answers with an error.
``invoke`` is the exception: it returns the raw status, headers and body, so the caller can show a
function's error together with the ``X-Faas-*`` headers; ``error_from_response`` decodes such a body.

Every request carries the API key (``Authorization: Bearer``) and, when one is given, ``?namespace=``
(without it, the gateway uses the key's namespace).  Timeouts: deploy 300 s (the upload of a large archive),
invoke 930 s (the longest function timeout, 900 s, plus a cold start), everything else 30 s.
"""

from __future__ import annotations

import builtins
import json
from typing import Any
from urllib.parse import quote

import httpx

from faas.core.errors import DeadlineExceeded, FaasError, Unavailable

DEPLOY_TIMEOUT_S = 300.0
INVOKE_TIMEOUT_S = 930.0
DEFAULT_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
USER_AGENT = "faas-cli/0.1"


class GatewayUnreachable(Unavailable):
    """Nothing answers at the gateway URL."""


class GatewayError(FaasError):
    """An error response of the gateway: ``{"error": {"kind", "type", "message"}}`` with ``status``."""

    def __init__(self, message: str, *, kind: str, error_type: str, status: int) -> None:
        super().__init__(message, error_type=error_type)
        self.kind = kind
        self.status = status


def error_from_response(status: int, body: bytes) -> GatewayError:
    """The ``GatewayError`` an error response stands for (a non-JSON body keeps its first 200 bytes)."""
    try:
        payload = json.loads(body) if body else None
    except ValueError:
        payload = None
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict) and "message" in err:
        return GatewayError(
            str(err.get("message")),
            kind=str(err.get("kind") or "platform_error"),
            error_type=str(err.get("type") or "Error"),
            status=status,
        )
    text = body[:200].decode("utf-8", "replace").strip() or "(empty body)"
    return GatewayError(
        f"unexpected response from the gateway (HTTP {status}): {text}",
        kind="platform_error",
        error_type="UnexpectedResponse",
        status=status,
    )


class GatewayClient:
    def __init__(
        self,
        url: str,
        namespace: str | None = None,
        *,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.namespace = namespace
        headers = {"User-Agent": USER_AGENT}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=self.url, transport=transport, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- functions ----------------------------------------------------------------------------------

    def deploy(self, name: str, config: dict[str, Any], archive: bytes) -> dict[str, Any]:
        """Create a new version from ``config`` (a ``VersionConfig`` dict) and the zip; the ``FunctionView``."""
        result = self._json(
            "PUT",
            _function_path(name),
            timeout=DEPLOY_TIMEOUT_S,
            data={"config": json.dumps(config)},
            files={"code": ("code.zip", archive, "application/zip")},
        )
        return _expect_dict(result)

    def list(self) -> builtins.list[dict[str, Any]]:
        return _items(self._json("GET", "/v1/functions"), "functions")

    def get(self, name: str) -> dict[str, Any]:
        return _expect_dict(self._json("GET", _function_path(name)))

    def delete(self, name: str) -> dict[str, Any] | None:
        result = self._json("DELETE", _function_path(name))
        return result if isinstance(result, dict) else None

    def versions(self, name: str) -> builtins.list[dict[str, Any]]:
        return _items(self._json("GET", f"{_function_path(name)}/versions"), "versions")

    def logs(self, name: str, limit: int) -> builtins.list[dict[str, Any]]:
        return _items(self._json("GET", f"{_function_path(name)}/logs", params={"limit": limit}), "logs")

    def invoke(
        self,
        name: str,
        payload: bytes,
        qualifier: str | None = None,
        *,
        asynchronous: bool = False,
        idempotency_key: str | None = None,
    ) -> tuple[int, httpx.Headers, bytes]:
        """Invoke (sync, or async: 202 and an invocation id); the raw (status, headers, body)."""
        params = {"qualifier": qualifier} if qualifier else None
        headers = {"Content-Type": "application/json"}
        if asynchronous:
            headers["X-Faas-Invocation-Type"] = "async"
            if idempotency_key:
                headers["X-Faas-Idempotency-Key"] = idempotency_key
        response = self._send(
            "POST",
            f"{_function_path(name)}/invoke",
            timeout=INVOKE_TIMEOUT_S,
            params=params,
            content=payload,
            headers=headers,
        )
        return response.status_code, response.headers, response.content

    # -- event subscriptions ------------------------------------------------------------------------

    def subscriptions(self, name: str | None = None) -> builtins.list[dict[str, Any]]:
        """The event subscriptions of function ``name``, or of the whole namespace."""
        path = f"{_function_path(name)}/subscriptions" if name else "/v1/subscriptions"
        return _items(self._json("GET", path), "subscriptions")

    def put_subscription(
        self, name: str, subscription: str, spec: dict[str, Any]
    ) -> tuple[bool, dict[str, Any]]:
        """Create or replace one subscription (``spec`` is a ``SubscriptionSpec`` dict); (created, it)."""
        response = self._checked("PUT", _subscription_path(name, subscription), json=spec)
        return response.status_code == 201, _expect_dict(_decode(response))

    def replace_declared_subscriptions(
        self, name: str, subscriptions: builtins.list[dict[str, Any]]
    ) -> builtins.list[dict[str, Any]]:
        """Make the function's manifest-declared subscriptions exactly these (each with its ``name``)."""
        result = self._json(
            "PUT", f"{_function_path(name)}/subscriptions", json={"subscriptions": subscriptions}
        )
        return _items(result, "subscriptions")

    def delete_subscription(self, name: str, subscription: str) -> None:
        self._checked("DELETE", _subscription_path(name, subscription))

    # -- aliases ------------------------------------------------------------------------------------

    def aliases(self, name: str) -> builtins.list[dict[str, Any]]:
        return _items(self._json("GET", f"{_function_path(name)}/aliases"), "aliases")

    def set_alias(self, name: str, alias: str, body: dict[str, Any]) -> dict[str, Any]:
        return _expect_dict(self._json("PUT", _alias_path(name, alias), json=body))

    def delete_alias(self, name: str, alias: str) -> None:
        self._checked("DELETE", _alias_path(name, alias))

    def rollback(self, name: str, alias: str) -> dict[str, Any]:
        return _expect_dict(self._json("POST", f"{_alias_path(name, alias)}/rollback"))

    # -- API keys -----------------------------------------------------------------------------------

    def whoami(self) -> dict[str, Any]:
        """What the gateway knows of this client's key: its id, namespace, role and functions."""
        return _expect_dict(self._json("GET", "/v1/whoami"))

    def create_key(self, spec: dict[str, Any]) -> dict[str, Any]:
        return _expect_dict(self._json("POST", "/v1/keys", json=spec))

    def list_keys(self) -> builtins.list[dict[str, Any]]:
        return _items(self._json("GET", "/v1/keys"), "keys")

    def revoke_key(self, key_id: str) -> None:
        self._checked("DELETE", f"/v1/keys/{quote(key_id, safe='')}")

    # -- other calls --------------------------------------------------------------------------------

    def raw(self, method: str, path: str, *, params: dict[str, Any] | None = None) -> tuple[int, bytes]:
        """Any other call; the raw (status, body)."""
        response = self._send(method, path, timeout=DEFAULT_TIMEOUT_S, params=params)
        return response.status_code, response.content

    def invocation(self, invocation_id: str) -> tuple[int, bytes]:
        """An async invocation's record; the raw (status, body)."""
        response = self._send("GET", f"/v1/invocations/{invocation_id}", timeout=DEFAULT_TIMEOUT_S)
        return response.status_code, response.content

    # -- plumbing -----------------------------------------------------------------------------------

    def _send(
        self, method: str, path: str, *, timeout: float, params: dict[str, Any] | None = None, **kwargs: Any
    ) -> httpx.Response:
        query = {**({"namespace": self.namespace} if self.namespace else {}), **(params or {})}
        try:
            return self._http.request(
                method,
                path,
                params=query,
                timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S),
                **kwargs,
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise GatewayUnreachable(
                f"cannot reach the gateway at {self.url}: is the platform up? (run 'faas up')"
            ) from exc
        except httpx.TimeoutException as exc:
            raise DeadlineExceeded(f"the gateway at {self.url} did not answer within {timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise GatewayUnreachable(f"request to the gateway at {self.url} failed: {exc}") from exc

    def _checked(
        self, method: str, path: str, *, timeout: float = DEFAULT_TIMEOUT_S, **kwargs: Any
    ) -> httpx.Response:
        """The response, unless it is an error response: that raises its ``GatewayError``."""
        response = self._send(method, path, timeout=timeout, **kwargs)
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content)
        return response

    def _json(self, method: str, path: str, *, timeout: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> Any:
        return _decode(self._checked(method, path, timeout=timeout, **kwargs))


def _decode(response: httpx.Response) -> Any:
    """The JSON body of a successful response (None when it is empty)."""
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise GatewayError(
            f"the gateway answered HTTP {response.status_code} with a body that is not JSON: "
            f"{response.content[:200].decode('utf-8', 'replace')}",
            kind="platform_error",
            error_type="UnexpectedResponse",
            status=response.status_code,
        ) from None


def _function_path(name: str) -> str:
    return f"/v1/functions/{quote(name, safe='')}"


def _subscription_path(name: str, subscription: str) -> str:
    return f"{_function_path(name)}/subscriptions/{quote(subscription, safe='')}"


def _alias_path(name: str, alias: str) -> str:
    return f"{_function_path(name)}/aliases/{quote(alias, safe='')}"


def _expect_dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FaasError(f"unexpected response from the gateway: expected an object, got {str(value)[:200]}")
    return value


def _items(value: Any, key: str) -> list[dict[str, Any]]:
    """A list from a bare JSON array or an object wrapping it under ``key``."""
    if isinstance(value, dict) and isinstance(value.get(key), list):
        value = value[key]
    if not isinstance(value, list):
        raise FaasError(
            f"unexpected response from the gateway: expected a list of {key}, got {str(value)[:200]}"
        )
    return [item for item in value if isinstance(item, dict)]
