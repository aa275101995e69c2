"""HTTP trigger mapping: requests to API Gateway proxy (payload v2.0) events, and handler results back
to HTTP responses, the way Lambda function URLs do it."""

from __future__ import annotations

from typing import Any

from fastapi import Request, Response

from faas.core.http_events import http_answer, http_event


def build_event(request: Request, path: str, body: bytes, request_id: str) -> dict[str, Any]:
    return http_event(
        method=request.method, path=path, query=request.url.query,
        headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
        body=body, request_id=request_id, source_ip=request.client.host if request.client else "",
        http_version=request.scope.get("http_version", "1.1"),
    )  # fmt: skip


def build_response(result: Any, headers: dict[str, str]) -> Response:
    """A handler's return value as an HTTP response (``statusCode``/``headers``/``body`` if present)."""
    status, answer_headers, content = http_answer(result)
    response = Response(content, status_code=status, headers=headers)
    for name, value in answer_headers:
        if name == "set-cookie":
            response.headers.append(name, value)
        else:
            response.headers[name] = value
    return response
