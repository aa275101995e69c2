"""The internal services answer only the platform's own processes (issue 10).

The trigger, the dispatchers, the schedulers and the node agents refuse every request without the
platform's internal token (401 ``unauthorized``, nothing runs, nothing changes; counted with a
function's runs in its invocation log), over TCP and over their unix socket, except their
health check; a multiplexed connection that does not present the token first runs none of its
calls.  With the token the platform works as before, and user code never sees it.  The hop layer's
own checks (a refusal before the body arrives, the idle sweep of an unauthenticated connection, a
peer that refuses this process's token) are tested on a bare hop server; the launcher's token file
and a service started without a token last.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
from fastapi import FastAPI

from faas.core import mux, wire
from faas.core.clients import DispatcherClient, TokenRefused
from faas.core.hop_server import HopServer, Request, Response, Router, json_response
from faas.core.http import HopClient
from faas.core.models import MemberRecord
from faas.core.service import bind_socket
from faas.core.settings import Settings
from faas.launcher.embedded import INTERNAL_TOKEN_FILE, find_free_port, settings_env, with_credentials
from tests.conftest import ROOT, Platform
from tests.helpers import deploy, instances_of, members_of

TOKEN = "t" * 20 + "-the-right-one"
WRONG = "w" * 20 + "-another-one!"

# Its runs are counted from the platform's invocation log (a sandboxed function cannot write a file
# the test could read).
COUNTER = """
def handler(event, context):
    print("ran", context.function_name)
    return {"ok": True}
"""

SNOOP = """
import os

def handler(event, context):
    return {"seen": [k for k, v in os.environ.items() if event["needle"] in v]}
"""


async def runs(gw: httpx.AsyncClient, name: str, *, expect: int) -> int:
    """How many times ``name`` ran, from its invocation log, once it shows ``expect`` runs (or 5 s
    passed: the log is written in batches, right after each call)."""
    count = -1
    give_up_at = asyncio.get_running_loop().time() + 5.0
    while asyncio.get_running_loop().time() < give_up_at:
        resp = await gw.get(f"/v1/functions/{name}/logs", params={"limit": 1000})
        count = sum("ran " in str(entry.get("output", "")) for entry in resp.json()["logs"])
        if count >= expect:
            break
        await asyncio.sleep(0.05)
    return count


def socket_path(record: MemberRecord) -> str:
    assert record.local_address is not None, f"{record.member_id} has no unix socket"
    return unquote(record.local_address.removeprefix("http+unix://"))


async def mux_exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> list[tuple[int, int, bytes]]:
    """Send ``data`` on a raw connection, then read every frame until the peer closes (or 5 s)."""
    writer.write(data)
    await writer.drain()
    frames = mux.FrameReader()
    got: list[tuple[int, int, bytes]] = []
    async with asyncio.timeout(5):
        while chunk := await reader.read(65536):
            got.extend(frames.feed(chunk))
    writer.close()
    return got


def request_frame(stream: int, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    head = f"{method} {target}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers.items()) + "\r\n"
    return mux.frame(mux.REQUEST, stream, head.encode() + body)


def assert_refused(frames: list[tuple[int, int, bytes]]) -> None:
    """One refusal of the connection (stream 0, 401 unauthorized) and nothing else."""
    assert len(frames) == 1, frames
    kind, stream, payload = frames[0]
    assert (kind, stream) == (mux.RESPONSE, mux.REFUSAL_STREAM)
    answer = mux.parse_response(payload)
    assert answer.status == 401 and json.loads(answer.body)["error"]["kind"] == "unauthorized"


# --------------------------------------------------------------------------------------------------
# The real platform


@pytest.mark.integration
@pytest.mark.parametrize("platform", ["process"], indirect=True)
async def test_every_internal_service_refuses_callers_without_the_token_and_nothing_runs(
    platform: Platform, gw: httpx.AsyncClient
) -> None:
    settings = platform.settings
    assert len(settings.internal_token) >= 32
    # One instance, for good: it stays however long the refusals below take (the test platform reaps
    # idle instances after 4 s), so only a refused call could remove or replace it.
    view = await deploy(gw, "guarded", COUNTER, min_instances=1, max_instances=1)
    uid = view["uid"]
    first = await gw.post("/v1/functions/guarded/invoke", json={})
    assert first.status_code == 200, first.text
    assert await runs(gw, "guarded", expect=1) == 1
    [instance] = await instances_of(settings, "guarded")

    members = {role: await members_of(settings, role) for role in ("trigger", "dispatcher", "scheduler", "node")}
    assert all(members.values()), members
    invoke_headers = {wire.FUNCTION_UID: uid, wire.REQUEST_ID: "refused-call"}
    enqueue = {"events": [{"namespace": "default", "function": "guarded", "version": 1, "payload": "{}"}]}
    # What each service does that a stranger must not be able to make it do.
    routes: dict[str, list[tuple[str, str, dict[str, object]]]] = {
        "trigger": [
            ("POST", "/v1/invoke/default/guarded/1", {"content": b"{}", "headers": invoke_headers}),
            ("POST", "/v1/invoke-async/default/guarded/1", {"content": b"{}", "headers": invoke_headers}),
            ("POST", wire.TRIGGER_ENQUEUE, {"json": enqueue}),
            ("GET", "/openapi.json", {}),
        ],
        "dispatcher": [
            ("POST", "/v1/invoke/default/guarded/1", {"content": b"{}", "headers": invoke_headers}),
            ("GET", "/v1/pools", {}),
        ],
        "scheduler": [
            ("POST", "/v1/acquire/default/guarded/1", {"params": {"uid": uid}}),
            ("POST", wire.scheduler_retire(instance.instance_id), {}),
        ],
        "node": [
            ("DELETE", wire.node_instance(instance.instance_id), {}),
            ("POST", wire.NODE_INSTANCES, {"json": {}}),
            ("GET", wire.NODE_INSTANCES, {}),
            ("GET", wire.node_instance_exit(instance.instance_id), {}),
        ],
    }
    wrong: list[str] = []
    for role, records in members.items():
        for record in records:
            transports = {
                "tcp": (record.address, None),
                "unix": ("http://service", httpx.AsyncHTTPTransport(uds=socket_path(record))),
            }
            for via, (base, transport) in transports.items():
                for credential in ({}, {wire.INTERNAL_TOKEN: WRONG}, {wire.INTERNAL_TOKEN: ""}):
                    async with httpx.AsyncClient(base_url=base, transport=transport, timeout=10, headers=credential) as client:
                        health = await client.get(wire.HEALTH)
                        if health.status_code != 200:
                            wrong.append(f"{record.member_id} {via} /healthz: {health.status_code}")
                        for method, path, options in routes[role]:
                            resp = await client.request(method, path, **options)  # type: ignore[arg-type]
                            error = resp.json().get("error", {}) if resp.status_code == 401 else {}
                            if error.get("kind") != "unauthorized":
                                wrong.append(f"{record.member_id} {via} {credential} {method} {path}: {resp.status_code}")
            # The multiplexed protocol, on both listeners: no HELLO, then a HELLO with another token.
            for via in ("tcp", "unix"):
                for greeting in (mux.PREFACE, mux.hello(WRONG)):
                    method, path, options = routes[role][0]
                    if via == "tcp":
                        host, port = record.address.removeprefix("http://").rsplit(":", 1)
                        reader, writer = await asyncio.open_connection(host, int(port))
                    else:
                        reader, writer = await asyncio.open_unix_connection(socket_path(record))
                    target = path + (f"?uid={uid}" if role == "scheduler" else "")
                    frames = await mux_exchange(reader, writer, greeting + request_frame(1, method, target, invoke_headers, b"{}"))
                    assert_refused(frames)
            # And the platform's own client, given another token.
            stranger = HopClient(internal_token=WRONG)
            try:
                refused = await stranger.request("GET", f"{record.local_address}{wire.HEALTH}", timeout_s=5)
                assert refused.status == 401, (record.member_id, refused.status)
            finally:
                await stranger.close()
    assert wrong == []

    await asyncio.sleep(1.0)  # an async call or an event that slipped through would have run by now
    assert await runs(gw, "guarded", expect=2) == 1, "a call without the internal token ran the function"
    assert [r.instance_id for r in await instances_of(settings, "guarded")] == [instance.instance_id], (
        "a refused call started, retired or stopped an instance"
    )
    again = await gw.post("/v1/functions/guarded/invoke", json={})
    assert again.status_code == 200 and again.headers["x-faas-instance"] == instance.instance_id
    assert again.headers["x-faas-cold"] == "0"  # the instance a refused DELETE named still serves
    assert await runs(gw, "guarded", expect=2) == 2

    # With the token, a platform process's calls work as before: multiplexed on the unix socket, HTTP on TCP.
    [trigger_leader] = [m for m in members["trigger"] if (await _healthz(m))["primary"]]
    own = HopClient(internal_token=settings.internal_token)
    try:
        direct = await own.post(
            wire.hop_address(trigger_leader) + wire.trigger_invoke("default", "guarded", 1), body=b"{}",
            headers={wire.FUNCTION_UID: uid, wire.REQUEST_ID: "with-token"}, timeout_s=30,
        )  # fmt: skip
        assert direct.status == 200, direct.body
    finally:
        await own.close()
    async with httpx.AsyncClient(headers={wire.INTERNAL_TOKEN: settings.internal_token}, timeout=10) as client:
        pools = await client.get(members["dispatcher"][0].address + "/v1/pools")
        assert pools.status_code == 200 and "pools" in pools.json()
    assert await runs(gw, "guarded", expect=3) == 3


async def _healthz(record: MemberRecord) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=10) as client:  # health needs no token
        return (await client.get(record.address + wire.HEALTH)).json()  # type: ignore[no-any-return]


@pytest.mark.integration
@pytest.mark.parametrize("platform", ["process"], indirect=True)
async def test_user_code_never_sees_the_internal_token(platform: Platform, gw: httpx.AsyncClient) -> None:
    await deploy(gw, "snoop", SNOOP)
    resp = await gw.post("/v1/functions/snoop/invoke", json={"needle": platform.settings.internal_token})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"seen": []}
    token_file = platform.settings.home / INTERNAL_TOKEN_FILE
    assert token_file.read_text().strip() == platform.settings.internal_token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600


# --------------------------------------------------------------------------------------------------
# The hop layer


@asynccontextmanager
async def guarded_server(run_dir: Path, idle_timeout_s: float = 75.0) -> AsyncIterator[tuple[str, str, list[str]]]:
    """A hop server that requires ``TOKEN``, on TCP and a unix socket: (TCP URL, unix URL, calls run)."""
    ran: list[str] = []
    router = Router()

    async def hot(request: Request) -> Response:
        ran.append("hot")
        return json_response({"body": (await request.body.read()).decode()})

    router.add("POST", "/v1/invoke/{ns}/{name}/{version:int}", hot)
    fallback = FastAPI()

    @fallback.get(wire.HEALTH)
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @fallback.post("/managed")
    async def managed() -> dict[str, bool]:
        ran.append("managed")
        return {"ok": True}

    tcp = bind_socket("127.0.0.1", 0)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = run_dir / "svc.sock"
    unix.bind(str(path))
    unix.listen(16)
    servers = [HopServer(router, fallback, internal_token=TOKEN, idle_timeout_s=idle_timeout_s) for _ in range(2)]
    await servers[0].start(tcp)
    await servers[1].start(unix)
    try:
        yield f"http://127.0.0.1:{tcp.getsockname()[1]}", wire.unix_address(path), ran
    finally:
        for server in servers:
            await server.shutdown(0.2)


async def test_the_hop_server_refuses_before_the_body_and_serves_the_token(run_dir: Path) -> None:
    async with guarded_server(run_dir) as (tcp_url, unix_url, ran):
        port = int(tcp_url.rsplit(":", 1)[1])
        # A request that declares a megabyte and sends none of it is answered at once: the body is
        # not waited for, and the connection ends.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/invoke/d/f/1 HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n")
        async with asyncio.timeout(2):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401 ") and b"connection: close" in head
        writer.close()
        async with httpx.AsyncClient(base_url=tcp_url) as client:
            assert (await client.get(wire.HEALTH)).status_code == 200
            for headers in ({}, {wire.INTERNAL_TOKEN: WRONG}, {wire.INTERNAL_TOKEN: TOKEN[:-1]}):
                assert (await client.post("/v1/invoke/d/f/1", content=b"{}", headers=headers)).status_code == 401
                assert (await client.post("/managed", headers=headers)).status_code == 401
            assert ran == []
            ok = await client.post("/v1/invoke/d/f/1", content=b"{}", headers={wire.INTERNAL_TOKEN: TOKEN})
            assert ok.status_code == 200 and ok.json() == {"body": "{}"}
        # The platform's client: the header over HTTP, the HELLO over the unix socket.
        own = HopClient(internal_token=TOKEN)
        try:
            answers = await asyncio.gather(*(
                own.post(f"{url}/v1/invoke/d/f/1", body=b"{}", headers={}, timeout_s=5)
                for url in (tcp_url, unix_url) for _ in range(10)
            ))  # fmt: skip
            assert [a.status for a in answers] == [200] * 20
            assert (await own.request("POST", f"{unix_url}/managed", timeout_s=5)).status == 200
        finally:
            await own.close()
        assert ran.count("hot") == 21 and ran.count("managed") == 1


async def test_a_multiplexed_connection_without_the_token_runs_nothing(run_dir: Path) -> None:
    async with guarded_server(run_dir, idle_timeout_s=0.4) as (tcp_url, unix_url, ran):
        path = unquote(unix_url.removeprefix("http+unix://"))
        call = request_frame(1, "POST", "/v1/invoke/d/f/1", {}, b"{}") + request_frame(3, "GET", wire.HEALTH, {})
        for greeting in (mux.PREFACE, mux.hello(WRONG), mux.PREFACE + mux.frame(mux.HELLO, 0, b"")):
            reader, writer = await asyncio.open_unix_connection(path)
            assert_refused(await mux_exchange(reader, writer, greeting + call))
        # Calls already outstanding when the refusal comes all get it, and none ran.
        for token in (None, WRONG):
            stranger = HopClient(internal_token=token)
            try:
                answers = await asyncio.gather(*(
                    stranger.post(f"{unix_url}/v1/invoke/d/f/1", body=b"{}", headers={}, timeout_s=5) for _ in range(5)
                ))  # fmt: skip
                assert [a.status for a in answers] == [401] * 5
                assert b"FAAS_INTERNAL_TOKEN" in answers[0].body
            finally:
                await stranger.close()
        # A connection that sends the preface and then nothing is closed like an idle one.
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(mux.PREFACE)
        async with asyncio.timeout(3):
            assert await reader.read() == b""
        writer.close()
        assert ran == []


async def test_a_service_that_refuses_this_process_token_is_a_platform_error(run_dir: Path) -> None:
    """Two processes given different tokens: the caller fails with a message naming the setting, not
    with a 401 that a user would read as their API key's."""
    async with guarded_server(run_dir) as (tcp_url, unix_url, ran):
        client = DispatcherClient(internal_token=WRONG)
        try:
            for base in (tcp_url, unix_url):
                with pytest.raises(TokenRefused, match="FAAS_INTERNAL_TOKEN"):
                    await client.invoke(base, "d", "f", 1, b"{}", request_id="r", deadline=1e12, function_uid=None)
        finally:
            await client.close()
        assert ran == []


# --------------------------------------------------------------------------------------------------
# Where the token comes from


def test_the_embedded_platform_keeps_one_token_in_its_home_folder(tmp_path: Path) -> None:
    first = with_credentials(Settings(home=tmp_path))
    path = tmp_path / INTERNAL_TOKEN_FILE
    assert len(first.internal_token) >= 32 and path.read_text().strip() == first.internal_token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert with_credentials(Settings(home=tmp_path)).internal_token == first.internal_token  # kept across starts
    assert settings_env(first)["FAAS_INTERNAL_TOKEN"] == first.internal_token  # every service gets it
    configured = with_credentials(Settings(home=tmp_path, internal_token=TOKEN))
    assert configured.internal_token == TOKEN


@pytest.mark.parametrize(
    ("module", "token"),
    [("faas.dispatcher", None), ("faas.runtime", None), ("gateway", None), ("faas.trigger", "short"), ("faas.scheduler", "x" * 20 + " space")],
)
def test_a_service_without_a_usable_token_refuses_to_start(tmp_path: Path, module: str, token: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAAS_")}
    # Free ports only, should one of them start after all (it must not).
    env.update(
        FAAS_HOME=str(tmp_path), FAAS_ETCD_URL=f"http://127.0.0.1:{find_free_port()}", PYTHONPATH=str(ROOT),
        FAAS_GATEWAY_PORT=str(find_free_port()),
    )
    if token is not None:
        env["FAAS_INTERNAL_TOKEN"] = token
    done = subprocess.run(
        [sys.executable, "-m", module, "--id", "no-token", "--port", "0"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "FAAS_INTERNAL_TOKEN" in done.stderr and "faas up" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
