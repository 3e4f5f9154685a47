"""Push: content-free wake-ups to devices without a live connection.

:mod:`chatd.push.notifier` is the service, :mod:`chatd.push.guard` the SSRF
guard, :mod:`chatd.push.wakeup` what a wake-up POST holds, :mod:`chatd.push.sender`
the child process that sends them.
"""

from chatd.push.guard import PushRefused
from chatd.push.notifier import Notifier, PushStats
from chatd.push.sender import Result
from chatd.push.wakeup import Endpoint

__all__ = ["Endpoint", "Notifier", "PushRefused", "PushStats", "Result"]
