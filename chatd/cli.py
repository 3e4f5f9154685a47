"""The ``chatd`` command: init, serve, check-config, version, openapi, config-template,
demo; and backup, restore, rekey (:mod:`chatd.backup.commands`).

Exit codes (docs/OPERATIONS.md): 0 ok, 1 unexpected error, 2 database key
does not match, 3 bad config, 4 unsafe or missing secret file, 5 cannot
listen, 6 bad data dir, 7 database unusable, 8 backup unusable or refused,
64 bad command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import trio

from chatd import __version__
from chatd.backup import commands as backup_commands
from chatd.backup.keys import new_backup_key
from chatd.config import CONFIG_FILE_NAME, Config, load_config, render_template
from chatd.datalock import hold_data_dir_lock
from chatd.errors import ChatdError, UsageError, exception_leaves
from chatd.keyfiles import (
    admin_token_path,
    check_data_dir,
    db_key_path,
    load_admin_token_hash,
    load_db_key,
    new_admin_token,
    new_blob_key,
    new_db_key,
    new_signing_key,
    write_private_file,
)
from chatd.log import configure
from chatd.memory import limit_malloc_arenas

DEFAULT_DATA_DIR = "chatd-data"
DEFAULT_CONFIG = os.path.join(DEFAULT_DATA_DIR, CONFIG_FILE_NAME)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        default=os.environ.get("CHATD_CONFIG", DEFAULT_CONFIG),
        help=f"config file (default: $CHATD_CONFIG or {DEFAULT_CONFIG})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="chatd", description="End-to-end-encrypted team chat server.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser("init", help="create the data dir, database key, admin token and config")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"(default: ./{DEFAULT_DATA_DIR})")
    p = sub.add_parser("serve", help="run the server (under systemd: Type=notify)")
    _config_arg(p)
    p = sub.add_parser("check-config", help="validate the config, secret files and database key")
    _config_arg(p)
    sub.add_parser("version", help="print versions")
    sub.add_parser("openapi", help="print the admin API's OpenAPI document")
    sub.add_parser("config-template", help="print the annotated example config")
    p = sub.add_parser(
        "demo",
        help="run a throwaway server and three scripted clients; show what each side sees",
        description=DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (data dir, database, client stores) and print where",
    )
    backup_commands.add_commands(sub, _config_arg)
    return parser


DEMO_DESCRIPTION = """\
Start a throwaway chatd (a temporary data dir made like 'chatd init', the real
daemon on a free loopback port) and three scripted clients, alice, bob and
carol, with random passwords. Alice writes to Bob while he is offline, Bob
comes online, reads and replies, and Alice reads the reply. Then Alice makes a
channel, Bob and Carol join it and go offline, Alice writes to it, they read
and Bob replies; Alice also sends a small text file to the channel, and Bob
saves it (checked and decrypted on his side: the same bytes). Side by side it
prints what the clients see (plaintext) and what the server stored (read from
its SQLCipher file with its key: ciphertext, public keys, password hashes, the
room log where each room message is stored once; and the file as it is in
blobs/: ciphertext named by its SHA-256).

At the end it searches every server file (database, -wal, -shm, key files,
log, blobs/) byte for byte, and every value of the decrypted database, for the
message texts and the file's lines, and prints
"plaintext found in server files: none". It then stops the daemon with
SIGTERM. Uses only loopback and changes nothing outside the temporary
directory, which is removed unless --keep is given.

Exit codes: 0 ok; 1 a step failed, the daemon misbehaved (its log's tail is
shown), or plaintext was found; 64 bad command line."""


def cmd_init(data_dir: Path) -> int:
    data_dir = data_dir.absolute()
    created = not data_dir.exists()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if created:
        os.chmod(data_dir, 0o700)
    check_data_dir(data_dir)
    config_path = data_dir / CONFIG_FILE_NAME
    results = []
    for path, make in (
        (data_dir / "db.key", new_db_key),
        (data_dir / "admin-token", new_admin_token),
        (data_dir / "blob-url.key", new_blob_key),
        (data_dir / "backup.key", new_backup_key),
        (data_dir / "server-signing.key", new_signing_key),
    ):
        results.append((path, write_private_file(path, make())))
    results.append((config_path, write_private_file(config_path, render_template().rstrip("\n"))))
    config = load_config(config_path)
    print(f"chatd data dir: {data_dir}")
    for path, made in results:
        print(f"  {'created' if made else 'kept   '} {path}")
    db = config.database_path
    made_by = "kept" if db.exists() else "will be created by 'chatd serve'"
    print(f"  database      {db} ({made_by})")
    print(f"  admin socket  {config.admin_unix_socket or config.admin.listen}")
    print(f"  relay         ws://{config.relay.host}:{config.relay.port}/v1/ws")
    print(f"start it with:  chatd serve --config {config_path}")
    return 0


def cmd_check_config(config: Config) -> int:
    from chatd.relay import tls_context
    from chatd.store.db import close_quietly, connect

    check_data_dir(config.data_dir)
    key = load_db_key(config)
    load_admin_token_hash(config)
    if config.relay_tls:
        tls_context(config)
    db = config.database_path
    if db.exists() and db.stat().st_size > 0:
        conn = connect(db, key, busy_timeout_ms=config.store.busy_timeout_ms, readonly=True)
        close_quietly(conn)
        db_state = "key matches"
    else:
        db_state = "not created yet"
    print(f"config ok: {config.path}")
    print(f"  data dir     {config.data_dir}")
    print(f"  database     {db} ({db_state})")
    print(f"  key from     {db_key_path(config)[0]}")
    print(f"  admin token  {admin_token_path(config)[0]}")
    return 0


def cmd_version() -> int:
    import sqlcipher3

    from chatd.protocol.frames import PROTOCOL_VERSION

    conn = sqlcipher3.connect(":memory:")
    cipher = conn.execute("PRAGMA cipher_version").fetchone()[0]
    conn.close()
    print(f"chatd {__version__}")
    print(f"client protocol {PROTOCOL_VERSION}")
    print(f"SQLCipher {cipher} (SQLite {sqlcipher3.sqlite_version})")
    print(f"Python {sys.version.split()[0]}, Trio {trio.__version__}")
    return 0


def _first_chatd_error(exc: BaseException) -> ChatdError | None:
    return next((e for e in exception_leaves(exc) if isinstance(e, ChatdError)), None)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (errors printed to stderr)."""
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 64
        if args.command == "init":
            return cmd_init(Path(args.data_dir))
        if args.command == "version":
            return cmd_version()
        if args.command == "openapi":
            from chatd.admin.openapi import openapi_document

            print(json.dumps(openapi_document(), indent=2))
            return 0
        if args.command == "config-template":
            sys.stdout.write(render_template())
            return 0
        if args.command == "demo":
            from chatd.demo import run_demo

            return trio.run(run_demo, args.keep)
        config = load_config(args.config)
        if args.command == "check-config":
            return cmd_check_config(config)
        if args.command in backup_commands.COMMANDS:
            return backup_commands.run_command(args, config)
        configure(config.log)
        from chatd.daemon import run_daemon

        limit_malloc_arenas()  # before any thread starts; see chatd.memory
        check_data_dir(config.data_dir)  # before the lock file is made in it
        with hold_data_dir_lock(config.data_dir, "starting chatd serve again"):
            trio.run(run_daemon, config)
        return 0
    except BaseException as exc:  # noqa: B036 - every failure becomes a clear message and code
        found = _first_chatd_error(exc)
        if found is not None:
            logging.getLogger("chatd").debug("exit", exc_info=found)
            print(f"chatd: error: {found}", file=sys.stderr)
            return found.exit_code
        if isinstance(exc, KeyboardInterrupt):
            return 130
        if isinstance(exc, SystemExit):
            return int(exc.code or 0)
        traceback.print_exception(exc)  # for the operator's log; a bug to report
        print(f"chatd: unexpected error: {type(exc).__name__}", file=sys.stderr)
        return 1


def main() -> NoReturn:
    sys.exit(run())
