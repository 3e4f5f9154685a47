"""``chatctl backup create|list|cancel``: online backups through the admin API.

``backup create`` starts a backup (``POST /v1/backups``) and follows it
(``GET /v1/backups/{id}``) with a progress bar on standard error until it is
done, failed or cancelled; Ctrl-C cancels it (its partial file is deleted).
``--no-wait`` returns at once with the job. Verifying, restoring and
finding an account in backups happen on the server machine with ``chatd
backup verify|holding`` and ``chatd restore``, which read the key files.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any, Final, TextIO

from chatd.errors import ChatdError

POLL_SECONDS: Final = 0.25  # how often `backup create` asks for progress
BAR_WIDTH: Final = 30  # characters of the progress bar

Call = Callable[..., Any]


class BackupFailed(ChatdError):
    """The backup ended failed or cancelled (chatctl exit 1)."""

    exit_code = 1


def add_commands(sub: Any) -> None:
    backup = sub.add_parser("backup", help="online backups: create, list, cancel")
    b = backup.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = b.add_parser("create", help="back up the running server, with a progress bar")
    create.add_argument("--no-wait", action="store_true", help="start it and return at once")
    b.add_parser("list", help="backup files and this run's backup jobs")
    cancel = b.add_parser("cancel", help="cancel a running backup")
    cancel.add_argument("backup_id", type=int)


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


def run(args: argparse.Namespace, call: Call) -> tuple[Any, str]:
    """Run one ``backup`` command; return the API's JSON and its text form.
    Raises :class:`BackupFailed` when the backup ends failed or cancelled."""
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
