"""The Quart application for the admin API.

Request handling, in order: route match (404/405, with ``Allow``; a path
with no ids owns its URL, as in OpenAPI, so ``DELETE /v1/sessions/revoke-all``
is 405 rather than a bad ``{session_id}``), admin token check (401),
path ids (400 invalid_request naming the parameter), query, body size (413),
content type (415), UTF-8 (400 invalid_utf8), JSON (400 malformed_json),
schema (400 invalid_request with the field), then the handler. Every failure,
including Quart's own and unexpected exceptions, answers with
``{"error": {"code", "message"}}``; exception details go to the log, never to
the client. An :class:`~chatd.auth.models.AuthError` from a handler keeps its
code and field, with the status from :func:`auth_error_status`.

Every answer waits until the request's body has arrived (up to
``admin.max_body_bytes``, for at most :data:`BODY_WAIT_SECONDS`), even one
given before the body was needed (404, 405, 401, a GET with a body), so that
the connection can serve the next request. A response that leaves a body
unread (413, or a body slower than that) closes the connection instead: see
:func:`shield_response_sends` for what keeps that close from hanging.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
from types import UnionType
from typing import Annotated, Any, Final, Union, get_args, get_origin

import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from chatd.admin.api import (
    ERROR_CODE,
    ROUTES,
    AdminContext,
    ApiError,
    ErrorBody,
    ErrorDetail,
    Route,
    UnknownJob,
)
from chatd.auth.models import AuthError
from chatd.errors import StoreError
from chatd.keyfiles import hash_admin_token
from chatd.log import fields
from chatd.store import now_ms
from chatd.store.store import WRITE_RECHECK_SECONDS

log = logging.getLogger("chatd.admin")

_encoder = msgspec.json.Encoder()

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    431: "headers_too_large",
    500: "internal_error",
    503: "service_unavailable",
}

# ApiError moved to chatd.admin.api (route modules raise it); still importable here.
__all__ = ["ApiError", "auth_error_status", "create_app", "error_response"]

MAX_ID: Final = 2**63 - 1  # path ids are SQLite integer primary keys
#: Seconds an answer waits for the rest of a request body it did not need
#: (so the connection can serve the next request); after that it is sent,
#: and the connection closes.
BODY_WAIT_SECONDS: Final = 10.0

#: HTTP status of an AuthError code; every other code is 400.
AUTH_ERROR_STATUS: Final = {
    "not_found": 404,
    "username_taken": 409,
    "invite_closed": 409,
    "erasure_pending": 409,
    "erasure_not_pending": 409,
}


def auth_error_status(code: str) -> int:
    return AUTH_ERROR_STATUS.get(code, 400)


def error_response(status: int, code: str, message: str, field: str | None = None) -> Response:
    body = _encoder.encode(ErrorBody(ErrorDetail(code=code, message=message, field=field)))
    response = Response(body, status=status, content_type="application/json")
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="chatd-admin"'
    return response


# msgspec names the field itself in these messages, at the path of its object.
_NAMED_FIELD: Final = re.compile(r"^Object (?:missing required|contains unknown) field `([^`]+)`")


def _field_meta(struct: type, name: str) -> msgspec.Meta | None:
    """The ``msgspec.Meta`` of a struct's field (encoded ``name``), if it has one."""
    for info in msgspec.structs.fields(struct):
        if info.encode_name != name:
            continue
        annotations = [info.type]
        if get_origin(info.type) in (Union, UnionType):  # X | None
            annotations = list(get_args(info.type))
        for annotation in annotations:
            if get_origin(annotation) is Annotated:
                metas = [m for m in get_args(annotation)[1:] if isinstance(m, msgspec.Meta)]
                if metas:
                    return metas[-1]
    return None


def _validation_error(exc: msgspec.ValidationError, where: str, decoded: type) -> ApiError:
    """A 400 naming the field (``$.a.b`` in a body, the parameter in a query).

    For a top-level field of the decoded struct (or an item of one, like
    ``$.jobs[0]``) with a ``msgspec.Meta``, its
    description is added to the message, and ``Meta.extra[ERROR_CODE]`` (if
    set) replaces the code ``invalid_request`` when the value breaks a
    constraint (not when the field is missing).
    """
    text = str(exc)
    path = "$"
    marker = " - at `"
    if marker in text:
        text, _, at = text.partition(marker)
        path = at.rstrip("`")
    named = _NAMED_FIELD.match(text)
    field = f"{path}.{named.group(1)}" if named else (None if path == "$" else path)
    code = "invalid_request"
    # A top-level field, or an item of one (``$.jobs[0]``), has the Meta of that field.
    top_level = re.fullmatch(r"\$\.([^.\[]+)(?:\[\d+\])*", field or "")
    top = top_level.group(1) if top_level else ""
    meta = _field_meta(decoded, top) if top else None
    if meta is not None:
        if meta.description:
            text = f"{text} ({top}: {meta.description})"
        if meta.extra and ERROR_CODE in meta.extra and named is None:  # not a missing field
            code = meta.extra[ERROR_CODE]
    if where == "query" and field is not None:
        field = field.removeprefix("$.")
    return ApiError(400, code, f"invalid {where}: {text}", field)


def _check_token(ctx: AdminContext) -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    presented = hash_admin_token(token.strip()) if scheme.lower() == "bearer" else b""
    # Constant-time comparison of fixed-length hashes.
    if not hmac.compare_digest(presented.ljust(32, b"\0"), ctx.token_hash):
        raise ApiError(
            401, "unauthorized", "missing or wrong admin token (Authorization: Bearer ...)"
        )


async def _decode_body(r: Route) -> Any:
    if r.body is None:  # pragma: no cover - only called for routes with a body
        raise TypeError(f"route {r.endpoint} takes no body")
    raw = await request.get_data(cache=False, as_text=False)
    data = raw if isinstance(raw, bytes) else raw.encode()
    if not data.strip():
        data = b"{}"
    else:
        ctype = request.mimetype
        if ctype != "application/json":
            raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            400, "invalid_utf8", f"the body is not valid UTF-8 (byte {exc.start})"
        ) from None
    try:
        return msgspec.json.decode(data, type=r.body)
    except msgspec.ValidationError as exc:
        raise _validation_error(exc, "body", r.body) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None


def _decode_path(r: Route, raw: dict[str, Any]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for name in r.path_params:
        value = str(raw.get(name, ""))
        number = int(value) if value.isascii() and value.isdigit() and len(value) <= 19 else 0
        if not 1 <= number <= MAX_ID:
            raise ApiError(
                400, "invalid_request", f"invalid path: {name} must be a positive integer", name
            )
        ids[name] = number
    return ids


def _decode_query(r: Route) -> Any:
    if r.query is None:
        return None
    args: dict[str, Any] = {}
    for key in request.args:
        values = request.args.getlist(key)
        args[key] = values[0] if len(values) == 1 else values
    try:
        query: Any = msgspec.convert(args, type=r.query, strict=False)
    except msgspec.ValidationError as exc:
        raise _validation_error(exc, "query", r.query) from None
    for info in msgspec.structs.fields(r.query):
        # Lenient conversion reads "null" as None; the document has no null parameters.
        if info.encode_name in args and getattr(query, info.name) is None:
            raise ApiError(
                400,
                "invalid_request",
                f"invalid query: {info.encode_name} has no null value; leave it out instead",
                info.encode_name,
            )
    return query


def _template(path: str) -> re.Pattern[str]:
    parts = ("[^/]+" if p.startswith("{") else re.escape(p) for p in path.split("/"))
    return re.compile("/".join(parts) + r"\Z")


def routes_for(routes: list[Route], path: str) -> list[Route]:
    """The routes whose path is the URL ``path``, in the document's sense.

    A route path without ids owns its URL (OpenAPI matches concrete paths
    before templated ones); any other URL belongs to every templated route
    path it matches.
    """
    concrete = [r for r in routes if r.path == path]
    if concrete:
        return concrete
    return [r for r in routes if r.path_params and _template(r.path).match(path)]


def allowed_methods(routes: list[Route], path: str) -> list[str]:
    """The methods for an ``Allow`` header on the URL ``path`` (see :func:`routes_for`).
    GET brings HEAD, which Quart answers for every GET route."""
    methods = {r.method for r in routes_for(routes, path)}
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def shield_response_sends(asgi_app: Any) -> Any:
    """Wrap an ASGI app so that its response sends cannot be cancelled halfway.

    Why: when a response is complete before its request's body has arrived,
    hypercorn closes the connection from inside that last send, first telling
    the app ``http.disconnect``. quart-trio answers a disconnect by cancelling
    the task that is making the send, so the close never finishes and the
    connection hangs, serving nothing, until the client gives up (found by
    schemathesis: 405 to a method with a body, sent in two packets). Shielded,
    the close completes. Hypercorn already shields its socket writes, so this
    adds no wait that was not there.
    """

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await asgi_app(scope, receive, send)
            return

        async def shielded_send(message: dict[str, Any]) -> None:
            with trio.CancelScope(shield=True):
                await send(message)

        await asgi_app(scope, receive, shielded_send)

    return app


def create_app(ctx: AdminContext, *, max_body_bytes: int) -> QuartTrio:
    """Build the admin app bound to ``ctx``."""
    app = QuartTrio("chatd.admin")
    # Quart's documented way to add ASGI middleware (see Quart.asgi_app).
    app.asgi_app = shield_response_sends(app.asgi_app)  # type: ignore[method-assign]
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    by_endpoint: dict[str, Route] = {}
    concrete_paths = {r.path for r in ROUTES if not r.path_params}

    def make_view(r: Route) -> Any:
        async def view(**raw_path: Any) -> Response:
            try:
                if r.auth:
                    _check_token(ctx)
                path = _decode_path(r, raw_path)
                query = _decode_query(r)
                body = await _decode_body(r) if r.body is not None else None
                result = await r.handler(ctx, query, body, **path)
            except ApiError as exc:
                return error_response(exc.status, exc.code, exc.message, exc.field)
            except AuthError as exc:
                status = auth_error_status(exc.code)
                return error_response(status, exc.code, exc.message, exc.field)
            except UnknownJob as exc:
                return error_response(400, "invalid_request", str(exc), "$.jobs")
            except StoreError:  # the store logs the cause, once per episode
                refused = error_response(
                    503,
                    "storage_unavailable",
                    "the database refused the write (is the disk full?); try again later",
                )
                refused.headers["Retry-After"] = str(math.ceil(WRITE_RECHECK_SECONDS))
                return refused
            if isinstance(result, Response):  # a streamed body (the account export)
                return result
            if r.media_type != "application/json":
                return Response(result, status=200, content_type=r.media_type)
            status = 200
            if r.endpoint == "health" and getattr(result, "status", "ok") != "ok":
                status = 503
            return Response(_encoder.encode(result), status=status, content_type="application/json")

        view.__name__ = r.endpoint
        return view

    for r in ROUTES:
        by_endpoint[r.endpoint] = r
        quart_path = r.path.replace("{", "<").replace("}", ">")
        app.add_url_rule(quart_path, r.endpoint, make_view(r), methods=[r.method])

    @app.before_request
    async def concrete_paths_first() -> None:
        # Quart would try DELETE /v1/sessions/revoke-all as /v1/sessions/{session_id}.
        allowed = allowed_methods(ROUTES, request.path)
        if request.path in concrete_paths and request.method not in allowed:
            raise MethodNotAllowed(valid_methods=allowed)

    @app.after_request
    async def wait_for_the_body(response: Response) -> Response:
        with trio.move_on_after(BODY_WAIT_SECONDS):
            try:
                await request.get_data(cache=False, as_text=False)
            except HTTPException:
                pass  # too large (413): the connection closes after this answer
        return response

    @app.after_request
    async def audit(response: Response) -> Response:
        r = by_endpoint.get(request.endpoint or "")
        if r is not None and r.audit:
            entry = (now_ms(), request.method, request.path[:200], response.status_code)
            try:
                await ctx.store.write(
                    lambda conn: conn.execute(
                        "INSERT INTO admin_audit (at, method, path, status) VALUES (?, ?, ?, ?)",
                        entry,
                    )
                )
            except StoreError:
                # The store logs the cause once per episode; not per request.
                log.debug("admin.audit_failed")
            except Exception:
                log.exception("admin.audit_failed")
        return response

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        message = exc.description or exc.name
        if status == 413:
            message = f"the body is larger than admin.max_body_bytes ({max_body_bytes} bytes)"
        response = error_response(status, code, message)
        if isinstance(exc, MethodNotAllowed):
            # RFC 9110 section 15.5.6: a 405 lists the methods the resource has.
            response.headers["Allow"] = ", ".join(allowed_methods(ROUTES, request.path))
        return response

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        if isinstance(exc, UnicodeDecodeError):  # Quart decoding a form or JSON body
            return error_response(400, "invalid_utf8", "the body is not valid UTF-8")
        log.error(
            "admin.internal_error",
            exc_info=exc,
            extra=fields(method=request.method, path=request.path[:200]),
        )
        return error_response(500, "internal_error", "internal error; see the server log")

    return app
