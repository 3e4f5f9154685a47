"""chatctl's privacy commands: account export and erasure, erasure receipts.

* ``users export USER [-o FILE]``: the account export (a ZIP), streamed from
  the admin API into FILE (default ``chatd-export-<id>.zip``), never
  replacing a file.
* ``users erase USER --yes``: disable and log out at once, purge after
  ``privacy.erasure_grace_days``; ``users cancel-erasure USER`` during it.
* ``receipts list``, ``receipts public-key``, and ``receipts verify FILE``:
  checks a receipt (as ``receipts list --json`` gives it, one document, or
  a file holding one) against the server's public key (from the admin API,
  or ``--public-key`` to verify offline) and prints what it says. A receipt
  that does not verify exits 1.

:func:`add_user_actions` and :func:`add_commands` add the subparsers;
:func:`run` carries a command out. chatctl hooks them in.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from chatd.errors import ChatdError, UsageError
from chatd.privacy.receipts import ReceiptError, verify

Call = Callable[..., Any]


class ExportFailure(ChatdError):
    exit_code = 1


def add_user_actions(users: Any, user_type: Callable[[str], str], user_help: str) -> None:
    """``users export``, ``users erase`` and ``users cancel-erasure``."""
    export = users.add_parser("export", help="everything the server holds about a user, as a ZIP")
    export.add_argument("user", type=user_type, help=user_help)
    export.add_argument(
        "-o", "--output", help="file to write (must not exist; default chatd-export-ID.zip)"
    )
    erase = users.add_parser(
        "erase", help="erase an account: disabled now, purged after the grace period (--yes)"
    )
    erase.add_argument("user", type=user_type, help=user_help)
    erase.add_argument("--yes", action="store_true", help="yes, erase this account")
    users.add_parser(
        "cancel-erasure", help="cancel a pending erasure (the account stays disabled)"
    ).add_argument("user", type=user_type, help=user_help)


def add_commands(sub: Any) -> None:
    """``receipts list|public-key|verify``."""
    receipts = sub.add_parser("receipts", help="erasure receipts: list, public-key, verify")
    r = receipts.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = r.add_parser("list", help="signed erasure receipts, newest first")
    ls.add_argument("--limit", type=int, default=20)
    r.add_parser("public-key", help="the server's Ed25519 public key receipts verify with")
    check = r.add_parser("verify", help="check a receipt's signature and print what it says")
    check.add_argument("file", help="a receipt file (JSON)")
    check.add_argument(
        "--public-key", help="the server's public key (base64), to verify without the API"
    )


def handles(args: argparse.Namespace) -> bool:
    """Whether this module carries out the command; UsageError for an
    unconfirmed erasure."""
    if args.command == "receipts":
        return True
    if args.command == "users" and args.action in ("export", "erase", "cancel-erasure"):
        if args.action == "erase" and not args.yes:
            raise UsageError(
                "users erase disables the account now and purges everything about it after "
                "privacy.erasure_grace_days; add --yes to do it"
            )
        return True
    return False


def needs_api(args: argparse.Namespace) -> bool:
    return not (args.command == "receipts" and args.action == "verify" and args.public_key)


def run(
    args: argparse.Namespace,
    call: Call,
    client: httpx.Client | None,
    token: str | None,
    user_id: Callable[[Call, str], int],
) -> tuple[Any, str]:
    """Carry out one privacy command; the JSON and its text form."""
    if args.command == "receipts":
        return _receipts(args, call)
    uid = user_id(call, args.user)
    if args.action == "erase":
        body = call("DELETE", f"/v1/users/{uid}")
        return body, f"user {uid} disabled and logged out; purged after {_when(body)}"
    if args.action == "cancel-erasure":
        body = call("POST", f"/v1/users/{uid}/erasure/cancel")
        return body, f"erasure of user {uid} cancelled; the account stays disabled"
    if client is None:  # pragma: no cover - needs_api() is true for exports
        raise UsageError("users export needs the admin API")
    target = Path(args.output or f"chatd-export-{uid}.zip")
    size = _export(client, token, uid, target)
    return {"file": str(target), "bytes": size}, f"wrote {target} ({size} bytes)"


def _when(body: dict[str, Any]) -> str:
    at = body.get("erase_after")
    if at is None:
        return "(not scheduled)"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at / 1000)) + "Z"


def _export(client: httpx.Client, token: str | None, uid: int, target: Path) -> int:
    """Stream the export into ``target`` (a new file); its size."""
    if target.exists():
        raise UsageError(f"{target} exists already; choose another file with -o")
    partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    size = 0
    try:
        with client.stream("GET", f"/v1/users/{uid}/export", headers=headers) as response:
            if response.status_code != 200:
                response.read()
                try:
                    error = response.json().get("error", {})
                except ValueError:
                    error = {}
                raise ExportFailure(
                    f"{error.get('code', response.status_code)}: {error.get('message', '')}"
                )
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                for block in response.iter_bytes():
                    out.write(block)
                    size += len(block)
                out.flush()
                os.fsync(out.fileno())
        os.link(partial, target)  # never replaces a file
    finally:
        partial.unlink(missing_ok=True)
    return size


def _receipts(args: argparse.Namespace, call: Call) -> tuple[Any, str]:
    if args.action == "list":
        body = call("GET", "/v1/erasure-receipts", params={"limit": args.limit})
        lines = [
            f"{r['id']:>5}  user {r['user_id']}  erased "
            + time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(r["erased_at"] / 1000))
            for r in body["receipts"]
        ]
        return body, "\n".join(lines) or "no erasure receipts"
    if args.action == "public-key":
        body = call("GET", "/v1/server-key")
        return body, f"{body['algorithm']} {body['public_key']}"
    public_key = args.public_key or call("GET", "/v1/server-key")["public_key"]
    try:
        document = json.loads(Path(args.file).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    except ValueError:
        raise ReceiptError(f"{args.file} is not JSON") from None
    if isinstance(document, dict) and "receipts" in document:  # a `receipts list --json`
        entries = document["receipts"]
        if len(entries) != 1:
            raise UsageError("the file holds several receipts; save one to verify it")
        document = entries[0]["receipt"]
    if isinstance(document, dict) and "receipt" in document and "signature" not in document:
        document = document["receipt"]  # one entry of a receipts list
    receipt = verify(document, public_key)
    return receipt, "signature OK (ed25519 " + public_key + ")\n" + json.dumps(receipt, indent=2)
