"""Shared helpers for the benchmarks that run the real ``chatd serve`` process.

Not a benchmark itself. It makes a fresh data dir with ``chatd init``, edits
settings in its TOML config, and starts the daemon with ``NOTIFY_SOCKET``
pointing at an AF_UNIX datagram socket this process owns. That way it can time
the daemon to ``READY=1`` the way systemd would, then stop it with SIGTERM and
check for exit code 0. Every wait has a timeout.
"""

from __future__ import annotations

import math
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

READY_TIMEOUT = 60.0  # seconds a start may take before we give up
STOP_TIMEOUT = 30.0  # seconds from SIGTERM to exit before we kill it
_RELAY_URL = re.compile(r"(wss?://\S+?:(\d+)/v1/ws)")


def chatd_executable() -> str:
    """The ``chatd`` script next to this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).with_name("chatd")
    if beside.exists():
        return str(beside)
    found = shutil.which("chatd")
    if found is None:
        raise SystemExit("cannot find the chatd command; run with .venv/bin/python")
    return found


def init_data_dir(data_dir: Path) -> Path:
    """Run ``chatd init --data-dir DIR`` and return the config path."""
    subprocess.run(
        [chatd_executable(), "init", "--data-dir", str(data_dir)],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=60,
    )
    return data_dir / "chatd.toml"


#: [auth] settings for load generators: no MFA, and limits that never throttle them.
RELAXED_AUTH: dict[str, Any] = {
    "require_mfa": "none",
    "login_rate_per_ip": 100_000.0,
    "login_rate_per_account": 100_000.0,
    "rate_burst": 10_000,
    "backoff_base_seconds": 0.1,
    "backoff_max_seconds": 1.0,
}


#: [relay] per-account request rates for load generators: a few accounts send
#: thousands of messages a second, far past the defaults meant for people.
RELAXED_RELAY: dict[str, Any] = {
    "send_rate_per_user": 10_000_000.0,
    "send_burst": 10_000_000,
    "keys_claim_rate_per_user": 10_000_000.0,
    "keys_claim_burst": 10_000_000,
    "directory_rate_per_user": 10_000_000.0,
    "directory_burst": 10_000_000,
}
#: The per-address connection limits (defect 3 of issue 14) out of the way of
#: benches whose many clients all come from 127.0.0.1 (bench/floods.py keeps them).
RELAXED_ADDRESSES: dict[str, Any] = {
    "max_connections_per_address": 1_000_000,
    "max_unauthenticated_per_address": 1_000_000,
}


def set_settings(config: Path, section: str, values: dict[str, Any]) -> None:
    """Replace ``key = ...`` lines inside ``[section]`` of the config file.

    Every key must already be present in that section (``chatd init`` writes
    each setting with its default), so a typo fails loudly here.
    """
    lines = config.read_text().splitlines()
    current = None
    missing = dict(values)
    for i, line in enumerate(lines):
        header = re.match(r"^\s*\[([^\]]+)\]\s*$", line)
        if header:
            current = header.group(1).strip()
            continue
        if current != section:
            continue
        setting = re.match(r"^\s*([A-Za-z0-9_]+)\s*=", line)
        if setting and setting.group(1) in missing:
            key = setting.group(1)
            lines[i] = f"{key} = {_toml(missing.pop(key))}"
    if missing:
        raise SystemExit(f"{config}: no {', '.join(missing)} in [{section}]")
    config.write_text("\n".join(lines) + "\n")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def raise_nofile(want: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def vm_rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (or of one of its threads) in seconds, from /proc."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as fh:
        after_comm = fh.read().rpartition(")")[2].split()
    # fields 14 and 15 of proc(5); after_comm[0] is field 3 (state)
    return (int(after_comm[11]) + int(after_comm[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent not idle since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        ticks = [int(v) for v in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLK_TCK


def other_processes_cpu(exclude: set[int]) -> dict[int, float]:
    """CPU seconds of every user-space process (one with a command line) not excluded."""
    found: dict[int, float] = {}
    for entry in os.listdir("/proc")[:100_000]:
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if not fh.read(1):
                    continue  # a kernel thread (journal, softirq, workers serve us too)
            found[int(entry)] = cpu_seconds(int(entry))
        except OSError:
            continue  # gone meanwhile
    return found


def describe_process(pid: int, used: dict[int, float]) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            command = fh.read(200).replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = "?"
    return f"pid {pid} ({command}) {used[pid]:.2f} s"


def create_users(data_dir: Path, usernames: list[str], password: str, *, workers: int = 4) -> float:
    """POST /v1/users for each name over the admin unix socket, ``workers`` at a
    time (the daemon hashes each password); returns the seconds taken."""
    import httpx  # only the scripts that make accounts need it

    token = (data_dir / "admin-token").read_text().strip()
    transport = httpx.HTTPTransport(uds=str(data_dir / "admin.sock"))
    headers = {"Authorization": f"Bearer {token}"}
    started = time.monotonic()
    with httpx.Client(transport=transport, base_url="http://chatd", timeout=60.0) as client:

        def create(name: str) -> None:
            body = {"username": name, "password": password, "role": "user"}
            response = client.post("/v1/users", json=body, headers=headers)
            if response.status_code != 200:
                raise SystemExit(f"creating {name}: HTTP {response.status_code} {response.text}")

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(create, usernames))
    return time.monotonic() - started


def seed_users(config: Path, usernames: list[str], password: str) -> float:
    """Make accounts fast, with the daemon stopped: one Argon2id hash, many rows.

    ``create_users`` costs one Argon2id hash per account in the daemon (about
    25 a second on 2 cores, minutes for thousands). Setup is not what the
    benchmarks measure, so this computes a single hash of ``password`` with
    chatd's own hasher at the config's ``[auth]`` Argon2 cost, opens the
    SQLCipher database with chatd's own store code (``open_writer``, which
    creates it and runs the migrations, as ``chatd serve`` would) and the key
    from the data dir, and inserts one ``users`` row per name (role ``user``,
    the username key from chatd's own normaliser) in one transaction. Every
    account then has a genuine Argon2id hash at the configured cost, so a
    login verifies exactly as it would for an account made through the admin
    API; only the salt is shared. No ``admin_create_user`` audit rows are
    written. Call it before :meth:`Daemon.start` (or after :meth:`Daemon.stop`):
    the daemon must not be running. Returns the seconds taken.
    """
    # Imported here: only the scripts that seed accounts need chatd itself.
    from chatd.auth.passwords import Argon2Params, PasswordHasher
    from chatd.auth.usernames import normalize_username
    from chatd.config import load_config
    from chatd.keyfiles import load_db_key
    from chatd.store import now_ms
    from chatd.store.db import close_quietly, open_writer

    started = time.monotonic()
    settings = load_config(config)
    auth = settings.auth
    params = Argon2Params(auth.argon2_memory_kib, auth.argon2_time_cost, auth.argon2_parallelism)
    password_hash = PasswordHasher(params).hash(password)
    now = now_ms()
    rows = [(name, normalize_username(name), password_hash, now, now) for name in usernames]
    old_umask = os.umask(0o077)  # as chatd serve: the database is private to its user
    try:
        conn = open_writer(
            settings.database_path,
            load_db_key(settings),
            busy_timeout_ms=settings.store.busy_timeout_ms,
        )
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO users (username, username_key, role, password_hash,"
                " password_changed_at, created_at) VALUES (?, ?, 'user', ?, ?, ?)",
                rows,
            )
            conn.execute("COMMIT")
        finally:
            close_quietly(conn)
    finally:
        os.umask(old_umask)
    return time.monotonic() - started


def argon2_seconds(config: Path, *, hashes: int = 4, threads: int = 2) -> tuple[float, float]:
    """What one login's Argon2id costs on this machine, at the config's ``[auth]`` cost.

    Returns (seconds per hash in one thread, hashes per second with ``threads``
    threads at once), timed with chatd's own hasher (a login verifies once,
    which costs the same as hashing). Run it while the daemon is idle.
    """
    from chatd.auth.passwords import Argon2Params, PasswordHasher

    auth = _load_auth(config)
    hasher = PasswordHasher(
        Argon2Params(auth.argon2_memory_kib, auth.argon2_time_cost, auth.argon2_parallelism)
    )
    hasher.hash("warm up the allocator")  # noqa: S106 - a throwaway hash
    started = time.perf_counter()
    for i in range(hashes):
        hasher.hash(f"one thread {i}")
    one = (time.perf_counter() - started) / hashes
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(hasher.hash, [f"parallel {i}" for i in range(hashes * threads)]))
    rate = hashes * threads / (time.perf_counter() - started)
    return one, rate


def _load_auth(config: Path) -> Any:
    from chatd.config import load_config

    return load_config(config).auth


class Daemon:
    """One ``chatd serve`` child with its own notify socket and log file.

    The child inherits this process's resource limits, so raise RLIMIT_NOFILE
    here (:func:`raise_nofile`) before :meth:`start` when it needs many sockets.
    With ``lag_log``, the same ``chatd serve`` runs under ``bench/_lagmon.py``
    (this interpreter), which samples the event loop's lag into that file.
    """

    def __init__(
        self,
        config: Path,
        work_dir: Path,
        *,
        lag_log: Path | None = None,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.config = config
        #: Runs instead of the ``chatd`` script (with ``serve --config ...`` appended),
        #: e.g. a wrapper that calls ``chatd.cli.run`` with instrumentation.
        self.command = command
        #: Extra environment variables for the child (e.g. glibc malloc tunables).
        self.extra_env = dict(env or {})
        self.work_dir = work_dir
        #: With a path, the daemon runs under bench/_lagmon.py, which adds an
        #: event-loop lag monitor and writes its samples there (chatd unchanged).
        self.lag_log = lag_log
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = work_dir / "chatd.log"
        self._log: IO[bytes] | None = None
        self._notify_path = work_dir / "notify.sock"
        self._sock: socket.socket | None = None
        self._spawned_at = 0.0
        self.status = ""
        self.main_pid: int | None = None

    def start(self) -> None:
        """Spawn the daemon (the clock for :meth:`wait_ready` starts here)."""
        self._notify_path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(str(self._notify_path))
        env = {**os.environ, **self.extra_env, "NOTIFY_SOCKET": str(self._notify_path)}
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        self._log = self.log_path.open("ab")
        self._spawned_at = time.perf_counter()
        command = [chatd_executable()]
        if self.lag_log is not None:
            monitor = Path(__file__).with_name("_lagmon.py")
            command = [sys.executable, str(monitor), str(self.lag_log)]
        if self.command is not None:
            command = list(self.command)
        self.proc = subprocess.Popen(
            [*command, "serve", "--config", str(self.config)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> float:
        """Block until READY=1 arrives; return seconds since spawn."""
        assert self._sock is not None and self.proc is not None
        deadline = self._spawned_at + timeout
        while True:
            now = time.perf_counter()
            if now >= deadline:
                self.kill()
                raise SystemExit(f"chatd not READY within {timeout:.0f} s; log: {self.log_path}")
            self._sock.settimeout(min(0.5, deadline - now))
            try:
                data = self._sock.recv(65_536)
            except TimeoutError:
                if self.proc.poll() is not None:
                    raise SystemExit(
                        f"chatd exited with {self.proc.returncode} before READY:\n{self.log_tail()}"
                    ) from None
                continue
            elapsed = time.perf_counter() - self._spawned_at
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            if "STATUS" in fields:
                self.status = fields["STATUS"]
            if "MAINPID" in fields:
                self.main_pid = int(fields["MAINPID"])
            if fields.get("READY") == "1":
                return elapsed

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def relay_url(self) -> tuple[str, int]:
        """The relay's URL and port, from the READY STATUS line."""
        match = _RELAY_URL.search(self.status)
        if match is None:
            raise SystemExit(f"no relay URL in the READY status: {self.status!r}")
        return match.group(1), int(match.group(2))

    def stop(self, timeout: float = STOP_TIMEOUT) -> tuple[int, float]:
        """SIGTERM, wait for exit; return (exit code, seconds from signal to exit)."""
        assert self.proc is not None
        started = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise SystemExit(
                f"chatd did not exit within {timeout:.0f} s of SIGTERM; log: {self.log_path}"
            ) from None
        elapsed = time.perf_counter() - started
        self._close()
        return code, elapsed

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)
        self._close()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._notify_path.unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()
            self._log = None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"
