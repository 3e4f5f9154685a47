"""``chatctl``: the admin CLI, a client of the admin API over its unix socket.

It finds the socket and the admin token through the same config file as
``chatd``, or takes them directly (``--socket``, ``--token-file``,
``--url``). The config is ``--config PATH`` if given, else the first that
exists of ``$CHATD_CONFIG``, ``./chatd-data/chatd.toml`` and
``/etc/chatd/chatd.toml`` (:func:`find_config`), so chatctl works from any
directory. Output is a readable table, or the API's JSON with ``--json``.

Wherever a command takes a user it takes a user id or a username
(``users show bob``); a username made only of digits is written ``@123``.
Tables show the username next to each user id.

Passwords are never command-line arguments, which any local user can read
(``ps``, ``/proc``): ``users create`` and ``users reset-password`` ask for
them on the terminal without echo, twice, or read one line from standard
input with ``--password-stdin``.

Exit codes: 0 ok, 1 the API answered with an error, 3 bad config, 4 token
file missing or unsafe, 5 cannot reach the admin API, 64 bad command line
(including an unconfirmed ``sessions revoke-all`` or ``rooms delete``,
mismatched passwords, or no terminal to ask for one), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import httpx

from chatd import ctl_backup, ctl_privacy, ctl_rooms
from chatd.auth.models import ROLES
from chatd.auth.usernames import USERNAME_INPUT_MAX
from chatd.config import load_config
from chatd.ctl_consent import (
    add_consent_commands,
    add_user_consent_command,
    consent_command,
    user_consent,
)
from chatd.ctl_text import Call, more, named, positive_id, table, when, yes_no
from chatd.errors import ChatdError, ListenError, SecretFileError, UsageError
from chatd.keyfiles import admin_token_path

DEFAULT_CONFIG = os.path.join("chatd-data", "chatd.toml")
SYSTEM_CONFIG = Path("/etc/chatd/chatd.toml")
TIMEOUT = 30.0  # seconds for one admin request (a retention run can take a while)


class ApiFailure(ChatdError):
    exit_code = 1


class ConfigNotFound(ChatdError):
    """No config file where chatctl looks; the message lists the places."""

    exit_code = 3


def find_config(
    explicit: str | None, environ: Mapping[str, str], cwd: Path, system: Path = SYSTEM_CONFIG
) -> Path:
    """The config file to read: ``explicit`` (``--config``) as given, else the
    first that exists of ``$CHATD_CONFIG``, ``./chatd-data/chatd.toml`` and
    ``system``. A ``$CHATD_CONFIG`` naming a missing file is an error, not a
    reason to try the next place (it could be another server's config).

    Raises :class:`ConfigNotFound` listing every place looked at.
    """
    if explicit is not None:
        return Path(explicit)
    from_env = environ.get("CHATD_CONFIG")
    if from_env:
        if not Path(from_env).is_file():
            raise ConfigNotFound(
                f"$CHATD_CONFIG names {from_env}, which is not a file; fix or unset "
                "CHATD_CONFIG, or pass --config PATH"
            )
        return Path(from_env)
    places = [cwd / DEFAULT_CONFIG, system]
    for place in places:
        if place.is_file():
            return place
    looked = ", ".join(["$CHATD_CONFIG (not set)", *map(str, places)])
    raise ConfigNotFound(
        f"no chatd config found; looked in {looked}. Pass --config PATH, set "
        "CHATD_CONFIG, or give --socket (or --url) and --token-file"
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="chatctl", description="Administer a running chatd through its admin API.")
    p.add_argument(
        "--config",
        "-c",
        help="chatd config, to find the socket and token (default: the first of "
        f"$CHATD_CONFIG, ./{DEFAULT_CONFIG}, {SYSTEM_CONFIG})",
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
    sub.add_parser("online", help="devices connected now (no message metadata)")
    _add_account_commands(sub)
    ctl_rooms.add_commands(sub)
    ctl_backup.add_commands(sub)
    add_consent_commands(sub)
    ctl_privacy.add_commands(sub)
    return p


def _user(text: str) -> str:
    """An argparse type: a user id, a username, or ``@username`` (resolved later)."""
    name = text.removeprefix("@")
    if text.isascii() and text.isdigit():
        positive_id(text)
    elif not name or len(name) > USERNAME_INPUT_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a user id nor a username")
    return text


_USER_HELP = "a user id or a username (@NAME for a name of digits)"


def _add_account_commands(sub: Any) -> None:
    users = sub.add_parser("users", help="accounts: list, create, show, disable, enable, ...")
    u = users.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = u.add_parser("list", help="accounts in id order")
    ls.add_argument(
        "--limit", type=positive_id, default=100, help="rows (default 100, at most 500)"
    )
    ls.add_argument("--after", type=positive_id, metavar="ID", help="start after this user id")
    create = u.add_parser("create", help="create an account; asks for its password")
    create.add_argument("username")
    create.add_argument("--role", choices=ROLES, default="user")
    create.add_argument("--password-stdin", action="store_true", help=_STDIN_HELP)
    for action, text in (
        ("show", "one account"),
        ("disable", "disable an account and end its sessions"),
        ("enable", "enable a disabled account"),
    ):
        u.add_parser(action, help=text).add_argument("user", type=_user, help=_USER_HELP)
    add_user_consent_command(u, _user, _USER_HELP)
    ctl_privacy.add_user_actions(u, _user, _USER_HELP)
    role = u.add_parser("set-role", help="change an account's role")
    role.add_argument("user", type=_user, help=_USER_HELP)
    role.add_argument("role", choices=ROLES)
    reset = u.add_parser(
        "reset-password", help="set a new password and end its sessions (MFA stays)"
    )
    reset.add_argument("user", type=_user, help=_USER_HELP)
    reset.add_argument("--password-stdin", action="store_true", help=_STDIN_HELP)
    mfa = u.add_parser(
        "reset-mfa",
        help="remove a lost second factor after checking the person's identity; ends its "
        "sessions (needs --yes)",
    )
    mfa.add_argument("user", type=_user, help=_USER_HELP)
    mfa.add_argument("--yes", action="store_true", help="you checked the person's identity")

    invites = sub.add_parser("invites", help="invite codes: list, create, revoke")
    i = invites.add_subparsers(dest="action", metavar="ACTION", required=True)
    i.add_parser("list", help="invites, newest first (codes are never shown again)")
    new = i.add_parser("create", help="make a single-use invite code (shown once)")
    new.add_argument("--role", choices=ROLES, default="user")
    new.add_argument("--days", type=float, help="lifetime in days (default: auth.invite_days)")
    new.add_argument("--note", default="", help="for admins, e.g. who it is for")
    i.add_parser("revoke", help="revoke an unused invite").add_argument(
        "invite_id", type=positive_id
    )

    sessions = sub.add_parser("sessions", help="sessions: list, revoke, revoke-user, revoke-all")
    s = sessions.add_subparsers(dest="action", metavar="ACTION", required=True)
    sl = s.add_parser("list", help="live sessions, or all of one user's")
    sl.add_argument("--user", type=_user, metavar="USER", help="only this user's (revoked too)")
    s.add_parser("revoke", help="revoke one session").add_argument("session_id", type=positive_id)
    s.add_parser("revoke-user", help="revoke all of a user's sessions").add_argument(
        "user", type=_user, help=_USER_HELP
    )
    s.add_parser("revoke-all", help="log every user out (needs --yes)").add_argument(
        "--yes", action="store_true", help="yes, revoke every session of every user"
    )

    log = sub.add_parser("auth-audit", help="the authentication audit log, newest first")
    log.add_argument("--user", type=_user, metavar="USER", help="only this user's events")
    log.add_argument("--event", help="only this event, e.g. login")
    log.add_argument("--limit", type=positive_id, default=50, help="rows (default 50, at most 500)")
    log.add_argument(
        "--before", type=positive_id, metavar="ID", help="only events older than this id"
    )


_STDIN_HELP = "read the password from the first line of standard input instead of asking"


def _connection(args: argparse.Namespace) -> tuple[httpx.Client, str | None]:
    socket_path: Path | None = Path(args.socket) if args.socket else None
    url = args.url
    token_file: Path | None = Path(args.token_file) if args.token_file else None
    if (socket_path is None and url is None) or token_file is None:
        config = load_config(find_config(args.config, os.environ, Path.cwd()))
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


def _runs_table(runs: list[dict[str, Any]]) -> str:
    rows = [
        (
            r["id"],
            when(r["started_at"]),
            r["job"],
            r["rows_purged"],
            r["bytes_reclaimed"],
            r["duration_ms"],
            r["error"] or "",
        )
        for r in runs
    ]
    return table(rows, ["id", "started", "job", "rows", "bytes freed", "ms", "error"])


def _read_password(args: argparse.Namespace, prompt: str) -> str:
    """The new password: one line of stdin with --password-stdin, else asked twice."""
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line.removesuffix("\n").removesuffix("\r")
        if not password:
            raise UsageError("--password-stdin: standard input holds no password")
        return password
    try:
        with warnings.catch_warnings():
            # getpass falls back to echoing stdin when there is no terminal; refuse instead.
            warnings.simplefilter("error", getpass.GetPassWarning)
            password = getpass.getpass(prompt)
            again = getpass.getpass("Repeat it: ")
    except (getpass.GetPassWarning, EOFError):
        raise UsageError(
            "no terminal to ask for the password on; pipe it in with --password-stdin"
        ) from None
    if password != again:
        raise UsageError("the two passwords differ; nothing was changed")
    return password


def _users_table(users: list[dict[str, Any]]) -> str:
    rows = [
        (
            u["id"],
            u["username"],
            u["role"],
            yes_no(u["mfa_enabled"]),
            "disabled" if u["disabled"] else "active",
            when(u["created_at"]),
            when(u["password_changed_at"]),
        )
        for u in users
    ]
    return table(rows, ["id", "username", "role", "mfa", "status", "created", "password set"])


def _invite_state(invite: dict[str, Any]) -> str:
    if invite["used_at"] is not None:
        if not invite["used_by"]:
            return "used"
        return f"used by user {named(invite['used_by'], invite.get('used_by_username'))}"
    if invite["revoked_at"] is not None:
        return "revoked"
    return "expired" if invite["expires_at"] <= time.time() * 1000 else "open"


def _invites_table(invites: list[dict[str, Any]]) -> str:
    rows = [
        (
            i["id"],
            i["role"],
            _invite_state(i),
            when(i["created_at"]),
            when(i["expires_at"]),
            i["note"],
        )
        for i in invites
    ]
    return table(rows, ["id", "role", "state", "created", "expires", "note"])


def _sessions_table(sessions: list[dict[str, Any]]) -> str:
    now = time.time() * 1000
    rows = [
        (
            s["session_id"],
            s["user_id"],
            s.get("username") or "",
            s["device_name"],
            s["ip"],
            when(s["created_at"]),
            when(s["last_seen_at"]),
            when(s["expires_at"]),
            "revoked" if s["revoked"] else "expired" if s["expires_at"] <= now else "live",
        )
        for s in sessions
    ]
    headers = ["id", "user", "username", "device", "ip", "created", "last seen", "expires"]
    headers.append("state")
    return table(rows, headers)


def _revoked_text(body: dict[str, Any]) -> str:
    ids = body["revoked"]
    if not ids:
        return "no session revoked (none live)"
    return f"revoked {len(ids)} session(s): {', '.join(map(str, ids))}"


def _audit_table(events: list[dict[str, Any]]) -> str:
    rows = [
        (
            e["id"],
            when(e["at"]),
            e["event"],
            e["outcome"],
            "" if e["user_id"] is None else e["user_id"],
            e.get("username") or "",
            e["ip"],
            e["device_name"] or "",
            "" if e["session_id"] is None else e["session_id"],
        )
        for e in events
    ]
    headers = ["id", "at", "event", "outcome", "user", "username", "ip", "device", "session"]
    return table(rows, headers)


def _user_id(call: Call, user: str) -> int:
    """USER on the command line (see :func:`_user`) as a user id: digits are an
    id, anything else (or ``@`` and digits) a username, looked up by the API."""
    if user.isascii() and user.isdigit():
        return int(user)
    name = user.removeprefix("@")
    found = call("GET", "/v1/users", params={"username": name, "limit": 1})["users"]
    if not found:
        raise ApiFailure(f"not_found: no user named {name!r} (list them with 'users list')")
    return int(found[0]["id"])


def _users(args: argparse.Namespace, call: Call) -> tuple[Any, str]:
    if args.action == "list":
        params = {"limit": args.limit} | ({"after_id": args.after} if args.after else {})
        body = call("GET", "/v1/users", params=params)
        after = body["next_after_id"]
        return body, more(_users_table(body["users"]), after and f"--after {after}")
    if args.action == "create":
        password = _read_password(args, f"Password for {args.username}: ")
        payload = {"username": args.username, "password": password, "role": args.role}
        body = call("POST", "/v1/users", json=payload)
        return body, _users_table([body])
    user_id = _user_id(call, args.user)
    if args.action == "consent":
        return user_consent(call, user_id)
    if args.action == "show":
        body = call("GET", f"/v1/users/{user_id}")
    elif args.action in ("disable", "enable"):
        body = call("POST", f"/v1/users/{user_id}/{args.action}")
    elif args.action == "set-role":
        body = call("PUT", f"/v1/users/{user_id}/role", json={"role": args.role})
    elif args.action == "reset-mfa":  # --yes was checked before connecting
        body = call("POST", f"/v1/users/{user_id}/mfa/reset", json={"confirm": True})
    else:  # reset-password
        password = _read_password(args, f"New password for user {args.user}: ")
        body = call("POST", f"/v1/users/{user_id}/password", json={"password": password})
    return body, _users_table([body])


def _invites(args: argparse.Namespace, call: Call) -> tuple[Any, str]:
    if args.action == "list":
        body = call("GET", "/v1/invites")
        return body, _invites_table(body["invites"])
    if args.action == "revoke":
        body = call("DELETE", f"/v1/invites/{args.invite_id}")
        return body, _invites_table([body])
    payload: dict[str, Any] = {"role": args.role, "note": args.note}
    if args.days is not None:
        payload["days"] = args.days
    body = call("POST", "/v1/invites", json=payload)
    text = _invites_table([body["invite"]])
    return body, f"{text}\n\ninvite code (shown only now): {body['code']}"


def _sessions(args: argparse.Namespace, call: Call) -> tuple[Any, str]:
    if args.action == "list":
        params = {"user_id": _user_id(call, args.user)} if args.user else {}
        body = call("GET", "/v1/sessions", params=params)
        return body, _sessions_table(body["sessions"])
    if args.action == "revoke":
        body = call("DELETE", f"/v1/sessions/{args.session_id}")
    elif args.action == "revoke-user":
        body = call("POST", f"/v1/users/{_user_id(call, args.user)}/sessions/revoke")
    else:  # revoke-all; --yes was checked before connecting
        body = call("POST", "/v1/sessions/revoke-all", json={"confirm": True})
    return body, _revoked_text(body)


def _auth_audit(args: argparse.Namespace, call: Call) -> tuple[Any, str]:
    params: dict[str, Any] = {"limit": args.limit}
    user_id = _user_id(call, args.user) if args.user is not None else None
    for name, value in (("user_id", user_id), ("event", args.event), ("before_id", args.before)):
        if value is not None:
            params[name] = value
    body = call("GET", "/v1/auth-audit", params=params)
    before = body["next_before_id"]
    return body, more(_audit_table(body["events"]), before and f"--before {before}")


def _online(args: argparse.Namespace, call: Call) -> tuple[Any, str]:
    body = call("GET", "/v1/online")
    rows = [
        (
            d["user_id"],
            d["username"],
            d["device_id"] or "",
            d["device_name"] or "",
            when(d["since"]),
            d["connections"],
        )
        for d in body["devices"]
    ]
    text = table(rows, ["user", "username", "device", "name", "online since", "connections"])
    users = len({d["user_id"] for d in body["devices"]})
    return body, f"{text}\n{len(rows)} device(s) of {users} user(s) online"


_ACCOUNT_COMMANDS: dict[str, Callable[[argparse.Namespace, Call], tuple[Any, str]]] = {
    "online": _online,
    "users": _users,
    "invites": _invites,
    "sessions": _sessions,
    "auth-audit": _auth_audit,
    "rooms": ctl_rooms.run,
    "backup": partial(ctl_backup.run, user_id=_user_id),
    "consent": consent_command,
}


def _no_api(method: str, path: str, **kw: Any) -> Any:  # pragma: no cover - never called
    raise UsageError("this command works without the admin API")


def _command(args: argparse.Namespace, client: httpx.Client, token: str | None) -> tuple[Any, str]:
    """Run one command; return the API's JSON and its table form."""

    def call(method: str, path: str, **kw: Any) -> Any:
        return _request(client, token, method, path, **kw)

    if ctl_privacy.handles(args):
        return ctl_privacy.run(args, call, client, token, _user_id)
    if args.command in _ACCOUNT_COMMANDS:
        return _ACCOUNT_COMMANDS[args.command](args, call)
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
    rows = [(e["id"], when(e["at"]), e["method"], e["path"], e["status"]) for e in body["entries"]]
    return body, table(rows, ["id", "at", "method", "path", "status"])


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (errors printed to stderr)."""
    try:
        args = build_parser().parse_args(argv)
        if args.command == "sessions" and args.action == "revoke-all" and not args.yes:
            raise UsageError("sessions revoke-all logs every user out; add --yes to do it")
        if args.command == "users" and args.action == "reset-mfa" and not args.yes:
            raise UsageError(
                "users reset-mfa removes a second factor; check the person's identity out of "
                "band, then add --yes"
            )
        if args.command == "rooms" and args.action == "delete" and not args.yes:
            raise UsageError(
                "rooms delete removes the room for all its members; add --yes to do it"
            )
        if ctl_privacy.handles(args) and not ctl_privacy.needs_api(args):
            body, text = ctl_privacy.run(args, _no_api, None, None, _user_id)
            print(json.dumps(body, indent=2) if args.json else text)
            return 0
        client, token = _connection(args)
        with client:
            body, text = _command(args, client, token)
        print(json.dumps(body, indent=2) if args.json else text)
        return 0
    except ChatdError as exc:
        print(f"chatctl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def main() -> NoReturn:
    sys.exit(run())
