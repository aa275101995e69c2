"""How services listen: TCP with TCP_NODELAY, and a private unix socket for the hops of one machine."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from urllib.parse import unquote

import httpx
import pytest

from faas.core import wire
from faas.core.http import HopClient
from faas.core.models import MemberRecord
from faas.core.service import bind_socket
from tests.conftest import Platform
from tests.helpers import deploy, members_of


async def test_accepted_connections_have_nodelay() -> None:
    listener = bind_socket("127.0.0.1", 0)
    port = listener.getsockname()[1]
    seen: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=listener)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.read()
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert seen and seen[0] != 0  # Nagle off: responses are not held for the client's delayed ACK


@pytest.mark.integration
async def test_services_serve_the_hops_on_a_private_unix_socket(platform: Platform, gw: httpx.AsyncClient) -> None:
    """Triggers and dispatchers advertise a unix socket only their user may open, and a warm call's
    hops go through it (the TCP listeners stay for other machines)."""
    for role in ("trigger", "dispatcher"):
        members = await members_of(platform.settings, role)
        assert members
        for member in members:
            assert member.machine == wire.machine_id()
            assert member.local_address and member.local_address.startswith("http+unix://")
            mode = os.stat(unquote(member.local_address.removeprefix("http+unix://"))).st_mode
            assert stat.S_ISSOCK(mode)
            assert stat.S_IMODE(mode) & 0o077 == 0  # only the platform's user
            assert wire.hop_address(member) == member.local_address
            # The same service answers on both.
            client = HopClient(internal_token=platform.settings.internal_token)
            via_unix = await client.request("GET", f"{member.local_address}/healthz", timeout_s=5)
            via_tcp = await client.request("GET", f"{member.address}/healthz", timeout_s=5)
            await client.close()
            assert via_unix.status == via_tcp.status == 200
    await deploy(gw, "via-socket", "def handler(event, context):\n    return 'ok'\n")
    assert (await gw.post("/v1/functions/via-socket/invoke", json={})).json() == "ok"
    # Another machine's record is reached on TCP.
    elsewhere = MemberRecord(role="dispatcher", member_id="d", address="http://127.0.0.1:1", pid=1,
                             local_address="http+unix://%2Fx.sock", machine="other-host/boot")
    assert wire.hop_address(elsewhere) == "http://127.0.0.1:1"
