"""The function host (faas/runtime/host.py) spoken to over its real unix-socket HTTP contract.

Each test starts real ``python -S -E host.py`` processes and serves code archives from a local
http.server; nothing of the host is mocked.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import time
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from tests.code_server import CodeServer
from tests.helpers import HostAnswer, make_zip
from tests.hosts import Host, specialize_body

pytestmark = pytest.mark.timeout(30)


SYNC_APP = {
    "app.py": """
        import os, threading, time

        def handler(event, context):
            action = event.get("action")
            if action == "sleep":
                print("start", event["tag"])
                time.sleep(event["seconds"])
                print("end", event["tag"])
                return event["tag"]
            if action == "raise":
                raise ValueError("bad input: " + str(event.get("detail")))
            if action == "exit":
                raise SystemExit(3)
            if action == "oom":
                raise MemoryError()
            if action == "allocate":
                return len(bytearray(event["mib"] * 1024 * 1024))
            if action == "unserialisable":
                return {"when": object()}
            if action == "spam":
                print("x" * 100_000)
                return "spammed"
            print("hello from", threading.current_thread().name, event)
            return {
                "event": event,
                "request_id": context.request_id,
                "aws_request_id": context.aws_request_id,
                "function_name": context.function_name,
                "function_version": context.function_version,
                "namespace": context.namespace,
                "memory_limit_in_mb": context.memory_limit_in_mb,
                "remaining_ms": context.get_remaining_time_in_millis(),
                "greeting": os.environ.get("GREETING"),
                "cwd": os.getcwd(),
            }
    """
}

ASYNC_APP = {
    "pkg/__init__.py": "",
    "pkg/app.py": """
        import asyncio, sys, time

        async def handler(event, context):
            if event.get("action") == "sleep":
                print("sleeping", event["tag"])
                await asyncio.sleep(event["seconds"])
                print("woke", event["tag"])
                return event["tag"]
            if event.get("action") == "block":
                time.sleep(event["seconds"])  # blocks the event loop: a bug of the handler
                return "blocked"
            await asyncio.sleep(0)
            print("async hello", file=sys.stderr)
            return {"event": event, "request_id": context.request_id}
    """,
}


async def test_generic_host_answers_health(spawn_host: Callable[[], Awaitable[Host]]) -> None:
    host = await spawn_host()
    health = (await host.client.get("/_/health")).json()
    assert health["state"] == "generic"
    assert health["pid"] == host.process.pid
    assert health["inflight"] == 0 and health["invocations"] == 0
    not_ready = await host.invoke({})
    assert not_ready.status_code == 409


async def test_sync_handler_sees_event_context_and_environment(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer
) -> None:
    host = await spawn_host()
    specialised = await host.specialize(code_server, SYNC_APP)
    assert specialised.status_code == 200, specialised.text
    assert specialised.json()["state"] == "ready"
    assert specialised.json()["duration_ms"] > 0

    deadline_ms = int(time.time() * 1000) + 2000
    response = await host.invoke(
        {"n": 1}, **{"X-Faas-Request-Id": "req-1", "X-Faas-Deadline-Ms": str(deadline_ms)}
    )
    assert response.status_code == 200, response.response.text
    # On the wire: the output first, X-Faas-Logs-Bytes long, then the body the caller gets, untouched.
    raw = response.response.content
    logs_bytes = int(response.headers["x-faas-logs-bytes"])
    assert raw[:logs_bytes].decode().startswith("hello from handler")
    assert json.loads(raw[logs_bytes:])["event"] == {"n": 1}
    assert "x-faas-error-kind" not in response.headers
    body = response.json()
    result = body["result"]
    assert result["event"] == {"n": 1}
    assert result["request_id"] == result["aws_request_id"] == "req-1"
    assert (result["function_name"], result["function_version"], result["namespace"]) == (
        "hello",
        "3",
        "default",
    )
    assert result["memory_limit_in_mb"] == 128
    assert 1000 < result["remaining_ms"] <= 2000  # bounded by the deadline, not the 5 s timeout
    assert result["greeting"] == "hej"
    assert Path(result["cwd"]).parent == host.cache_dir
    assert body["logs"].startswith("hello from handler")
    assert body["duration_ms"] >= 0

    health = (await host.client.get("/_/health")).json()
    assert health["state"] == "ready" and health["invocations"] == 1

    # Handler output is returned with the invocation, never written to the host's stdout.
    host.process.send_signal(signal.SIGTERM)
    assert await host.exited() == 0
    assert host.stdout.read_text() == ""


async def test_async_handler_in_a_package(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer
) -> None:
    host = await spawn_host()
    specialised = await host.specialize(code_server, ASYNC_APP, handler="pkg.app.handler")
    assert specialised.status_code == 200, specialised.text
    response = await host.invoke({"a": [1, 2]}, **{"X-Faas-Request-Id": "r-async"})
    assert response.status_code == 200
    assert response.json()["result"] == {"event": {"a": [1, 2]}, "request_id": "r-async"}
    assert response.json()["logs"] == "async hello\n"
    # An empty body is the event {} (as a Lambda invoke without payload).
    empty = HostAnswer(await host.client.post("/_/invoke", content=b""))
    assert empty.json()["result"]["event"] == {}


@pytest.mark.parametrize("app, handler", [(SYNC_APP, "app.handler"), (ASYNC_APP, "pkg.app.handler")])
async def test_concurrent_invocations_keep_their_own_logs(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer, app: dict[str, str], handler: str
) -> None:
    host = await spawn_host()
    assert (await host.specialize(code_server, app, handler=handler, concurrency=2)).status_code == 200
    first, second = await asyncio.gather(
        host.invoke({"action": "sleep", "tag": "A", "seconds": 0.3}),
        host.invoke({"action": "sleep", "tag": "B", "seconds": 0.1}),
    )
    assert first.json()["result"] == "A" and second.json()["result"] == "B"
    assert "A\n" in first.json()["logs"] and "B" not in first.json()["logs"]
    assert "B\n" in second.json()["logs"] and "A" not in second.json()["logs"]


async def test_logs_are_truncated_at_64_kib(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer
) -> None:
    host = await spawn_host()
    assert (await host.specialize(code_server, SYNC_APP)).status_code == 200
    response = await host.invoke({"action": "spam"})
    assert response.json()["result"] == "spammed"
    logs = response.json()["logs"]
    assert logs.startswith("x" * 1000)
    assert "output truncated at 64 KiB" in logs
    assert len(logs) < 64 * 1024 + 200


async def test_handler_exception_is_a_function_error_and_host_stays(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer
) -> None:
    host = await spawn_host()
    assert (await host.specialize(code_server, SYNC_APP)).status_code == 200

    failed = await host.invoke({"action": "raise", "detail": 42})
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert (error["kind"], error["type"], error["message"]) == (
        "function_error",
        "ValueError",
        "bad input: 42",
    )
    assert any("app.py" in frame and "raise ValueError" in frame for frame in error["traceback"])
    assert not any("host.py" in frame for frame in error["traceback"])
    assert "X-Faas-Retire" not in failed.headers

    exited = await host.invoke({"action": "exit"})
    assert exited.status_code == 500
    assert exited.json()["error"]["type"] == "SystemExit"

    unserialisable = await host.invoke({"action": "unserialisable"})
    assert unserialisable.status_code == 500
    assert unserialisable.json()["error"]["type"] == "TypeError"
    assert "not JSON serialisable" in unserialisable.json()["error"]["message"]

    bad_event = HostAnswer(await host.client.post("/_/invoke", content=b"{not json"))
    assert bad_event.status_code == 400
    assert bad_event.json()["error"]["kind"] == "invalid_request"

    ok = await host.invoke({"n": 2})
    assert ok.status_code == 200 and ok.json()["result"]["event"] == {"n": 2}
    assert host.process.returncode is None


async def test_sync_timeout_answers_504_then_retires(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer
) -> None:
    host = await spawn_host()
    assert (await host.specialize(code_server, SYNC_APP, timeout_s=0.3)).status_code == 200
    started = time.monotonic()
    response = await host.invoke({"action": "sleep", "tag": "slow", "seconds": 10})
    assert time.monotonic() - started < 2
    assert response.status_code == 504
    assert response.headers["X-Faas-Retire"] == "1"
    assert response.json()["error"] == {
        "kind": "function_timeout",
        "type": "TimeoutError",
        "message": "function exceeded its timeout of 0.3 s",
    }
    assert response.json()["logs"] == "start slow\n"
    assert await host.exited() == 4


async def test_async_timeout_cancels_and_host_stays(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer
) -> None:
    host = await spawn_host()
    specialised = await host.specialize(code_server, ASYNC_APP, handler="pkg.app.handler", timeout_s=0.3)
    assert specialised.status_code == 200
    response = await host.invoke({"action": "sleep", "tag": "slow", "seconds": 10})
    assert response.status_code == 504
    assert "X-Faas-Retire" not in response.headers
    assert response.json()["error"]["message"] == "function exceeded its timeout of 0.3 s"
    ok = await host.invoke({"n": 1})
    assert ok.status_code == 200
    health = (await host.client.get("/_/health")).json()
    assert health["inflight"] == 0 and health["invocations"] == 2


async def test_an_async_handler_blocking_the_loop_past_its_timeout_retires_the_host(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer
) -> None:
    host = await spawn_host()
    specialised = await host.specialize(code_server, ASYNC_APP, handler="pkg.app.handler", timeout_s=0.3)
    assert specialised.status_code == 200
    started = time.monotonic()
    response = await host.invoke({"action": "block", "seconds": 30})
    assert response.status_code == 504
    assert response.headers["X-Faas-Retire"] == "1"  # nothing async can run on it any more
    assert time.monotonic() - started < 3
    assert await host.exited() == 4


async def test_an_event_too_deep_to_parse_is_refused_and_its_slot_given_back(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer
) -> None:
    host = await spawn_host()
    assert (await host.specialize(code_server, SYNC_APP, concurrency=1)).status_code == 200
    deep = b"[" * 200_000 + b"]" * 200_000
    refused = await host.client.post("/_/invoke", content=deep)
    assert refused.status_code == 400, refused.text
    assert "nested too deeply" in refused.json()["error"]["message"]
    ok = await host.invoke({"n": 1})
    assert ok.status_code == 200  # the one slot is free again
    health = (await host.client.get("/_/health")).json()
    assert health["inflight"] == 0


async def test_deadline_header_shortens_the_budget(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer
) -> None:
    host = await spawn_host()
    specialised = await host.specialize(code_server, ASYNC_APP, handler="pkg.app.handler", timeout_s=30)
    assert specialised.status_code == 200
    deadline_ms = int(time.time() * 1000) + 200
    started = time.monotonic()
    response = await host.invoke(
        {"action": "sleep", "tag": "t", "seconds": 5}, **{"X-Faas-Deadline-Ms": str(deadline_ms)}
    )
    assert time.monotonic() - started < 2
    assert response.status_code == 504
    assert response.json()["error"]["kind"] == "function_timeout"
    past = await host.invoke({}, **{"X-Faas-Deadline-Ms": str(int(time.time() * 1000) - 10)})
    assert past.status_code == 504


async def test_concurrency_limit_refuses_with_429(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer
) -> None:
    host = await spawn_host()
    assert (await host.specialize(code_server, SYNC_APP, concurrency=1)).status_code == 200
    busy = asyncio.ensure_future(host.invoke({"action": "sleep", "tag": "busy", "seconds": 0.5}))
    try:
        for _ in range(500):
            if (await host.client.get("/_/health")).json()["inflight"] == 1:
                break
            await asyncio.sleep(0.01)
        refused = await host.invoke({"n": 1})
        assert refused.status_code == 429
        assert refused.json()["error"]["kind"] == "too_many_requests"
    finally:
        done = await busy
    assert done.status_code == 200 and done.json()["result"] == "busy"
    assert (await host.invoke({"n": 2})).status_code == 200


async def test_memory_error_answers_507_and_retires(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer
) -> None:
    host = await spawn_host()
    assert (await host.specialize(code_server, SYNC_APP)).status_code == 200
    response = await host.invoke({"action": "oom"})
    assert response.status_code == 507
    assert response.json()["error"]["kind"] == "out_of_memory"
    assert response.headers["X-Faas-Retire"] == "1"
    assert await host.exited() == 4


async def test_memory_cap_turns_a_large_allocation_into_507(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer
) -> None:
    host = await spawn_host()
    assert (await host.specialize(code_server, SYNC_APP, memory_mb=128)).status_code == 200
    assert (await host.invoke({"action": "allocate", "mib": 64})).json()["result"] == 64 * 1024 * 1024
    response = await host.invoke({"action": "allocate", "mib": 4096})
    assert response.status_code == 507
    assert response.json()["error"]["message"] == "the function exceeded its memory limit of 128 MB"
    assert await host.exited() == 4


async def test_client_disconnects_leave_the_host_serving(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer
) -> None:
    host = await spawn_host()
    assert (await host.specialize(code_server, SYNC_APP, concurrency=2)).status_code == 200
    # Half a request, then gone.
    _, writer = await asyncio.open_unix_connection(str(host.socket_path))
    writer.write(b"POST /_/invoke HTTP/1.1\r\nContent-Le")
    writer.close()
    # A whole request, gone before the answer.
    body = b'{"action": "sleep", "tag": "gone", "seconds": 0.2}'
    _, writer = await asyncio.open_unix_connection(str(host.socket_path))
    writer.write(b"POST /_/invoke HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.4)
    health = (await host.client.get("/_/health")).json()
    assert health["inflight"] == 0 and health["invocations"] == 1
    assert (await host.invoke({"n": 1})).status_code == 200
    host.process.send_signal(signal.SIGTERM)
    assert await host.exited() == 0
    assert "Traceback" not in host.stdout.with_suffix(".err").read_text()


def _zip_slip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("app.py", "def handler(e, c):\n    return 1\n")
        archive.writestr("../evil.py", "print('escaped')\n")
    return buffer.getvalue()


START_FAILURES = [
    pytest.param(
        make_zip({"other.py": "x = 1\n"}),
        "app.handler",
        "ModuleNotFoundError",
        "handler module 'app' not found in the code archive (handler 'app.handler')",
        id="missing-module",
    ),
    pytest.param(
        make_zip({"app.py": "def main(e, c):\n    return 1\n"}),
        "app.handler",
        "AttributeError",
        "module 'app' has no function 'handler'",
        id="missing-function",
    ),
    pytest.param(
        make_zip({"app.py": "raise RuntimeError('no config')\n"}),
        "app.handler",
        "RuntimeError",
        "importing handler module 'app' raised RuntimeError: no config",
        id="import-raises",
    ),
    pytest.param(
        # Named like the platform's own start timeouts; still the user's code (the fault says so).
        make_zip({"app.py": "raise TimeoutError('database did not answer')\n"}),
        "app.handler",
        "TimeoutError",
        "importing handler module 'app' raised TimeoutError: database did not answer",
        id="import-raises-timeout",
    ),
    pytest.param(
        make_zip({"app.py": "import requests\n"}),
        "app.handler",
        "ModuleNotFoundError",
        "No module named 'requests'",
        id="missing-dependency",
    ),
    pytest.param(
        make_zip({"json.py": "def handler(e, c):\n    return 1\n"}),
        "json.handler",
        "ImportError",
        "handler module 'json' is not in the code archive",
        id="stdlib-shadowed",
    ),
    pytest.param(
        b"this is not a zip",
        "app.handler",
        "BadZipFile",
        "code archive is not a valid zip file",
        id="not-zip",
    ),
    pytest.param(_zip_slip(), "app.handler", "UnsafeArchive", "unsafe path: '../evil.py'", id="zip-slip"),
]


@pytest.mark.parametrize("archive, handler, error_type, message", START_FAILURES)
async def test_failed_specialisation_answers_start_error_and_exits(
    spawn_host: Callable[[], Awaitable[Host]],
    code_server: CodeServer,
    archive: bytes,
    handler: str,
    error_type: str,
    message: str,
) -> None:
    host = await spawn_host()
    url, _, sha = code_server.publish(archive)
    response = await host.client.post(
        "/_/specialize", json=specialize_body(url, sha, len(archive), handler=handler)
    )
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["kind"] == "instance_start_error"
    assert error["type"] == error_type
    assert message in error["message"]
    assert error["fault"] == "function"  # the user's code or archive: async retries count it
    assert await host.exited() == 3
    assert not (host.cache_dir.parent / "evil.py").exists()


async def test_sha256_mismatch_is_refused(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer
) -> None:
    host = await spawn_host()
    archive = make_zip(SYNC_APP)
    url, _, sha = code_server.publish(archive)
    wrong = "0" * 64
    response = await host.client.post("/_/specialize", json=specialize_body(url, wrong, len(archive)))
    assert response.status_code == 502
    assert response.json()["error"]["message"] == f"code archive sha256 mismatch: expected {wrong}, got {sha}"
    assert "fault" not in response.json()["error"]  # the stored archive's, not the user's
    assert await host.exited() == 3
    assert not (host.cache_dir / wrong).exists()
    assert [p.name for p in host.cache_dir.iterdir()] == []  # no staging dir left behind


async def test_unreachable_code_url_is_a_start_error(spawn_host: Callable[[], Awaitable[Host]]) -> None:
    host = await spawn_host()
    body = specialize_body("http://127.0.0.1:9/code.zip", "a" * 64, 10)
    response = await host.client.post("/_/specialize", json=body)
    assert response.status_code == 502
    assert response.json()["error"]["message"].startswith("cannot download the code archive")
    assert "fault" not in response.json()["error"]  # the platform's: S3 or the network
    assert await host.exited() == 3


async def test_second_specialise_is_a_conflict(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer
) -> None:
    host = await spawn_host()
    assert (await host.specialize(code_server, SYNC_APP)).status_code == 200
    again = await host.specialize(code_server, ASYNC_APP, handler="pkg.app.handler")
    assert again.status_code == 409
    assert (await host.invoke({"n": 1})).status_code == 200


async def test_hosts_share_the_unpacked_archive(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer
) -> None:
    archive = make_zip(SYNC_APP)
    url, path, sha = code_server.publish(archive)
    first, second = await asyncio.gather(spawn_host(), spawn_host())
    # Both race to unpack the same archive; both must end up on the same verified directory.
    racing = await asyncio.gather(
        first.client.post("/_/specialize", json=specialize_body(url, sha, len(archive))),
        second.client.post("/_/specialize", json=specialize_body(url, sha, len(archive))),
    )
    assert [r.status_code for r in racing] == [200, 200]
    third = await spawn_host()
    hits_before = code_server.hits[path]
    assert (
        await third.client.post("/_/specialize", json=specialize_body(url, sha, len(archive)))
    ).status_code == 200
    assert code_server.hits[path] == hits_before  # served from the cache, no download
    assert sorted(p.name for p in first.cache_dir.iterdir()) == [sha]
    results = await asyncio.gather(*(h.invoke({"n": 1}) for h in (first, second, third)))
    assert {r.json()["result"]["cwd"] for r in results} == {str(first.cache_dir / sha)}


async def test_sigterm_exits_promptly(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer
) -> None:
    host = await spawn_host()
    assert (await host.specialize(code_server, SYNC_APP)).status_code == 200
    busy = asyncio.ensure_future(host.invoke({"action": "sleep", "tag": "t", "seconds": 10}))
    await asyncio.sleep(0.1)
    host.process.send_signal(signal.SIGTERM)
    assert await host.exited(within_s=2) == 0
    with pytest.raises(httpx.TransportError):
        await busy
    assert not host.socket_path.exists()


async def test_malformed_specialise_request_is_refused(spawn_host: Callable[[], Awaitable[Host]]) -> None:
    host = await spawn_host()
    response = await host.client.post("/_/specialize", json={"handler": "app.handler"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["kind"] == "instance_start_error"
    assert error["message"] == "invalid specialize request: code_url must be a non-empty string"
    assert await host.exited() == 3
