"""The commands with which people look after their own account in ``chat``:
``/password``, ``/totp``, ``/sessions``, ``/logout``, ``/remove-device`` and
``/export``.

Passwords are read from the terminal with echo off (:func:`echo_off`), one
typed line each, while the input loop waits for the command to finish.
Refusals of the server become :class:`~chatd.chat.commands.Refused` with a
sentence in the terms of the command.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, TypeVar

import trio

from chatd.client import AttachmentError, Client, ServerRefusedError

from .commands import Command, Refused, UsageError
from .display import clean, device_line, stamp
from .enrol import confirm_with_code, show_recovery_codes, show_secret
from .terminal import LineReader, echo_off

T = TypeVar("T")
Say = Callable[[str], None]

ACCOUNT_COMMANDS: Final = (
    Command("password", "/password", "change your password (your other sessions are ended)"),
    Command(
        "totp",
        "/totp on/off/codes",
        "turn the second factor (TOTP) on with a QR code, or off; or get new recovery codes",
    ),
    Command("sessions", "/sessions", "where you are logged in, and your devices"),
    Command(
        "logout",
        "/logout [others/<session>]",
        "end this session and leave; or end all your other sessions, or one (see /sessions)",
    ),
    Command(
        "remove-device",
        "/remove-device <device>",
        "remove a lost device of yours: it is logged out and nobody encrypts to it any more",
    ),
    Command(
        "export",
        "/export <file>",
        "download everything the server holds about you (a ZIP of JSON files) into a new file",
    ),
)

#: What a refusal of a self-service request means, by its code.
REFUSALS: Final = {
    "reauth_failed": "the current password is wrong",
    "mfa_failed": "the code is wrong or was already used",
    "mfa_not_enabled": "TOTP is not on for this account",
    "mfa_required_by_policy": "your role must keep a second factor; it stays on",
    "mfa_not_enrolling": "the setup took too long (10 minutes); start again",
    "use_logout": "that is this session or device: use /logout",
    "rate_limited": "too many attempts; wait a minute and try again",
    "attachments_unavailable": "this server has no download listener for exports",
}


class AccountCommands:
    """``/password``, ``/totp``, ``/sessions``, ``/logout``, ``/remove-device``, ``/export``."""

    def __init__(self, client: Client, say: Say) -> None:
        self.client = client
        self.say = say
        self.lines: LineReader | None = None  # set by the app once it reads input
        #: Set by /logout: the session is over, the app should stop.
        self.ended = False

    async def ask(self, prompt: str, *, secret: bool = False) -> str | None:
        """One typed line after ``prompt`` (not echoed if ``secret``); None
        at end of input."""
        if self.lines is None:  # pragma: no cover - the app sets it before reading
            return None
        if not secret:
            self.say(prompt)
            return await self.lines.readline()
        with echo_off():  # before the prompt, so nothing typed after it shows
            self.say(prompt)
            return await self.lines.readline()

    async def _password(self, prompt: str = "Your current password (not shown):") -> str:
        typed = await self.ask(prompt, secret=True)
        if not typed:
            raise UsageError("cancelled: no password typed")
        return typed

    async def _second_factor(self, call: Callable[[str | None], Awaitable[T]]) -> T:
        """Run ``call`` without a code; if the server wants one, ask and retry."""
        try:
            return await call(None)
        except ServerRefusedError as exc:
            if exc.code != "mfa_required":
                raise _refused(exc) from None
        code = await self.ask("TOTP code from your app (or a recovery code):")
        if not code or not code.strip():
            raise UsageError("cancelled: no code typed")
        try:
            return await call(code.strip())
        except ServerRefusedError as exc:
            raise _refused(exc) from None

    async def _code(self) -> str:
        code = await self.ask("TOTP code from your app (or a recovery code):")
        if not code or not code.strip():
            raise UsageError("cancelled: no code typed")
        return code.strip()

    # -- commands -------------------------------------------------------------

    async def cmd_password(self, args: list[str]) -> None:
        current = await self._password()
        new = await self._password("New password (12 to 128 characters, not shown):")
        if await self.ask("The new password again:", secret=True) != new:
            raise UsageError("the two new passwords differ; nothing changed")
        account = self.client.account
        await self._second_factor(lambda code: account.change_password(current, new, totp=code))
        self.say("✓ password changed. Your other sessions are logged out; this one goes on.")

    async def cmd_totp(self, args: list[str]) -> None:
        if len(args) != 1 or args[0].lower() not in ("on", "off", "codes"):
            raise UsageError("usage: /totp on/off/codes")
        action = args[0].lower()
        account = self.client.account
        password = await self._password()
        if action == "on":
            pending = await self._second_factor(
                lambda code: account.enroll_totp(password, totp=code)
            )
            show_secret(self.say, pending)
            try:
                codes = await confirm_with_code(self.say, self._ask_code, account)
            except ServerRefusedError as exc:
                raise _refused(exc) from None
            if codes is None:
                self.say("-- TOTP setup cancelled: nothing changed --")
                return
            self.say("✓ TOTP is on: logging in now asks for a code from the app.")
            show_recovery_codes(self.say, codes)
        elif action == "off":
            code = await self._code()
            try:
                await account.disable_totp(password, code)
            except ServerRefusedError as exc:
                raise _refused(exc) from None
            self.say("✓ TOTP is off, and the recovery codes are void.")
        else:
            code = await self._code()
            try:
                codes = await account.new_recovery_codes(password, code)
            except ServerRefusedError as exc:
                raise _refused(exc) from None
            self.say("✓ new recovery codes; the old ones no longer work.")
            show_recovery_codes(self.say, codes)

    async def _ask_code(self, prompt: str) -> str | None:
        return await self.ask(prompt)

    async def cmd_sessions(self, args: list[str]) -> None:
        sessions = await self.client.account.sessions()
        self.say(f"Your sessions ({len(sessions)}, newest first; /logout <session> ends one):")
        for s in sessions:
            this = "  (this one)" if s.current else ""
            self.say(
                f'    {s.session_id}  "{clean(s.device_name)}"  since {stamp(s.created_at)},'
                f" last used {stamp(s.last_seen_at)} from {clean(s.ip)}{this}"
            )
        me = next(
            (m for m in await self.client.directory() if m.user_id == self.client.user_id), None
        )
        devices = me.devices if me is not None else []
        self.say(f"Your devices ({len(devices)}; /remove-device <device> removes a lost one):")
        for d in devices:
            self.say(device_line(d, self.client.device_id))

    async def cmd_logout(self, args: list[str]) -> None:
        account = self.client.account
        if not args:
            try:
                await account.logout()
            except ServerRefusedError as exc:
                raise _refused(exc) from None
            self.ended = True
            self.say(
                "Logged out: this session is ended. The device stays: log in again"
                " with your password to use it."
            )
            return
        if len(args) != 1 or not (args[0].lower() == "others" or args[0].isdigit()):
            raise UsageError("usage: /logout [others/<session>] (the session numbers: /sessions)")
        try:
            if args[0].lower() == "others":
                ended = await account.revoke_other_sessions()
            else:
                ended = await account.revoke_sessions([int(args[0])])
        except ServerRefusedError as exc:
            if exc.code == "unknown_session":
                raise UsageError(f"you have no session {args[0]} (see /sessions)") from None
            raise _refused(exc) from None
        self.say(f"✓ ended {len(ended)} session(s): " + (", ".join(map(str, ended)) or "none"))

    async def cmd_remove_device(self, args: list[str]) -> None:
        if len(args) != 1:
            raise UsageError("usage: /remove-device <device> (your devices: /sessions)")
        me = next(
            (m for m in await self.client.directory() if m.user_id == self.client.user_id), None
        )
        device = next(
            (d for d in (me.devices if me else []) if d.device_id.upper() == args[0].upper()),
            None,
        )
        if device is None:
            raise UsageError(f"you have no device {clean(args[0])} (see /sessions)")
        if device.device_id == self.client.device_id:
            raise UsageError("that is this device: use /logout, or remove it from another device")
        try:
            await self.client.account.remove_device(device.device_id)
        except ServerRefusedError as exc:
            raise _refused(exc) from None
        self.say(
            f'✓ removed your device {clean(device.device_id)} ("{clean(device.name)}"):'
            " it is logged out, and messages are no longer encrypted to it."
        )

    async def cmd_export(self, args: list[str]) -> None:
        if len(args) != 1:
            raise UsageError("usage: /export <file> (a new file, e.g. my-chatd-data.zip)")
        target = await trio.to_thread.run_sync(lambda: Path(args[0]).expanduser())
        if await trio.to_thread.run_sync(target.exists):
            raise UsageError(f"{clean(str(target))} exists already; choose another file")
        password = await self._password()
        try:
            written = await self._second_factor(
                lambda code: self.client.export_account(target, password, code)
            )
        except AttachmentError as exc:
            raise Refused(f"the download failed: {clean(str(exc))}") from None
        size = (await trio.to_thread.run_sync(written.stat)).st_size
        self.say(
            f"✓ wrote {clean(str(written))} ({size} bytes): everything the server holds about"
            " you, as JSON files; manifest.json lists them."
        )


def _refused(exc: ServerRefusedError) -> Refused:
    text = REFUSALS.get(exc.code)
    if text is None:
        text = clean(exc.message or exc.code)
    return Refused(text)
