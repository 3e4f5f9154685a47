"""A send flood at a rate-limited account: after ``rate_limited`` the relay
reads nothing more of that connection for ``retry_after`` (at most
MAX_READ_PAUSE), so TCP holds the flood back; nothing sent meanwhile is lost
(docs/PROTOCOL.md section 6.12, docs/RELIABILITY.md section 4)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import trio

from chatd.relay.connection import MAX_READ_PAUSE

from .test_relay_ratelimits import people, to_all


def send_frame(request_id: str, envelopes: list[dict[str, Any]]) -> str:
    message_id = str(uuid.uuid4())
    frame = {"type": "send", "id": request_id, "message_id": message_id, "envelopes": envelopes}
    return json.dumps(frame)


async def test_after_rate_limited_nothing_is_read_for_retry_after(short_tmp: Path) -> None:
    """A ping sent right after a refused send is answered only once its
    retry_after has passed, and the pause (longer than the idle timeout
    here) closes nothing: the server chose it."""
    relay = {"send_rate_per_user": 40.0, "send_burst": 1, "idle_timeout_seconds": 1.0}
    async with people(short_tmp, **relay) as (_srv, devices):
        c = devices[0].client
        envelopes = to_all(devices, devices[0])
        await c.ws.send_message(send_frame("s1", envelopes))
        await c.ws.send_message(send_frame("s2", envelopes))
        sent_at = trio.current_time()
        await c.ws.send_message(json.dumps({"type": "ping", "id": "p"}))
        answers: dict[str, tuple[dict[str, Any], float]] = {}
        with trio.fail_after(10):
            while "p" not in answers:
                frame = json.loads(await c.ws.get_message())
                if "id" in frame:
                    answers[frame["id"]] = (frame, trio.current_time())
        assert answers["s1"][0]["type"] == "sent"
        refused = answers["s2"][0]
        assert refused["code"] == "rate_limited" and 1.4 <= refused["retry_after"] <= 1.5
        assert answers["p"][0] == {"type": "pong", "id": "p"}
        waited = answers["p"][1] - sent_at  # the pause began once s2 was read, later
        assert refused["retry_after"] - 0.01 <= waited < MAX_READ_PAUSE + 1.0
        # Still open: the pause is no idle time of the client's.
        assert (await c.request("ping"))["type"] == "pong"


async def test_a_send_flood_is_paced_and_every_send_is_answered(short_tmp: Path) -> None:
    """100 sends at once, 50 past the burst: each is answered, in order,
    ``sent`` or ``rate_limited``, none dropped. Paused after each refusal
    the flooder is read at the account's rate, so about every other send past
    the burst gets through (without the pause, nearly all 50 were refused)."""
    limits = {"send_rate_per_user": 1_200.0, "send_burst": 50}
    async with people(short_tmp, **limits) as (srv, devices):
        alice = devices[0]
        envelopes = to_all(devices, alice)
        ids = [f"f{n}" for n in range(100)]
        for request_id in ids:
            await alice.client.ws.send_message(send_frame(request_id, envelopes))
        answered: list[tuple[str, str]] = []
        with trio.fail_after(20):
            while len(answered) < len(ids):
                frame = json.loads(await alice.client.ws.get_message())
                if frame.get("id", "").startswith("f"):
                    answered.append((frame["id"], frame.get("code", frame["type"])))
        assert [request_id for request_id, _ in answered] == ids  # each once, in order
        outcomes = [outcome for _, outcome in answered]
        assert set(outcomes) <= {"sent", "rate_limited"}
        assert outcomes[:50] == ["sent"] * 50
        assert outcomes.count("rate_limited") >= 1
        assert outcomes.count("sent") >= 70, outcomes
        await srv.queues.flush()
        del srv
