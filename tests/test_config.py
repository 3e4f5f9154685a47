"""Config: one declaration per setting, strict loading, clear errors."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from chatd.config import Config, iter_settings, load_config, parse_config, render_template
from chatd.errors import ConfigError

from .conftest import REPO


def load_text(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "chatd.toml"
    path.write_text(text)
    return load_config(path)


def test_etc_chatd_toml_is_the_generated_template() -> None:
    # etc/chatd.toml is what `chatd config-template` prints; regenerate it with
    # `chatd config-template > etc/chatd.toml` after changing a setting.
    assert (REPO / "etc" / "chatd.toml").read_text() == render_template()


def test_the_template_loads_to_the_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, render_template())
    assert dataclasses.replace(config, path=Path("x")) == Config(path=Path("x"))


def test_every_setting_is_documented() -> None:
    template = render_template()
    for section, key, f in iter_settings():
        assert len(f.metadata.get("help", "")) > 20, f"{section}.{key} has no help text"
        assert f"\n{key} = " in template, f"{section}.{key} missing from the template"
        assert f.default is not dataclasses.MISSING, f"{section}.{key} has no default"


def test_secrets_are_never_config_values() -> None:
    # Settings may point at secret files but never hold a secret.
    for section, key, _f in iter_settings():
        if any(word in key for word in ("token", "key", "password", "secret")):
            allowed = ("_file", "_private_key", "_minutes", "_days", "_per_account", "_per_user")
            allowed += ("_burst",)  # rates: relay.keys_claim_rate_per_user, keys_claim_burst
            is_count = key.startswith("max_") or key.endswith("_threshold")
            assert key.endswith(allowed) or is_count, f"{section}.{key} looks like a secret"


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[relay]\nprot = 1\n", "relay.prot", "unknown setting"),
        ("[relya]\nport = 1\n", "relya", "unknown section"),
        ('[relay]\nport = "80"\n', "relay.port", "expected an integer, got a string"),
        ("[relay]\nport = 70000\n", "relay.port", "at most 65535"),
        ("[relay]\nport = true\n", "relay.port", "expected an integer, got a boolean"),
        ("[store]\ngroup_commit = 1\n", "store.group_commit", "expected true or false"),
        ('[log]\nlevel = "loud"\n', "log.level", "must be one of"),
        ("[relay]\nallowed_origins = [1]\n", "relay.allowed_origins", "list of strings"),
        ('[relay]\nallowed_origins = ["example.org"]\n', "relay.allowed_origins", "not an origin"),
        ('[relay]\ntls_certificate = "c.pem"\n', "relay.tls_certificate", "set together"),
        ('[admin]\nlisten = "0.0.0.0:7879"\n', "admin.listen", "loopback"),
        ('[admin]\nlisten = "example.org:7879"\n', "admin.listen", "loopback"),
        ('[admin]\nlisten = "unix:"\n', "admin.listen", "socket path"),
        ("relay = 5\n", "relay", "expected a table"),
        ("[retention]\nbatch_size = 0\n", "retention.batch_size", "at least 1"),
    ],
)
def test_a_bad_setting_names_the_key_and_the_file(
    tmp_path: Path, text: str, key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert str(tmp_path / "chatd.toml") in message
    assert key in message
    assert fragment in message
    assert info.value.key == key
    assert info.value.exit_code == 3


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"[relay\n", "not valid TOML"), (b"\xff\xfe", "not valid")],
)
def test_an_unreadable_file_names_the_file(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "chatd.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=fragment) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_a_missing_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="chatd init"):
        load_config(tmp_path / "nope.toml")


def test_values_are_typed_and_paths_resolve_against_the_data_dir(tmp_path: Path) -> None:
    text = (
        '[server]\ndata_dir = "data"\n[relay]\nidle_timeout_seconds = 5\n'
        'allowed_origins = ["https://chat.example.org"]\n[admin]\nlisten = "[::1]:7879"\n'
    )
    config = load_text(tmp_path, text)
    assert config.relay.idle_timeout_seconds == 5.0
    assert isinstance(config.relay.idle_timeout_seconds, float)
    assert config.relay.allowed_origins == ("https://chat.example.org",)
    assert config.data_dir == (tmp_path / "data").resolve()
    assert config.database_path == (tmp_path / "data" / "chatd.db").resolve()
    assert config.admin_tcp == ("::1", 7879)
    assert config.admin_unix_socket is None


def test_config_is_frozen(tmp_path: Path) -> None:
    config = parse_config(tmp_path / "x.toml", tomllib.loads(""))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.relay.port = 1  # type: ignore[misc]
