"""``chat``: the line-mode terminal client of chatd (see docs/CHAT.md).

:mod:`chatd.chat.cli` parses the command line, asks for the secrets and maps
failures to exit codes; :mod:`chatd.chat.app` is the running client (the
commands, live messages, delivery marks); :mod:`chatd.chat.verifying` runs
emoji (SAS) verification with another device; :mod:`chatd.chat.display`
formats what is printed; :mod:`chatd.chat.terminal` reads typed lines without
blocking the event loop.
"""

from .cli import main

__all__ = ["main"]
