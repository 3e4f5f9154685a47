"""The SSRF guard: which push endpoints the server may POST to.

A push endpoint is a URL a client chose, and the server makes a request to
it: without a guard, any user could make the server reach its own admin
ports, the cloud metadata service (169.254.169.254) or the private network
behind it. So:

* The URL must be ``https://`` with a host, no user info and no fragment.
  ``http://`` is accepted only for a target in ``push.allowed_networks``.
* The host is resolved here (not by the HTTP client), and **every** address
  it resolves to must be public: not private, loopback, link-local, shared
  (100.64/10), multicast, reserved or unspecified, also when written as an
  IPv4-mapped IPv6 address, unless ``push.allowed_networks`` holds it.
* The request then goes to one of the checked addresses itself (with the
  original ``Host`` header and TLS server name), so a second DNS answer
  cannot swap in another target between the check and the connection
  (DNS rebinding).
* Redirects are never followed (a redirect is a refusal at send time).

This runs at registration (a clear ``push_url_refused`` error naming
``$.url``) and again before every wake-up, since DNS answers change.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import trio

from chatd.errors import RefusedError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Resolves ``(host, port)`` to IP address strings (may raise OSError).
Resolver = Callable[[str, int], Awaitable[list[str]]]

ERR_URL_REFUSED: Final = "push_url_refused"
MAX_ADDRESSES: Final = 16  # addresses of one host checked, at most


class PushRefused(RefusedError):
    """A push request refused: ``code`` and ``message`` go to the client as they
    are, ``field`` is the JSON path of the offending field."""

    def __init__(self, code: str, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def url_refused(message: str) -> PushRefused:
    return PushRefused(ERR_URL_REFUSED, message, field="$.url")


@dataclass(frozen=True, slots=True)
class Target:
    """A push endpoint URL taken apart (syntax checked, not yet resolved)."""

    scheme: str  # https, or http
    host: str  # a name, or an IP literal without brackets
    port: int
    target: str  # path and query, as sent in the request line
    host_header: str  # the Host header: the host as written, with a non-default port

    def url_for(self, address: str) -> str:
        """The URL that reaches this target at ``address`` (a checked IP)."""
        literal = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{literal}:{self.port}{self.target}"


def parse_target(url: str) -> Target:
    """Check a push endpoint URL's form. Raises :class:`PushRefused`."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise url_refused("the URL holds spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise url_refused("not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise url_refused("the URL must start with https://")
    host = parts.hostname
    if not host:
        raise url_refused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise url_refused("the URL must not hold a user name or password")
    if parts.fragment:
        raise url_refused("the URL must not have a #fragment")
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        raise url_refused("write the host name in its ASCII (punycode) form") from None
    default = 443 if scheme == "https" else 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    netloc_host = f"[{host}]" if ":" in host else host
    host_header = netloc_host if port in (None, default) else f"{netloc_host}:{port}"
    return Target(scheme, host, port or default, target, host_header)


def parse_networks(networks: Iterable[str]) -> tuple[Network, ...]:
    """The allowlist (already validated by the config loader)."""
    return tuple(ipaddress.ip_network(n, strict=False) for n in networks)


def why_refused(address: IPAddress, allowed: tuple[Network, ...]) -> str | None:
    """Why the server may not connect to ``address``; None if it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in allowed):
        return None
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "a non-public address"
    return None


async def resolve_host(host: str, port: int) -> list[str]:
    """The system resolver (in a thread, like every getaddrinfo under Trio)."""
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for info in infos:
        seen.setdefault(str(info[4][0]), None)
    return list(seen)


async def checked_addresses(
    target: Target, allowed: tuple[Network, ...], resolve: Resolver
) -> list[str]:
    """Every address ``target``'s host stands for, each checked; raises
    :class:`PushRefused` if any is refused (or none is found), and OSError
    when the name cannot be resolved right now."""
    try:
        literal: IPAddress | None = ipaddress.ip_address(target.host)
    except ValueError:
        literal = None
    if literal is not None:
        found = [target.host]
    else:
        found = (await resolve(target.host, target.port))[:MAX_ADDRESSES]
        if not found:
            raise OSError("the host name has no address")
    addresses: list[str] = []
    for text in found:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            raise url_refused("the host resolves to something that is not an IP address") from None
        reason = why_refused(address, allowed)
        if reason is not None:
            where = "is" if literal is not None else "resolves to"
            raise url_refused(
                f"the host {where} {reason}; such targets are refused unless"
                " push.allowed_networks permits them"
            )
        if target.scheme == "http" and not any(address in n for n in allowed):
            raise url_refused(
                "the URL must start with https:// (http:// only for targets in"
                " push.allowed_networks)"
            )
        addresses.append(str(address))
    return addresses
