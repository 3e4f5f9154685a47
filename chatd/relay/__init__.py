"""The relay: the public WebSocket server every client speaks to.

Modules, one job each:

* :mod:`chatd.relay.accept`: the accept loop, which screens each new TCP
  connection (and closes a flood's at once) before handing it on;
* :mod:`chatd.relay.ws`: the WebSocket server on h11 and wsproto (upgrade,
  framing, the lingering close);
* :mod:`chatd.relay.addresses`: client addresses (trusted proxies) and what each may hold;
* :mod:`chatd.relay.ratelimits`: per-account request rates;
* :mod:`chatd.relay.connection`: one connection's send queue, writer and close;
* :mod:`chatd.relay.registry`: live connections by session, user and device,
  presence, and the event sink the services report to;
* :mod:`chatd.relay.delivery`: envelopes from a device's queue to its connections;
* :mod:`chatd.relay.dispatch`: what each client frame does;
* :mod:`chatd.relay.consent`: each session's consent gate, and the consent frames;
* :mod:`chatd.relay.server`: :func:`serve_relay`, the service itself.

The protocol rules they follow live, without I/O, in :mod:`chatd.protocol`.
"""

from chatd.relay.addresses import TrustedProxies
from chatd.relay.connection import CLOSE_TIMEOUT, REASON_SEND_TIMEOUT, Connection
from chatd.relay.registry import Registry
from chatd.relay.server import (
    WS_PATH,
    Relay,
    listener_port,
    open_relay_listeners,
    serve_relay,
    tls_context,
)

__all__ = [
    "CLOSE_TIMEOUT",
    "REASON_SEND_TIMEOUT",
    "WS_PATH",
    "Connection",
    "Registry",
    "Relay",
    "TrustedProxies",
    "listener_port",
    "open_relay_listeners",
    "serve_relay",
    "tls_context",
]
