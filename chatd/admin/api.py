"""Admin API routes, declared once for both Quart and the OpenAPI document.

Each route is a :class:`Route`: method, path, summary, the msgspec types of
its query, body and response, the errors it can answer with beyond the common
ones, and whether it needs the admin token. The ``@route`` decorator records
it in :data:`ROUTES`; :mod:`chatd.admin.app` registers those with Quart and
:func:`chatd.admin.openapi.openapi_document` turns the same list into OpenAPI
3.1. There is no hand-written spec to drift.

Path parameters are ids: each ``{name}`` in a route's path is a positive
integer, passed to the handler as the keyword-only argument ``name``
(``async def show_user(ctx, query, body, *, user_id: int)``). ``@route``
checks that the handler's keyword-only arguments are exactly the path's
parameters, so the two cannot drift either.

The query and body types are also what the document promises, so a request
the document allows must not be refused with 400 (schemathesis checks this):
every rule the server checks before a handler runs belongs in the type, as a
``msgspec.Meta`` constraint (``ge``/``le``, ``min_length``/``max_length``,
``pattern``) or a ``Literal``. A field whose refusal has a code of its own
names it with ``Meta(extra={ERROR_CODE: "weak_password"})``; its description
is added to the message. Every integer in a query or body has an upper bound
(:data:`MAX_INT` at most), every string and list a longest length, so that no
value the document allows overflows SQLite or exceeds ``admin.max_body_bytes``
(``tests/test_admin_schemathesis.py`` checks each route's types for this).

Account administration lives in :mod:`chatd.admin.accounts_api`, room
administration in :mod:`chatd.admin.rooms_api`, who is online in
:mod:`chatd.admin.online_api` and consent in :mod:`chatd.admin.consent_api`,
all imported at the bottom of this module so that :data:`ROUTES` always holds
their routes.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Final, get_args

import msgspec

from chatd import __version__
from chatd.errors import InputError, RefusedError
from chatd.retention import JobName, Report, Retention
from chatd.store import Store

if TYPE_CHECKING:  # only a type here; the daemon builds it
    from chatd.auth.accounts import AccountAdmin
    from chatd.backup.service import Backups
    from chatd.consent import ConsentService
    from chatd.metrics import Metrics
    from chatd.privacy.erasure import Erasure
    from chatd.relay.registry import OnlineDevice
    from chatd.rooms.service import RoomService


@dataclass
class AdminContext:
    """What handlers may use. Built by serve_admin."""

    store: Store
    retention: Retention
    token_hash: bytes
    started: float = field(default_factory=time.monotonic)
    # Account administration; routes under /v1/users, /v1/invites, /v1/sessions
    # and /v1/auth-audit answer 503 service_unavailable while it is None.
    accounts: AccountAdmin | None = None
    # Room administration; routes under /v1/rooms answer 503 while it is None.
    rooms: RoomService | None = None
    # The relay registry's list of connected devices (Registry.online_devices);
    # GET /v1/online answers 503 while it is None.
    online: Callable[[], Sequence[OnlineDevice]] | None = None
    # The daemon's metrics; GET /metrics answers 503 while it is None.
    metrics: Metrics | None = None
    # Online backups; routes under /v1/backups answer 503 while it is None.
    backups: Backups | None = None
    # Consent documents and records; routes under /v1/consent and
    # /v1/users/{user_id}/consent answer 503 while it is None.
    consent: ConsentService | None = None
    # Account erasure and receipts (chatd.privacy); those routes answer 503
    # while it is None. The export needs only the store.
    erasure: Erasure | None = None
    # The name the account export's manifest gives this server.
    server_name: str = "chatd"


# (ctx, query, body, **path_ids) -> response; see the module docstring.
Handler = Callable[..., Awaitable[Any]]

_PATH_PARAM: Final = re.compile(r"\{([a-z_]+)\}")


class ApiError(RefusedError):
    """An error answer: HTTP status, machine code, human message, optional field."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # OpenAPI style: /v1/things/{id}
    summary: str
    handler: Handler
    response: type
    query: type | None = None
    body: type | None = None
    auth: bool = True
    tag: str = "admin"
    # Reads of personal data are audit-logged; so is every change.
    audit: bool = True
    # Route-specific error answers, (status, description), for the OpenAPI document.
    errors: tuple[tuple[int, str], ...] = ()
    # The 200 answer's media type. JSON bodies are encoded from ``response``;
    # for any other type the handler returns the body as text (``response=str``)
    # or a quart Response (streamed: the account export).
    media_type: str = "application/json"

    @property
    def endpoint(self) -> str:
        return self.handler.__name__

    @property
    def path_params(self) -> list[str]:
        """Names of the path's ``{id}`` parameters, in order."""
        return _PATH_PARAM.findall(self.path)


ROUTES: list[Route] = []


def route(
    method: str, path: str, summary: str, *, response: type, **kw: Any
) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        r = Route(method, path, summary, handler, response, **kw)
        keyword_only = [
            p.name
            for p in inspect.signature(handler).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        if sorted(keyword_only) != sorted(r.path_params):
            raise TypeError(
                f"{r.endpoint}: keyword-only arguments {keyword_only} must be the path "
                f"parameters {r.path_params} of {path}"
            )
        ROUTES.append(r)
        return handler

    return register


# -- shared schemas ------------------------------------------------------------


class ErrorDetail(msgspec.Struct):
    code: str
    message: str
    field: str | None = None


class ErrorBody(msgspec.Struct):
    """Body of every non-2xx response."""

    error: ErrorDetail


#: The largest integer a query or body may carry: ids and times are SQLite integers.
MAX_INT: Final = 2**63 - 1
#: ``Meta.extra`` key naming the error code a field is refused with (else invalid_request).
ERROR_CODE: Final = "error_code"

Limit = Annotated[int, msgspec.Meta(ge=1, le=500, description="Rows per page.")]
Cursor = Annotated[
    int, msgspec.Meta(ge=1, le=MAX_INT, description="Return rows with an id below this one.")
]


# -- health -------------------------------------------------------------------------


class Health(msgspec.Struct):
    status: str  # "ok" or "degraded"
    store_writable: bool
    version: str
    uptime_seconds: float


@route(
    "GET",
    "/v1/health",
    "Liveness and whether the store is writable",
    response=Health,
    auth=False,
    audit=False,
    tag="health",
)
async def health(ctx: AdminContext, query: None, body: None) -> Health:
    writable = ctx.store.writer_alive and await ctx.store.check_writable()
    return Health(
        status="ok" if writable else "degraded",
        store_writable=writable,
        version=__version__,
        uptime_seconds=round(time.monotonic() - ctx.started, 3),
    )


# -- the OpenAPI document ---------------------------------------------------------


@route(
    "GET",
    "/v1/openapi.json",
    "This OpenAPI 3.1 document",
    response=dict[str, Any],
    auth=False,
    audit=False,
    tag="meta",
)
async def openapi(ctx: AdminContext, query: None, body: None) -> dict[str, Any]:
    from chatd.admin.openapi import openapi_document  # built from this module's ROUTES

    return openapi_document()


# -- retention --------------------------------------------------------------------


class RunsQuery(msgspec.Struct, forbid_unknown_fields=True):
    limit: Limit = 50
    before_id: Cursor | None = None


class RunsPage(msgspec.Struct):
    runs: list[Report]
    next_before_id: int | None


@route(
    "GET",
    "/v1/retention/runs",
    "Retention run reports, newest first",
    response=RunsPage,
    query=RunsQuery,
    audit=False,
    tag="retention",
)
async def list_retention_runs(ctx: AdminContext, query: RunsQuery, body: None) -> RunsPage:
    runs = await ctx.retention.list_reports(limit=query.limit, before_id=query.before_id)
    more = len(runs) == query.limit and runs[-1].id is not None
    return RunsPage(runs=runs, next_before_id=runs[-1].id if more else None)


class RunRequest(msgspec.Struct, forbid_unknown_fields=True):
    jobs: (
        Annotated[
            list[JobName],
            msgspec.Meta(
                max_length=len(get_args(JobName)),
                description="The jobs to run, any of "
                + ", ".join(get_args(JobName))
                + "; all of them when omitted or null.",
            ),
        ]
        | None
    ) = None


class RunResult(msgspec.Struct):
    reports: list[Report]


class UnknownJob(InputError):
    """A retention job name that names no job."""


@route(
    "POST",
    "/v1/retention/run",
    "Run retention jobs now and return their reports",
    response=RunResult,
    body=RunRequest,
    tag="retention",
)
async def run_retention(ctx: AdminContext, query: None, body: RunRequest) -> RunResult:
    if body.jobs is not None:
        unknown = sorted(set(body.jobs) - set(ctx.retention.job_names))
        if unknown:
            known = ", ".join(ctx.retention.job_names)
            raise UnknownJob(f"unknown job(s) {', '.join(unknown)}; known: {known}")
    return RunResult(reports=await ctx.retention.run_now(body.jobs))


# -- admin audit ------------------------------------------------------------------------


class AuditEntry(msgspec.Struct):
    id: int
    at: int  # unix milliseconds
    method: str
    path: str
    status: int


class AuditQuery(msgspec.Struct, forbid_unknown_fields=True):
    limit: Limit = 50
    before_id: Cursor | None = None


class AuditPage(msgspec.Struct):
    entries: list[AuditEntry]
    next_before_id: int | None


@route(
    "GET",
    "/v1/admin-audit",
    "The admin API audit log, newest first",
    response=AuditPage,
    query=AuditQuery,
    audit=False,
    tag="audit",
)
async def list_admin_audit(ctx: AdminContext, query: AuditQuery, body: None) -> AuditPage:
    def read(conn: Any) -> list[AuditEntry]:
        rows = conn.execute(
            "SELECT id, at, method, path, status FROM admin_audit WHERE id < ?"
            " ORDER BY id DESC LIMIT ?",
            (query.before_id if query.before_id is not None else 2**63 - 1, query.limit),
        ).fetchall()
        return [AuditEntry(*row) for row in rows]

    entries = await ctx.store.read(read)
    more = len(entries) == query.limit
    return AuditPage(entries=entries, next_before_id=entries[-1].id if more else None)


# -- account administration (registers its routes in ROUTES) ------------------------------

import chatd.admin.accounts_api  # noqa: E402, F401 - it imports the names above
import chatd.admin.consent_api  # noqa: E402, F401 - likewise
import chatd.admin.metrics_api  # noqa: E402, F401 - likewise
import chatd.admin.online_api  # noqa: E402, F401 - likewise
import chatd.admin.privacy_api  # noqa: E402, F401 - likewise
import chatd.admin.rooms_api  # noqa: E402, F401 - likewise
import chatd.backup.api  # noqa: E402, F401 - likewise
