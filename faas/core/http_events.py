"""The HTTP trigger's mapping, free of any web framework: an HTTP request to an API Gateway proxy
(payload v2.0) event, and a handler's result back to an HTTP answer, the way Lambda function URLs do
it.  The gateway's ``/fn/{name}/...`` and ``faas serve`` both use it, so a function sees the same
event either way.

Guarantees: a body that is not text (by its content type) or not UTF-8 travels base64-encoded with
``isBase64Encoded``; repeated headers and query parameters are joined with commas, as AWS does;
a result with ``statusCode`` is an HTTP answer (``headers``, ``cookies`` each a ``Set-Cookie``,
``body`` decoded when ``isBase64Encoded``, JSON-encoded when not a string); any other result is the
body itself (a string as text, the rest as JSON).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/x-www-form-urlencoded", "application/javascript")


def http_event(
    *, method: str, path: str, query: str, headers: Iterable[tuple[str, str]], body: bytes, request_id: str,
    source_ip: str = "", http_version: str = "1.1",
) -> dict[str, Any]:  # fmt: skip
    """The event of one request; ``path`` is below the function's prefix (no leading slash),
    ``query`` the raw query string, ``headers`` every header line (lowercase names)."""
    joined: dict[str, str] = {}
    for key, value in headers:
        joined[key] = f"{joined[key]},{value}" if key in joined else value
    content_type = joined.get("content-type", "")
    body_field: str | None
    if not body or content_type.startswith(_TEXT_TYPES):
        try:
            body_field, is_b64 = (body.decode("utf-8") if body else None), False
        except UnicodeDecodeError:
            body_field, is_b64 = base64.b64encode(body).decode(), True
    else:
        body_field, is_b64 = base64.b64encode(body).decode(), True
    parameters: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        parameters[key] = f"{parameters[key]},{value}" if key in parameters else value
    raw_path = "/" + path
    now = time.time()
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": raw_path,
        "rawQueryString": query,
        "cookies": [c.strip() for c in joined.get("cookie", "").split(";") if c.strip()],
        "headers": joined,
        "queryStringParameters": parameters or None,
        "pathParameters": {"proxy": path},
        "requestContext": {
            "accountId": "anonymous",
            "apiId": "faas",
            "domainName": joined.get("host", ""),
            "http": {
                "method": method,
                "path": raw_path,
                "protocol": f"HTTP/{http_version}",
                "sourceIp": source_ip,
                "userAgent": joined.get("user-agent", ""),
            },
            "requestId": request_id,
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "body": body_field,
        "isBase64Encoded": is_b64,
    }


def http_answer(result: Any) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, header lines, body) of a handler's result."""
    if isinstance(result, dict) and "statusCode" in result:
        status = int(result.get("statusCode") or 200)
        headers = [(str(k).lower(), str(v)) for k, v in (result.get("headers") or {}).items()]
        body = result.get("body")
        if body is None:
            content = b""
        elif result.get("isBase64Encoded"):
            content = base64.b64decode(body)
        elif isinstance(body, str):
            content = body.encode()
        else:
            content = json.dumps(body).encode()
            if not any(name == "content-type" for name, _ in headers):
                headers.append(("content-type", "application/json"))
        headers += [("set-cookie", str(cookie)) for cookie in result.get("cookies") or []]
        return status, headers, content
    if isinstance(result, str):
        return 200, [("content-type", "text/plain; charset=utf-8")], result.encode()
    return 200, [("content-type", "application/json")], json.dumps(result).encode()
