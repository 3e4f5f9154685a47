"""chatd: a self-hostable, end-to-end-encrypted team chat server on Trio."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("chatd")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"
