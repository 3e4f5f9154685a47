"""``chatctl backup create|list|cancel|holding``: online backups through the admin API.

``backup create`` starts a backup (``POST /v1/backups``) and follows it
(``GET /v1/backups/{id}``) with a progress bar on standard error until it is
done, failed or cancelled; Ctrl-C cancels it (its partial file is deleted).
``--no-wait`` returns at once with the job. ``backup holding USER`` and
``backup holding --erased`` list the backups that still hold an account, or
every erased account (``GET /v1/backups/holding``: the daemon opens each
backup with the backup keys it has). Verifying and restoring happen on the
server machine with ``chatd backup verify`` and ``chatd restore``, which read
the key files.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any, Final, TextIO

from chatd.ctl_text import Call, when
from chatd.errors import ChatdError

POLL_SECONDS: Final = 0.25  # how often `backup create` asks for progress
BAR_WIDTH: Final = 30  # characters of the progress bar


class BackupFailed(ChatdError):
    """The backup ended failed or cancelled (chatctl exit 1)."""

    exit_code = 1


def add_commands(sub: Any) -> None:
    backup = sub.add_parser("backup", help="online backups: create, list, cancel, holding")
    b = backup.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = b.add_parser("create", help="back up the running server, with a progress bar")
    create.add_argument("--no-wait", action="store_true", help="start it and return at once")
    b.add_parser("list", help="backup files and this run's backup jobs")
    cancel = b.add_parser("cancel", help="cancel a running backup")
    cancel.add_argument("backup_id", type=int)
    holding = b.add_parser("holding", help="backups that still hold an account, live or erased")
    which = holding.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "user", nargs="?", help="a user id (also of an erased account) or a live account's name"
    )
    which.add_argument("--erased", action="store_true", help="every account with a receipt")


def bar(job: dict[str, Any]) -> str:
    """One line: a bar, percent of rows, and where the copy is."""
    p = job["progress"]
    total = max(p["rows_total"], 1)
    done = min(p["rows_done"], total)
    if job["state"] == "done":
        done = total
    filled = BAR_WIDTH * done // total
    return (
        f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {100 * done // total:3d}%  "
        f"{p['rows_done']}/{p['rows_total']} rows  {p['phase']} {p['table']}"
    )


def _job_text(job: dict[str, Any]) -> str:
    text = f"backup {job['id']} {job['state']}: {job['file']} (backup key {job['key_id']})"
    if job["state"] == "done":
        text += f", {job['bytes']} bytes"
    if job["error"]:
        text += f": {job['error']}"
    return text


def follow(call: Call, job: dict[str, Any], out: TextIO = sys.stderr) -> dict[str, Any]:
    """Poll a backup job until it is no longer running, drawing its progress
    bar when ``out`` is a terminal. Ctrl-C cancels the backup, then waits
    for it to stop."""
    tty = out.isatty()
    try:
        while job["state"] == "running":
            if tty:
                out.write("\r" + bar(job))
                out.flush()
            time.sleep(POLL_SECONDS)
            job = call("GET", f"/v1/backups/{job['id']}")
    except KeyboardInterrupt:
        call("POST", f"/v1/backups/{job['id']}/cancel")
        while job["state"] == "running":
            time.sleep(POLL_SECONDS)
            job = call("GET", f"/v1/backups/{job['id']}")
    if tty:
        out.write("\r" + bar(job) + "\n")
    return job


def holding_text(body: dict[str, Any]) -> str:
    """The answer of ``GET /v1/backups/holding`` as lines to read."""
    lines = [f"{body['backups_checked']} backup(s) checked in {body['directory']}"]
    for a in body["accounts"]:
        what = f"erased, receipt {a['receipt_id']}" if a["receipt_id"] is not None else "live"
        where = f"{len(a['backups'])} backup(s)" if a["backups"] else "no backup"
        lines.append(
            f"user {a['user_id']} ({what}, created {when(a['account_created_at'])}): in {where}"
        )
        lines += [f"  {name}" for name in a["backups"]]
    if not body["accounts"]:
        lines.append("no erased account (no erasure receipt)")
    if body["unchecked"]:
        lines.append(f"{len(body['unchecked'])} backup(s) could not be checked:")
        lines += [f"  {u['file']}: {u['error']}" for u in body["unchecked"]]
    return "\n".join(lines)


def run(
    args: argparse.Namespace, call: Call, *, user_id: Callable[[Call, str], int]
) -> tuple[Any, str]:
    """Run one ``backup`` command; return the API's JSON and its text form.
    Raises :class:`BackupFailed` when the backup ends failed or cancelled, or
    when some backup could not be checked for ``holding`` (its key is not at
    hand, or it is corrupt). ``user_id`` turns USER into an id."""
    if args.action == "holding":
        params: dict[str, Any] = (
            {"erased": "true"} if args.erased else {"user_id": user_id(call, args.user)}
        )
        body = call("GET", "/v1/backups/holding", params=params)
        if body["unchecked"]:
            raise BackupFailed(holding_text(body))
        return body, holding_text(body)
    if args.action == "list":
        body = call("GET", "/v1/backups")
        lines = [f"backups in {body['directory']}: {len(body['backups'])}"]
        for b in body["backups"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(b["created_at"] / 1000))
            lines.append(f"  {b['file']}  {b['bytes']} bytes  {when}Z  key {b['key_id'] or '?'}")
        if body["jobs"]:
            lines.append("jobs since chatd started:")
            lines += [f"  {_job_text(j)}" for j in body["jobs"]]
        return body, "\n".join(lines)
    if args.action == "cancel":
        body = call("POST", f"/v1/backups/{args.backup_id}/cancel")
        return body, _job_text(body)
    job = call("POST", "/v1/backups")
    if not args.no_wait:
        job = follow(call, job)
    if job["state"] in ("failed", "cancelled"):
        raise BackupFailed(_job_text(job))
    return job, _job_text(job)
