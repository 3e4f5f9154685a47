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


def test_every_room_error_code_and_frame_type_is_in_the_protocol_doc() -> None:
    import typing

    from chatd.protocol import catalog
    from chatd.rooms import model

    codes = [getattr(model, n) for n in dir(model) if n.startswith("ERR_")]
    assert "room_changed" in codes
    for code in codes:
        assert f"| `{code}` |" in PROTOCOL, f"docs/PROTOCOL.md has no row for error {code}"
    for union in (catalog.ClientFrame, catalog.ServerFrame):
        for frame in typing.get_args(union):
            tag = frame.__struct_config__.tag
            assert f"`{tag}`" in PROTOCOL, f"docs/PROTOCOL.md does not mention frame {tag}"


def test_every_room_type_chatd_client_exports_is_listed_in_client_md() -> None:
    import chatd.client

    text = (REPO / "docs" / "CLIENT.md").read_text()
    section = text[text.index("## Rooms") : text.index("## Keys")]
    listed = section[section.index("`chatd.client` exports") : section.index("| Name |")]
    names = set(re.findall(r"`(\w+)`", listed)) - {"room_events", "reason"}
    assert names <= set(chatd.client.__all__), names - set(chatd.client.__all__)
    rooms = {n for n in chatd.client.__all__ if n.startswith("Room") or n.isupper()}
    assert rooms - {"SAS_EMOJI", "DEFAULT_MEDIA_TYPES"} <= names, rooms - names


def test_every_test_named_in_the_security_doc_exists() -> None:
    """docs/SECURITY.md maps ASVS requirements to tests by
    ``tests/file.py::test_name``; a renamed or deleted test must fail here."""
    import ast

    security = (REPO / "docs" / "SECURITY.md").read_text()
    named = set(re.findall(r"tests/([\w/]+\.py)::(test_\w+)", security))
    assert len(named) > 50  # the regex still finds the mapping
    defined: dict[str, set[str]] = {}
    missing = []
    for path, name in sorted(named):
        if path not in defined:
            source = REPO / "tests" / path
            tree = ast.parse(source.read_text()) if source.exists() else ast.Module([], [])
            defined[path] = {
                n.name
                for n in ast.walk(tree)
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            }
        if name not in defined[path]:
            missing.append(f"tests/{path}::{name}")
    assert not missing, f"docs/SECURITY.md names tests that do not exist: {missing}"
