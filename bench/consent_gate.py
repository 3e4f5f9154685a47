"""The consent gate's cost in the protocol core: microseconds per ``send`` frame.

Run: ``.venv/bin/python bench/consent_gate.py``. Prints the time the core
takes to admit a ``send`` on a session that is not gated (the hot path, which
checks one empty frozenset) and to refuse one on a gated session.
"""

from __future__ import annotations

import json
import timeit

from chatd.protocol import core
from chatd.protocol.frames import Limits

LIMITS = Limits(
    handshake_timeout_seconds=10,
    max_frame_bytes=65_536,
    idle_timeout_seconds=60,
    send_queue_frames=8,
    max_bad_frames=3,
)
SEND = json.dumps(
    {
        "type": "send",
        "id": "s1",
        "message_id": "0b0b0b0b-0000-4000-8000-000000000001",
        "envelopes": [{"user_id": 2, "device_id": "ABC", "ciphertext": "x" * 200}],
    }
)
FRAMES = 200_000


def session(pending: frozenset[str]) -> core.ServerConnection:
    conn = core.ServerConnection(LIMITS, server_name="chatd")
    conn.start()
    conn.receive_text('{"type":"ping"}')
    conn.session_started(restricted=False)
    conn.consent_pending = pending
    return conn


def main() -> None:
    for label, pending in (("not gated", frozenset()), ("gated", frozenset({"terms"}))):
        conn = session(pending)
        best = min(timeit.repeat(lambda c=conn: c.receive_text(SEND), number=FRAMES, repeat=3))
        print(f"{label}: {best / FRAMES * 1e6:.2f} us per send frame")


if __name__ == "__main__":
    main()
