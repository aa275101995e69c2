"""Test helpers: build code archives in memory, deploy through the API, read instance records."""

from __future__ import annotations

import asyncio
import io
import json
import textwrap
import time
import zipfile
from typing import Any

import httpx

from faas.core import keys, wire
from faas.core.models import InstanceRecord, MemberRecord
from faas.core.service import etcd_from_settings
from faas.core.settings import Settings


def make_zip(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(name, textwrap.dedent(text))
    return buf.getvalue()


async def deploy(
    gw: httpx.AsyncClient, name: str, handler_code: str, *, files: dict[str, str] | None = None, **config: Any
) -> dict[str, Any]:
    archive = make_zip({"handler.py": handler_code, **(files or {})})
    resp = await gw.put(
        f"/v1/functions/{name}",
        data={"config": json.dumps({"handler": "handler.handler", **config})},
        files={"code": ("code.zip", archive, "application/zip")},
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


def internal_headers(settings: Settings) -> dict[str, str]:
    """What a call to an internal service (trigger, dispatcher, scheduler, node agent) must carry."""
    return {wire.INTERNAL_TOKEN: settings.internal_token}


async def instances_of(settings: Settings, name: str, ns: str = "default") -> list[InstanceRecord]:
    etcd = etcd_from_settings(settings)
    try:
        kvs, _ = await etcd.get_prefix(keys.instances_prefix(ns, name))
    finally:
        await etcd.close()
    return [InstanceRecord.model_validate_json(kv.value) for kv in kvs]


async def members_of(settings: Settings, role: str) -> list[MemberRecord]:
    etcd = etcd_from_settings(settings)
    try:
        kvs, _ = await etcd.get_prefix(keys.members_prefix(role))
    finally:
        await etcd.close()
    return [MemberRecord.model_validate_json(kv.value) for kv in kvs]


async def wait_until(predicate: Any, *, timeout_s: float, interval_s: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


class HostAnswer:
    """A function host's answer to ``POST /_/invoke`` read back into one dict (``json()``): ``result``
    (200) or ``error``, with the ``logs`` the host put before the body (``X-Faas-Logs-Bytes``) and
    ``duration_ms``, so tests read every part of the wire format the dispatcher reads."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status_code = response.status_code
        self.headers = response.headers
        self.text = response.text

    def json(self) -> dict[str, Any]:
        logs_bytes = int(self.headers["x-faas-logs-bytes"])
        content = self.response.content
        final = json.loads(content[logs_bytes:])
        out: dict[str, Any] = {
            "logs": content[:logs_bytes].decode(),
            "duration_ms": float(self.headers["x-faas-duration-ms"]),
        }
        if self.status_code == 200:
            out["result"] = final
        else:
            assert set(final) == {"error"} and self.headers["x-faas-error-kind"] == final["error"]["kind"]
            out["error"] = final["error"]
        return out
