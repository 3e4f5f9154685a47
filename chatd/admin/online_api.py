"""Admin API route for who is online now: ``GET /v1/online``.

The list comes from the relay's registry (``AdminContext.online``, wired by
``daemon.py`` to :meth:`chatd.relay.registry.Registry.online_devices`): the
devices with live connections, their users, since when and over how many
connections. It says nothing about messages (no counts, no peers, no
rooms). Device names are read from the store. Who is online is personal
data, so each read is written to the admin audit log.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from chatd.admin.api import AdminContext, ApiError, route

_NAMES_PER_READ: Final = 500  # device ids per SELECT (SQLite bound-parameter limits)


class OnlineDeviceInfo(msgspec.Struct):
    user_id: int
    username: str
    device_id: str | None  # null for a session without a device
    device_name: str | None
    since: int  # unix ms: when the oldest of its live connections got its session
    connections: int  # live connections of this device now


class OnlineList(msgspec.Struct):
    """Connected devices by user id, then device id; and the totals."""

    devices: list[OnlineDeviceInfo]
    users: int
    connections: int


def _device_names(device_ids: list[str], conn: Any) -> dict[str, str]:
    names: dict[str, str] = {}
    for start in range(0, len(device_ids), _NAMES_PER_READ):
        chunk = device_ids[start : start + _NAMES_PER_READ]
        marks = ", ".join("?" * len(chunk))
        rows = conn.execute(
            f"SELECT id, name FROM devices WHERE id IN ({marks})",  # noqa: S608 - only ? marks
            chunk,
        ).fetchall()
        names.update((row[0], row[1]) for row in rows)
    return names


@route(
    "GET",
    "/v1/online",
    "Devices connected to the relay now, with their users (personal data: audit-logged)",
    response=OnlineList,
    tag="online",
    errors=((503, "The relay is not running in this process (service_unavailable)."),),
)
async def list_online(ctx: AdminContext, query: None, body: None) -> OnlineList:
    if ctx.online is None:
        raise ApiError(503, "service_unavailable", "the relay is not running on this server")
    online = list(ctx.online())
    ids = [d.device_id for d in online if d.device_id]
    names = await ctx.store.read(lambda conn: _device_names(ids, conn)) if ids else {}
    devices = [
        OnlineDeviceInfo(
            user_id=d.user_id,
            username=d.username,
            device_id=d.device_id or None,
            device_name=names.get(d.device_id),
            since=d.since,
            connections=d.connections,
        )
        for d in online
    ]
    return OnlineList(
        devices=devices,
        users=len({d.user_id for d in online}),
        connections=sum(d.connections for d in online),
    )
