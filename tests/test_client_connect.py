"""The client's connection against servers that fail during the upgrade."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import trio

from chatd.client import ConnectionLostError
from chatd.client.connection import Connection, Credentials


async def _hang_up_before_101(stream: trio.SocketStream) -> None:
    """Read the upgrade request, then close without answering (a server
    being killed, or a proxy dropping the connection)."""
    await stream.receive_some(4096)
    await stream.aclose()


async def _no_session(session: dict[str, Any]) -> None:
    raise AssertionError("no session can start here")


async def test_a_server_that_hangs_up_before_101_fails_the_connect_at_once() -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, _hang_up_before_101, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        connection = Connection(
            f"ws://127.0.0.1:{port}/v1/ws",
            Credentials("bob", "pw", "laptop"),
            on_session=_no_session,
        )
        connection.connect_timeout = 0.5
        # trio-websocket's own default would wait 60 s for the 101.
        with trio.fail_after(10), pytest.raises(ConnectionLostError, match="cannot connect"):
            await nursery.start(connection.serve)
        nursery.cancel_scope.cancel()
