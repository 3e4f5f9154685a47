"""The Quart application for the admin API.

Request handling, in order: route match (404/405), admin token check (401),
path ids (400 invalid_request naming the parameter), query, body size (413),
content type (415), UTF-8 (400 invalid_utf8), JSON (400 malformed_json),
schema (400 invalid_request with the field), then the handler. Every failure,
including Quart's own and unexpected exceptions, answers with
``{"error": {"code", "message"}}``; exception details go to the log, never to
the client. An :class:`~chatd.auth.models.AuthError` from a handler keeps its
code and field, with the status from :func:`auth_error_status`.
"""

from __future__ import annotations

import hmac
import logging
import math
from typing import Any, Final

import msgspec
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from chatd.admin.api import (
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


def _validation_error(exc: msgspec.ValidationError, where: str) -> ApiError:
    text = str(exc)
    field = None
    marker = " - at `"
    if marker in text:
        text, _, path = text.partition(marker)
        field = path.rstrip("`")
        if where == "query":
            field = field.replace("$.", "", 1)
    return ApiError(400, "invalid_request", f"invalid {where}: {text}", field)


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
        raise _validation_error(exc, "body") from None
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
        return msgspec.convert(args, type=r.query, strict=False)
    except msgspec.ValidationError as exc:
        raise _validation_error(exc, "query") from None


def create_app(ctx: AdminContext, *, max_body_bytes: int) -> QuartTrio:
    """Build the admin app bound to ``ctx``."""
    app = QuartTrio("chatd.admin")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    by_endpoint: dict[str, Route] = {}

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
        return error_response(status, code, message)

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
