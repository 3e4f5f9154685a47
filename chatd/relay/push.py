"""Push endpoint requests on the relay, carried out by the notifier.

A refusal is a :class:`~chatd.push.PushRefused`, which the dispatcher turns
into an ``error`` frame naming the field.
"""

from __future__ import annotations

from chatd.auth.models import SessionGrant
from chatd.protocol import frames as f
from chatd.protocol import push as p
from chatd.push import Notifier

PushRequest = p.PushRegister | p.PushRemove
PUSH_REQUESTS = (p.PushRegister, p.PushRemove)


async def serve_push_request(push: Notifier, grant: SessionGrant, frame: PushRequest) -> f.Ok:
    """Register or remove this session's device's endpoint; ``ok`` once it is
    durable. Raises PushRefused (nothing stored)."""
    match frame:
        case p.PushRegister():
            await push.register(grant.device_id, frame.url, frame.p256dh, frame.auth)
        case p.PushRemove():
            await push.remove(grant.device_id)
    return f.Ok(id=frame.id)
