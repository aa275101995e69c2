"""HTTP trigger mapping: requests to API Gateway proxy (payload v2.0) events, and handler results back
to HTTP responses, the way Lambda function URLs do it."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from fastapi import Request, Response

_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/x-www-form-urlencoded", "application/javascript")


def build_event(request: Request, path: str, body: bytes, request_id: str) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "")
    is_text = not body or content_type.startswith(_TEXT_TYPES)
    if is_text:
        try:
            body_field: str | None = body.decode("utf-8") if body else None
            is_b64 = False
        except UnicodeDecodeError:
            body_field, is_b64 = base64.b64encode(body).decode(), True
    else:
        body_field, is_b64 = base64.b64encode(body).decode(), True
    headers: dict[str, str] = {}
    for key, value in request.headers.items():
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    query: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        query[key] = f"{query[key]},{value}" if key in query else value
    raw_path = "/" + path
    now = time.time()
    client = request.client.host if request.client else ""
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": raw_path,
        "rawQueryString": request.url.query,
        "cookies": [c.strip() for c in request.headers.get("cookie", "").split(";") if c.strip()],
        "headers": headers,
        "queryStringParameters": query or None,
        "pathParameters": {"proxy": path},
        "requestContext": {
            "accountId": "anonymous",
            "apiId": "faas",
            "domainName": request.headers.get("host", ""),
            "http": {
                "method": request.method,
                "path": raw_path,
                "protocol": f"HTTP/{request.scope.get('http_version', '1.1')}",
                "sourceIp": client,
                "userAgent": request.headers.get("user-agent", ""),
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


def build_response(result: Any, headers: dict[str, str]) -> Response:
    """A handler's return value as an HTTP response (``statusCode``/``headers``/``body`` if present)."""
    if isinstance(result, dict) and "statusCode" in result:
        status = int(result.get("statusCode") or 200)
        out_headers = {str(k): str(v) for k, v in (result.get("headers") or {}).items()}
        body = result.get("body")
        if body is None:
            content = b""
        elif result.get("isBase64Encoded"):
            content = base64.b64decode(body)
        elif isinstance(body, str):
            content = body.encode()
        else:
            content = json.dumps(body).encode()
            out_headers.setdefault("content-type", "application/json")
        response = Response(content, status_code=status, headers={**headers, **out_headers})
        for cookie in result.get("cookies") or []:
            response.headers.append("set-cookie", str(cookie))
        return response
    if isinstance(result, str):
        return Response(result.encode(), status_code=200, headers=headers, media_type="text/plain")
    return Response(json.dumps(result).encode(), status_code=200, headers=headers, media_type="application/json")
