"""The shipped systemd unit: its contents, ``systemd-analyze verify`` and ``security``.

The static checks run everywhere. The two ``systemd-analyze`` checks run
wherever the tool exists (any systemd >= 252 host); they need neither root nor
a running systemd, since both work on the unit file offline.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chatd.config import RelaySettings, ServerSettings
from chatd.keyfiles import ADMIN_TOKEN_CREDENTIAL, DB_KEY_CREDENTIAL
from chatd.sdlisten import ADMIN, RELAY

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "chatd.service"
RELAY_SOCKET = ROOT / "systemd" / "chatd.socket"
ADMIN_SOCKET = ROOT / "systemd" / "chatd-admin.socket"
SHIPPED_EXEC_START = "/opt/chatd/venv/bin/chatd serve --config /etc/chatd/chatd.toml"
MAX_EXPOSURE = 1.5
TIMEOUT = 60  # seconds per systemd-analyze call; each takes well under one

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (the unit checks need systemd >= 252)",
)


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file, each a list of (key, value) in file order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=VALUE line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def only(section: list[tuple[str, str]], key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"expected exactly one {key}=, found {found}"
    return found[0]


def seconds(value: str) -> float:
    """A systemd time span in the plain forms this unit uses: 30, 30s, 2min."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value)
    assert match is not None, f"unexpected time span {value!r}"
    number = float(match.group(1))
    return number * 60 if match.group(2) in ("min", "m") else number


@pytest.fixture(scope="module")
def service() -> list[tuple[str, str]]:
    return parse_unit(UNIT.read_text(encoding="utf-8"))["Service"]


def run_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env={"LC_ALL": "C", "PATH": "/usr/bin:/bin", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"},
    )


def runnable_copy(directory: Path) -> Path:
    """The unit, copied with ExecStart= pointing at an executable that exists here.

    ``verify`` insists the ExecStart binary exists; the shipped unit names the
    install path /opt/chatd/venv/bin/chatd, which a dev machine lacks.
    """
    chatd = Path(sys.executable).parent / "chatd"
    exe = chatd if chatd.exists() else Path(sys.executable)
    text = UNIT.read_text(encoding="utf-8")
    assert f"ExecStart={SHIPPED_EXEC_START}\n" in text
    for socket_unit in (RELAY_SOCKET, ADMIN_SOCKET):  # the service requires them
        (directory / socket_unit.name).write_text(socket_unit.read_text(encoding="utf-8"))
    copy = directory / UNIT.name  # the name matters: verify checks the unit type
    copy.write_text(
        text.replace(
            f"ExecStart={SHIPPED_EXEC_START}",
            f"ExecStart={exe} serve --config /etc/chatd/chatd.toml",
        ),
        encoding="utf-8",
    )
    return copy


def mentions_unit(output: str) -> list[str]:
    return [line for line in output.splitlines() if UNIT.name in line or "chatd" in line]


# -- the unit's contents --------------------------------------------------------------


def test_unit_is_type_notify_with_watchdog(service: list[tuple[str, str]]) -> None:
    assert only(service, "Type") == "notify"
    assert only(service, "NotifyAccess") == "main"
    assert seconds(only(service, "WatchdogSec")) == 30
    assert only(service, "Restart") == "on-failure"
    assert only(service, "ExecStart") == SHIPPED_EXEC_START


def test_unit_stop_timeout_covers_the_drain(service: list[tuple[str, str]]) -> None:
    # systemd must not SIGKILL chatd while it drains (shutdown_grace_seconds)
    # and then commits what is queued and checkpoints the WAL.
    grace = ServerSettings().shutdown_grace_seconds
    assert seconds(only(service, "TimeoutStopSec")) >= grace + 5


def test_unit_runs_as_dynamic_user_with_private_state(service: list[tuple[str, str]]) -> None:
    assert only(service, "DynamicUser") == "yes"
    assert only(service, "StateDirectory") == "chatd"
    assert only(service, "StateDirectoryMode") == "0700"
    assert only(service, "UMask") == "0077"


def test_unit_passes_both_secrets_as_credentials(service: list[tuple[str, str]]) -> None:
    creds = values(service, "LoadCredential")
    assert f"{DB_KEY_CREDENTIAL}:/etc/chatd/db.key" in creds
    assert f"{ADMIN_TOKEN_CREDENTIAL}:/etc/chatd/admin-token" in creds
    assert values(service, "Environment") == []  # no secret ever goes in the environment


def test_unit_has_no_capabilities(service: list[tuple[str, str]]) -> None:
    assert only(service, "CapabilityBoundingSet") == ""
    assert only(service, "AmbientCapabilities") == ""
    assert only(service, "NoNewPrivileges") == "yes"


def test_unit_allows_enough_descriptors_for_the_relay(service: list[tuple[str, str]]) -> None:
    assert int(only(service, "LimitNOFILE")) > RelaySettings().max_connections


def test_unit_is_socket_activated_by_both_socket_units(service: list[tuple[str, str]]) -> None:
    sockets = f"{RELAY_SOCKET.name} {ADMIN_SOCKET.name}"
    assert only(service, "Sockets") == sockets
    unit = parse_unit(UNIT.read_text(encoding="utf-8"))["Unit"]
    assert only(unit, "Requires") == sockets
    assert sockets in values(unit, "After")


def test_socket_units_name_their_sockets_as_chatd_expects() -> None:
    relay = parse_unit(RELAY_SOCKET.read_text(encoding="utf-8"))["Socket"]
    assert only(relay, "FileDescriptorName") == RELAY
    assert only(relay, "ListenStream") == f"127.0.0.1:{RelaySettings().port}"
    assert only(relay, "Accept") == "no"  # one chatd accepts every connection
    assert only(relay, "Service") == UNIT.name
    admin = parse_unit(ADMIN_SOCKET.read_text(encoding="utf-8"))["Socket"]
    assert only(admin, "FileDescriptorName") == ADMIN
    assert only(admin, "ListenStream").startswith("/run/chatd/")
    # The admin API answers to whoever reaches the socket: root only.
    assert only(admin, "SocketMode") == "0600"
    assert only(admin, "DirectoryMode") == "0700"
    assert only(admin, "SocketUser") == "root"
    assert only(admin, "Service") == UNIT.name


# -- systemd-analyze ------------------------------------------------------------------------


@needs_systemd_analyze
def test_security_exposure_is_low() -> None:
    result = run_analyze("security", "--offline=true", "--no-pager", str(UNIT))
    assert result.returncode == 0, result.stderr
    match = re.search(
        r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout + result.stderr
    )
    assert match is not None, f"no overall exposure level in:\n{result.stdout}{result.stderr}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, (
        f"exposure {exposure} > {MAX_EXPOSURE}; the items that count:\n"
        + "\n".join(line for line in result.stdout.splitlines() if re.search(r"\s\d+\.\d+$", line))
    )


@needs_systemd_analyze
def test_verify_is_clean(tmp_path: Path) -> None:
    copy = runnable_copy(tmp_path)
    result = run_analyze("verify", "--man=no", str(copy))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert mentions_unit(output) == [], output


@needs_systemd_analyze
def test_verify_the_socket_units_is_clean(tmp_path: Path) -> None:
    runnable_copy(tmp_path)
    for name in (RELAY_SOCKET.name, ADMIN_SOCKET.name):
        result = run_analyze("verify", "--man=no", str(tmp_path / name))
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert mentions_unit(output) == [], output


@needs_systemd_analyze
def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    # Guards the test above: verify exits 0 even for an unknown key, so the
    # check must read its output, and the output must name the unit.
    copy = runnable_copy(tmp_path)
    copy.write_text(copy.read_text(encoding="utf-8") + "NoSuchSetting=1\n", encoding="utf-8")
    result = run_analyze("verify", "--man=no", str(copy))
    assert any("NoSuchSetting" in line for line in mentions_unit(result.stdout + result.stderr))
