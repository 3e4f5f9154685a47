"""The admin API over its real unix socket: auth, JSON errors, OpenAPI."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import httpx
import pytest
import trio
import trio.testing
from openapi_spec_validator import validate

import chatd.admin.app
from chatd.admin.api import ROUTES, AdminContext
from chatd.admin.app import create_app
from chatd.admin.openapi import openapi_document
from chatd.admin.service import serve_admin
from chatd.errors import ListenError
from chatd.keyfiles import hash_admin_token
from chatd.retention import serve_retention
from chatd.store import serve_store

from .conftest import REPO, DataDir


class Admin:
    def __init__(self, client: httpx.AsyncClient, token: str, ctx: AdminContext) -> None:
        self.client = client
        self.token = token
        self.ctx = ctx

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def audit_rows(self) -> list[tuple[Any, ...]]:
        return await self.ctx.store.read(
            lambda c: c.execute(
                "SELECT method, path, status FROM admin_audit ORDER BY id"
            ).fetchall()
        )


@asynccontextmanager
async def admin_running(data_dir: DataDir, **admin: Any) -> AsyncIterator[Admin]:
    config = data_dir.configure(admin={"listen": "unix:a.sock", **admin})
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        store = await nursery.start(serve_store, config.database_path, data_dir.key, config.store)
        retention = await nursery.start(serve_retention, store, config.retention)
        ctx = AdminContext(
            store=store, retention=retention, token_hash=hash_admin_token(data_dir.token)
        )
        await nursery.start(serve_admin, config, ctx, stopping)
        transport = httpx.AsyncHTTPTransport(uds=str(config.admin_unix_socket))
        async with httpx.AsyncClient(transport=transport, base_url="http://chatd") as client:
            yield Admin(client, data_dir.token, ctx)
        stopping.set()
        nursery.cancel_scope.cancel()


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert "Traceback" not in response.text
    return body["error"]  # type: ignore[no-any-return]


async def test_health_answers_without_a_token(data_dir: DataDir) -> None:
    async with admin_running(data_dir) as admin:
        response = await admin.client.get("/v1/health")
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "ok"
        assert body["store_writable"] is True
        assert "server" not in response.headers  # no software banner


async def test_the_socket_is_private(data_dir: DataDir) -> None:
    async with admin_running(data_dir):
        mode = os.stat(data_dir.path / "a.sock").st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600


@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong-token-wrong-token-wrong-token", "Basic abc", "Bearer", "bearer  x"],
)
async def test_a_missing_or_wrong_token_gets_401_and_is_audited(
    data_dir: DataDir, header: str | None
) -> None:
    async with admin_running(data_dir) as admin:
        headers = {"Authorization": header} if header is not None else {}
        response = await admin.client.post("/v1/retention/run", headers=headers)
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert await admin.audit_rows() == [("POST", "/v1/retention/run", 401)]
        assert await admin.ctx.retention.list_reports(limit=5, before_id=None) == []  # nothing ran


async def test_the_right_token_runs_retention_and_the_reports_are_listed(data_dir: DataDir) -> None:
    async with admin_running(data_dir) as admin:
        response = await admin.client.post("/v1/retention/run", headers=admin.auth())
        assert response.status_code == 200
        reports = response.json()["reports"]
        assert [r["job"] for r in reports] == ["retention_reports", "admin_audit"]
        page = (await admin.client.get("/v1/retention/runs?limit=1", headers=admin.auth())).json()
        assert len(page["runs"]) == 1
        assert page["next_before_id"] == page["runs"][0]["id"]
        rest = await admin.client.get(
            f"/v1/retention/runs?before_id={page['next_before_id']}", headers=admin.auth()
        )
        assert [r["job"] for r in rest.json()["runs"]] == ["retention_reports"]
        audit = (await admin.client.get("/v1/admin-audit", headers=admin.auth())).json()
        assert [(e["method"], e["path"], e["status"]) for e in audit["entries"]] == [
            ("POST", "/v1/retention/run", 200)
        ]


async def test_selected_jobs_only(data_dir: DataDir) -> None:
    async with admin_running(data_dir) as admin:
        response = await admin.client.post(
            "/v1/retention/run", headers=admin.auth(), json={"jobs": ["admin_audit"]}
        )
        assert [r["job"] for r in response.json()["reports"]] == ["admin_audit"]


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code", "field"),
    [
        (b"{not json", "application/json", 400, "malformed_json", None),
        (b'{"jobs": "\xff\xfe"}', "application/json", 400, "invalid_utf8", None),
        (b'{"jobs": [1]}', "application/json", 400, "invalid_request", "$.jobs[0]"),
        (b'{"jobz": []}', "application/json", 400, "invalid_request", "$.jobz"),
        (b'{"jobs": ["nope"]}', "application/json", 400, "invalid_request", "$.jobs[0]"),
        (b"[]", "application/json", 400, "invalid_request", None),
        (b"jobs=x", "application/x-www-form-urlencoded", 415, "unsupported_media_type", None),
    ],
)
async def test_a_bad_body_gets_a_clear_json_error_and_nothing_runs(
    data_dir: DataDir, content: bytes, content_type: str, status: int, code: str, field: str | None
) -> None:
    async with admin_running(data_dir) as admin:
        response = await admin.client.post(
            "/v1/retention/run",
            headers={**admin.auth(), "Content-Type": content_type},
            content=content,
        )
        error = assert_error(response, status, code)
        assert error.get("field") == field
        assert await admin.ctx.retention.list_reports(limit=5, before_id=None) == []


async def test_an_oversize_body_gets_413(data_dir: DataDir) -> None:
    async with admin_running(data_dir, max_body_bytes=2048) as admin:
        response = await admin.client.post(
            "/v1/retention/run",
            headers={**admin.auth(), "Content-Type": "application/json"},
            content=b'{"jobs": ["' + b"x" * 5000 + b'"]}',
        )
        error = assert_error(response, 413, "payload_too_large")
        assert "2048" in error["message"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=x", "limit"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("before_id=-1", "before_id"),
        ("bogus=1", "bogus"),
        ("before_id=null", "before_id"),
    ],
)
async def test_a_bad_query_gets_400_naming_the_parameter(
    data_dir: DataDir, query: str, field: str | None
) -> None:
    async with admin_running(data_dir) as admin:
        response = await admin.client.get(f"/v1/retention/runs?{query}", headers=admin.auth())
        error = assert_error(response, 400, "invalid_request")
        assert error.get("field") == field


async def test_unknown_routes_and_methods_get_json_errors(data_dir: DataDir) -> None:
    async with admin_running(data_dir) as admin:
        assert_error(await admin.client.get("/v1/nope", headers=admin.auth()), 404, "not_found")
        assert_error(await admin.client.get("/", headers=admin.auth()), 404, "not_found")
        assert_error(
            await admin.client.delete("/v1/health", headers=admin.auth()), 405, "method_not_allowed"
        )
        assert_error(
            await admin.client.get("/v1/retention/run", headers=admin.auth()),
            405,
            "method_not_allowed",
        )


async def test_an_unexpected_failure_is_a_json_500_without_details(data_dir: DataDir) -> None:
    async with admin_running(data_dir) as admin:

        async def broken(*args: Any) -> None:
            raise RuntimeError("secret internals")

        admin.ctx.retention.run_now = broken  # type: ignore[method-assign]
        response = await admin.client.post("/v1/retention/run", headers=admin.auth())
        error = assert_error(response, 500, "internal_error")
        assert "secret internals" not in json.dumps(error)


async def test_a_second_server_cannot_steal_the_socket(data_dir: DataDir) -> None:
    async with admin_running(data_dir) as admin:
        with pytest.raises(ListenError, match="in use by another process"):
            await serve_admin(data_dir.config, admin.ctx, trio.Event())
        assert (await admin.client.get("/v1/health")).status_code == 200


async def test_a_loopback_port_in_use_is_a_clear_error(data_dir: DataDir) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = data_dir.configure(admin={"listen": f"127.0.0.1:{port}"})
        async with trio.open_nursery() as nursery:
            store = await nursery.start(
                serve_store, config.database_path, data_dir.key, config.store
            )
            ctx = AdminContext(store=store, retention=None, token_hash=b"")  # type: ignore[arg-type]
            with pytest.raises(ListenError, match="already in use"):
                await serve_admin(config, ctx, trio.Event())
            nursery.cancel_scope.cancel()


async def test_the_openapi_document_is_served_valid_and_committed(data_dir: DataDir) -> None:
    async with admin_running(data_dir) as admin:
        served = (await admin.client.get("/v1/openapi.json")).json()
    document = openapi_document()
    assert served == document
    validate(document)
    # docs/openapi.json is `chatd openapi` output; regenerate it after changing a route.
    assert json.loads((REPO / "docs" / "openapi.json").read_text()) == document


def test_every_route_is_in_the_document_and_in_the_app() -> None:
    document = openapi_document()
    app = create_app(None, max_body_bytes=1024)  # type: ignore[arg-type]
    rules = {
        (rule.rule, method) for rule in app.url_map.iter_rules() for method in rule.methods or ()
    }
    for r in ROUTES:
        assert r.method.lower() in document["paths"][r.path]
        assert (r.path.replace("{", "<").replace("}", ">"), r.method) in rules
        responses = document["paths"][r.path][r.method.lower()]["responses"]
        if r.auth:
            assert "401" in responses
        if r.body is not None:
            assert {"400", "413", "415"} <= set(responses)


def concrete(path: str) -> str:
    return re.sub(r"\{[a-z_]+\}", "1", path)


async def test_every_405_lists_the_methods_the_document_gives_the_path(data_dir: DataDir) -> None:
    async with admin_running(data_dir) as admin:
        for path in sorted({r.path for r in ROUTES}):
            methods = {r.method for r in ROUTES if r.path == path}
            if "GET" in methods:
                methods.add("HEAD")  # Quart answers HEAD for every GET route
            for method in ("PATCH", "OPTIONS", "TRACE"):
                response = await admin.client.request(method, concrete(path), headers=admin.auth())
                assert_error(response, 405, "method_not_allowed")
                assert set(response.headers["Allow"].split(", ")) == methods, path


async def test_a_path_without_ids_is_not_read_as_an_id(data_dir: DataDir) -> None:
    """/v1/sessions/revoke-all is its own path (as in OpenAPI), not {session_id}."""
    async with admin_running(data_dir) as admin:
        response = await admin.client.delete("/v1/sessions/revoke-all", headers=admin.auth())
        assert_error(response, 405, "method_not_allowed")
        assert response.headers["Allow"] == "POST"
        other = await admin.client.delete("/v1/sessions/abc", headers=admin.auth())
        assert assert_error(other, 400, "invalid_request")["field"] == "session_id"


class RawHttp:
    """An HTTP/1.1 client on the admin socket that sends exactly what it is told, when told."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(self, *events: Any) -> None:
        await self.stream.send_all(b"".join(self.conn.send(e) or b"" for e in events))

    async def next_event(self) -> Any:
        with trio.fail_after(10):
            while True:
                event = self.conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
                self.conn.receive_data(await self.stream.receive_some(65536))

    async def response(self) -> tuple[int, bytes]:
        head = await self.next_event()
        body = b""
        while not isinstance(event := await self.next_event(), h11.EndOfMessage):
            body += event.data
        return head.status_code, body


def request(method: str, target: str, token: str, length: int | None = None) -> h11.Request:
    headers = [("Host", "chatd"), ("Authorization", f"Bearer {token}")]
    if length is not None:
        headers += [("Content-Type", "application/json"), ("Content-Length", str(length))]
    return h11.Request(method=method, target=target, headers=headers)


async def test_an_early_answer_waits_for_the_body_and_the_connection_serves_on(
    data_dir: DataDir,
) -> None:
    """405 needs no body, but one is on its way: the connection must not hang or
    close under the next request (schemathesis found it hanging)."""
    async with admin_running(data_dir) as admin:
        raw = RawHttp(await trio.open_unix_socket(str(data_dir.config.admin_unix_socket)))
        body = b'{"confirm": true}'
        await raw.send(request("PATCH", "/v1/sessions/revoke-all", admin.token, len(body)))
        await trio.testing.wait_all_tasks_blocked()  # the server did all it can without the body
        await raw.send(h11.Data(data=body), h11.EndOfMessage())
        status, answer = await raw.response()
        assert status == 405 and b"method_not_allowed" in answer
        raw.conn.start_next_cycle()
        await raw.send(request("GET", "/v1/health", admin.token), h11.EndOfMessage())
        status, answer = await raw.response()
        assert status == 200 and json.loads(answer)["status"] == "ok"


async def test_an_oversize_body_gets_413_and_the_connection_closes(data_dir: DataDir) -> None:
    """The body is never read (nor sent): the answer comes and the connection
    closes instead of hanging."""
    async with admin_running(data_dir, max_body_bytes=2048) as admin:
        raw = RawHttp(await trio.open_unix_socket(str(data_dir.config.admin_unix_socket)))
        await raw.send(request("POST", "/v1/retention/run", admin.token, 1_000_000))
        status, answer = await raw.response()
        assert status == 413 and b"payload_too_large" in answer
        assert isinstance(await raw.next_event(), h11.ConnectionClosed)
        assert await admin.ctx.retention.list_reports(limit=5, before_id=None) == []


def test_a_body_with_a_required_field_is_required_in_the_document() -> None:
    paths = openapi_document()["paths"]
    assert paths["/v1/users/{user_id}/role"]["put"]["requestBody"]["required"] is True
    assert paths["/v1/sessions/revoke-all"]["post"]["requestBody"]["required"] is True
    assert paths["/v1/retention/run"]["post"]["requestBody"]["required"] is False
    confirm = openapi_document()["components"]["schemas"]["RevokeAll"]["properties"]["confirm"]
    assert confirm["enum"] == [True]


async def test_a_refused_value_is_told_what_is_allowed(data_dir: DataDir) -> None:
    async with admin_running(data_dir) as admin:
        response = await admin.client.post(
            "/v1/retention/run", headers=admin.auth(), json={"jobs": ["admin_audit", "nope"]}
        )
        error = assert_error(response, 400, "invalid_request")
        assert error["field"] == "$.jobs[1]"
        assert "'nope'" in error["message"] and "retention_reports" in error["message"]
        assert await admin.ctx.retention.list_reports(limit=5, before_id=None) == []


async def test_a_body_that_never_comes_delays_the_answer_boundedly_then_closes(
    data_dir: DataDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chatd.admin.app, "BODY_WAIT_SECONDS", 0.05)
    async with admin_running(data_dir) as admin:
        raw = RawHttp(await trio.open_unix_socket(str(data_dir.config.admin_unix_socket)))
        await raw.send(request("PATCH", "/v1/sessions/revoke-all", admin.token, 17))
        status, answer = await raw.response()
        assert status == 405 and b"method_not_allowed" in answer
        assert isinstance(await raw.next_event(), h11.ConnectionClosed)
