"""Who is calling the gateway: every route but health needs an API key (``faas.core.api_keys``).

Guarantees:

- ``identify`` runs before every FastAPI route (a global dependency) and the hot invocation routes
  call ``authenticate`` themselves: no route answers without a valid key, except ``/healthz`` and the
  API documentation (``OPEN_PATHS``); the
  object-store webhooks, which need the webhook secret (or an admin key) instead; and the HTTP trigger of a function
  deployed with ``public: true``, which the route checks itself (``caller_or_none``);
- the caller's namespace comes from its key (``Principal.namespace_for``): another namespace is
  ``NotFound`` to a non-admin key, so names do not leak;
- the webhook secret is compared in constant time; with none configured, webhooks are refused.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from contextvars import ContextVar

from faas.core.api_keys import KeyIndex, Principal, Unauthorized, key_from_headers, key_id_of
from faas.core.errors import Unavailable

# Health, and the API's own documentation (the schema of the public API, no data).
OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
WEBHOOK_PREFIX = "/v1/events/object-store/"
HTTP_TRIGGER_PREFIX = "/fn/"

_caller: ContextVar[Principal | None] = ContextVar("faas_caller", default=None)


def authenticate(keys: KeyIndex, header: Callable[[str], str | None]) -> Principal:
    """The principal of a request's key (``header`` reads a lowercase header name)."""
    if not keys.ready:
        raise Unavailable("the gateway has not loaded the API keys yet (etcd unreachable); try again")
    return keys.authenticate(key_from_headers(header("authorization"), header("x-api-key")))


def identify(keys: KeyIndex, path: str, header: Callable[[str], str | None], query_secret: str | None, webhook_secret: str) -> None:
    """Check the caller of a FastAPI route, and remember its principal for the route."""
    if path in OPEN_PATHS:
        return
    if path.startswith(WEBHOOK_PREFIX):
        # The webhook secret, or an admin key (notifications reach subscriptions of every namespace).
        if header("x-api-key") or _is_api_key(header("authorization")):
            principal = authenticate(keys, header)
            principal.require("admin")
            _caller.set(principal)
            return
        check_webhook_secret(webhook_secret, query_secret, header("authorization"))
        return
    if path.startswith(HTTP_TRIGGER_PREFIX) and key_from_headers(header("authorization"), header("x-api-key")) is None:
        _caller.set(None)  # the route lets this through only to a public function
        return
    _caller.set(authenticate(keys, header))


def _is_api_key(authorization: str | None) -> bool:
    """Whether a bearer token is an API key's text (rather than the webhook secret)."""
    key = key_from_headers(authorization, None)
    return key is not None and key_id_of(key) is not None


def caller() -> Principal:
    """The principal ``identify`` found for this request."""
    principal = _caller.get()
    if principal is None:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>' (or 'X-Api-Key: <key>')")
    return principal


def caller_or_none() -> Principal | None:
    return _caller.get()


def check_webhook_secret(expected: str, query_secret: str | None, authorization: str | None) -> None:
    given = query_secret
    if given is None and authorization:
        scheme, _, value = authorization.strip().partition(" ")
        given = value.strip() if scheme.lower() == "bearer" else None
    if not expected or given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("object-store notifications need the webhook secret (?secret= or a bearer token)")
