"""``chatctl consent`` and ``chatctl users consent``: the terms users accept.

* ``chatctl consent show``: the current version of each document;
* ``chatctl consent set KIND VERSION [--url URL] [--title TITLE]``: make a
  version current (``PUT /v1/consent``); live sessions that have not accepted
  it are asked at once and refused everything else until they do;
* ``chatctl users consent USER``: one user's acceptances and revocations
  (``GET /v1/users/{id}/consent``, audit-logged).

Hooked into :mod:`chatd.chatctl` by :func:`add_consent_commands`,
:func:`add_user_consent_command`, :func:`consent_command` and
:func:`user_consent`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from chatd.ctl_text import Call, table, when
from chatd.protocol.consent import KINDS


def add_consent_commands(sub: Any) -> None:
    """The ``consent`` command and its actions."""
    consent = sub.add_parser("consent", help="terms and privacy notice: show, set")
    c = consent.add_subparsers(dest="action", metavar="ACTION", required=True)
    c.add_parser("show", help="the current version of each document")
    new = c.add_parser(
        "set", help="make a version current: users must accept it before they continue"
    )
    new.add_argument("kind", choices=KINDS)
    new.add_argument("version", help="a label such as 2026-12 or v3")
    # Not dest "url": chatctl's own --url (the admin API's) shares the namespace.
    new.add_argument("--url", dest="document_url", help="where users read it (https://...)")
    new.add_argument("--title", dest="document_title", help="its title, shown to users")


def add_user_consent_command(users: Any, user_type: Callable[[str], str], help_text: str) -> None:
    """``users consent USER``."""
    users.add_parser("consent", help="a user's consent records").add_argument(
        "user", type=user_type, help=help_text
    )


def _documents_table(documents: list[dict[str, Any]]) -> str:
    if not documents:
        return "no version set: nobody is asked to accept anything"
    rows = [
        (d["kind"], d["version"], d["title"] or "", d["url"] or "", when(d["set_at"]))
        for d in documents
    ]
    return table(rows, ["kind", "version", "title", "url", "set at"])


def consent_command(args: argparse.Namespace, call: Call) -> tuple[Any, str]:
    """``consent show`` and ``consent set``: the API's JSON and its table form."""
    if args.action == "show":
        body = call("GET", "/v1/consent")
        return body, _documents_table(body["documents"])
    payload: dict[str, str] = {"kind": args.kind, "version": args.version}
    if args.document_url is not None:
        payload["url"] = args.document_url
    if args.document_title is not None:
        payload["title"] = args.document_title
    body = call("PUT", "/v1/consent", json=payload)
    return body, _documents_table([body]) + "\nusers who have not accepted it are asked now"


def user_consent(call: Call, user_id: int) -> tuple[Any, str]:
    """``users consent USER``."""
    body = call("GET", f"/v1/users/{user_id}/consent")
    rows = [
        (
            when(r["at"]),
            r["kind"],
            r["version"],
            r["action"],
            r["session_id"] or "",
            r["device_id"] or "",
        )
        for r in body["records"]
    ]
    text = table(rows, ["at", "kind", "version", "action", "session", "device"])
    required = ", ".join(body["required"]) or "nothing"
    return body, f"{text}\nstill to accept: {required}"
