"""The docs move with the code: what the code defines, the docs name."""

from __future__ import annotations

import re

from chatd import errors
from chatd.protocol import core
from chatd.relay import REASON_SEND_TIMEOUT

from .conftest import REPO

README = (REPO / "README.md").read_text()
PROTOCOL = (REPO / "docs" / "PROTOCOL.md").read_text()
OPERATIONS = (REPO / "docs" / "OPERATIONS.md").read_text()


def test_the_readme_gives_exactly_two_commands_and_ci_runs_the_second() -> None:
    blocks = re.findall(
        r"```sh\n(.*?)```", README.split("## Two commands", 1)[1].split("\n## ")[0], re.S
    )
    assert [b.strip() for b in blocks] == ["bash scripts/serve.sh", "bash scripts/test.sh"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci


def test_every_close_code_reason_and_error_code_is_in_the_protocol_doc() -> None:
    names = [n for n in dir(core) if n.startswith(("CLOSE_", "REASON_", "ERR_"))]
    assert names
    for name in names:
        value = getattr(core, name)
        assert str(value) in PROTOCOL, f"docs/PROTOCOL.md does not mention {name} ({value!r})"
    assert REASON_SEND_TIMEOUT in PROTOCOL


def test_every_exit_code_is_in_the_operations_doc() -> None:
    classes = [
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.ChatdError)
    ]
    for cls in classes:
        code = str(cls.exit_code)
        assert re.search(rf"\|\s*`?{code}`?\s*\|", OPERATIONS), f"exit code {code} ({cls.__name__})"
