"""The listening socket every service binds must give accepted connections TCP_NODELAY."""

from __future__ import annotations

import asyncio
import socket

from faas.core.service import bind_socket


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
