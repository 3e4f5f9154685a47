"""``chatctl``: the admin CLI, a client of the admin API over its unix socket.

It finds the socket and the admin token through the same config file as
``chatd`` (``--config``), or takes them directly (``--socket``,
``--token-file``, ``--url``). Output is a readable table, or the API's JSON
with ``--json``.

Exit codes: 0 ok, 1 the API answered with an error, 3 bad config, 4 token
file missing or unsafe, 5 cannot reach the admin API, 64 bad command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import httpx

from chatd.config import load_config
from chatd.errors import ChatdError, ListenError, SecretFileError, UsageError
from chatd.keyfiles import admin_token_path

DEFAULT_CONFIG = os.path.join("chatd-data", "chatd.toml")
TIMEOUT = 30.0  # seconds for one admin request (a retention run can take a while)


class ApiFailure(ChatdError):
    exit_code = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="chatctl", description="Administer a running chatd through its admin API.")
    p.add_argument(
        "--config",
        "-c",
        default=os.environ.get("CHATD_CONFIG", DEFAULT_CONFIG),
        help="chatd config, to find the socket and token "
        f"(default: $CHATD_CONFIG or {DEFAULT_CONFIG})",
    )
    p.add_argument("--socket", help="admin unix socket (overrides the config)")
    p.add_argument(
        "--url", help="admin base URL for a loopback listener, e.g. http://127.0.0.1:7879"
    )
    p.add_argument("--token-file", help="admin token file (overrides the config)")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)
    sub.add_parser("health", help="liveness and store writability")
    runs = sub.add_parser("retention-runs", help="recent retention run reports")
    runs.add_argument("--limit", type=int, default=20)
    run = sub.add_parser("retention-run", help="run retention jobs now")
    run.add_argument("jobs", nargs="*", help="job names (default: all)")
    audit = sub.add_parser("audit", help="the admin API audit log")
    audit.add_argument("--limit", type=int, default=20)
    return p


def _connection(args: argparse.Namespace) -> tuple[httpx.Client, str | None]:
    socket_path: Path | None = Path(args.socket) if args.socket else None
    url = args.url
    token_file: Path | None = Path(args.token_file) if args.token_file else None
    if (socket_path is None and url is None) or token_file is None:
        config = load_config(args.config)
        if socket_path is None and url is None:
            socket_path = config.admin_unix_socket
            if socket_path is None and config.admin_tcp is not None:
                host, port = config.admin_tcp
                url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        if token_file is None:
            token_file = admin_token_path(config)[0]
    token = None
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="ascii").strip()
        except OSError as exc:
            raise SecretFileError(
                f"cannot read the admin token {token_file}: {exc.strerror}"
            ) from None
    if socket_path is not None:
        transport = httpx.HTTPTransport(uds=str(socket_path))
        return httpx.Client(transport=transport, base_url="http://chatd", timeout=TIMEOUT), token
    return httpx.Client(base_url=url, timeout=TIMEOUT), token


def _request(client: httpx.Client, token: str | None, method: str, path: str, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = client.request(method, path, headers=headers, **kw)
    except httpx.TransportError as exc:
        raise ListenError(f"cannot reach the admin API ({exc}); is chatd running?") from None
    try:
        body = response.json()
    except ValueError:
        raise ApiFailure(f"the admin API answered {response.status_code} without JSON") from None
    if response.status_code >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        field = f" (field {error['field']})" if error.get("field") else ""
        raise ApiFailure(
            f"{error.get('code', response.status_code)}: {error.get('message', '')}{field}"
        )
    return body


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z"


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _runs_table(runs: list[dict[str, Any]]) -> str:
    rows = [
        (
            r["id"],
            _when(r["started_at"]),
            r["job"],
            r["rows_purged"],
            r["bytes_reclaimed"],
            r["duration_ms"],
            r["error"] or "",
        )
        for r in runs
    ]
    return table(rows, ["id", "started", "job", "rows", "bytes freed", "ms", "error"])


def _command(args: argparse.Namespace, client: httpx.Client, token: str | None) -> tuple[Any, str]:
    """Run one command; return the API's JSON and its table form."""
    if args.command == "health":
        body = _request(client, None, "GET", "/v1/health")
        return body, (
            f"status {body['status']}, store writable: {body['store_writable']}, "
            f"version {body['version']}, up {body['uptime_seconds']:.0f}s"
        )
    if args.command == "retention-runs":
        body = _request(client, token, "GET", "/v1/retention/runs", params={"limit": args.limit})
        return body, _runs_table(body["runs"])
    if args.command == "retention-run":
        payload = {"jobs": args.jobs} if args.jobs else {}
        body = _request(client, token, "POST", "/v1/retention/run", json=payload)
        return body, _runs_table(body["reports"])
    body = _request(client, token, "GET", "/v1/admin-audit", params={"limit": args.limit})
    rows = [(e["id"], _when(e["at"]), e["method"], e["path"], e["status"]) for e in body["entries"]]
    return body, table(rows, ["id", "at", "method", "path", "status"])


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (errors printed to stderr)."""
    try:
        args = build_parser().parse_args(argv)
        client, token = _connection(args)
        with client:
            body, text = _command(args, client, token)
        print(json.dumps(body, indent=2) if args.json else text)
        return 0
    except ChatdError as exc:
        print(f"chatctl: error: {exc}", file=sys.stderr)
        return exc.exit_code


def main() -> NoReturn:
    sys.exit(run())
