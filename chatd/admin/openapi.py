"""The OpenAPI 3.1 document, generated from :data:`chatd.admin.api.ROUTES`.

``docs/openapi.json`` is this function's output (``chatd openapi`` prints
it); a test fails when the two differ, so the committed document can't drift.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from chatd import __version__
from chatd.admin.api import ROUTES, ErrorBody

_REF: Final = "#/components/schemas/{name}"

# Errors any route may answer with, besides those specific to a body or auth.
_COMMON_ERRORS: Final = {
    "404": "No such route (code not_found).",
    "405": "Method not allowed on this route (code method_not_allowed).",
    "500": "Server bug (code internal_error); details are in the server log only.",
    "503": "The database refused a write, e.g. the disk is full (code storage_unavailable; "
    "Retry-After says when to try again). A change may have been made in part: check first.",
}
_AUTH_ERRORS: Final = {"401": "Missing or wrong admin token (code unauthorized)."}
_BODY_ERRORS: Final = {
    "400": "Body is not valid UTF-8 (invalid_utf8), not JSON (malformed_json), or does not "
    "match the schema (invalid_request, with the JSON path in error.field).",
    "413": "Body larger than admin.max_body_bytes (payload_too_large).",
    "415": "A body that is not application/json (unsupported_media_type).",
}
_QUERY_ERRORS: Final = {"400": "A query parameter is invalid (invalid_request, error.field)."}
_PATH_ERRORS: Final = {
    "400": "A path id is not a positive integer (invalid_request, error.field names it)."
}
#: Every ``{name}`` in a path is a positive integer id (see chatd.admin.api).
_ID_SCHEMA: Final = {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}


def _query_parameters(query: type, schema: dict[str, Any]) -> list[dict[str, Any]]:
    params = []
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        params.append(
            {
                "name": name,
                "in": "query",
                "required": name in required,
                "schema": _without_null(prop),
            }
        )
    return params


def _without_null(prop: dict[str, Any]) -> dict[str, Any]:
    """A query parameter's schema without msgspec's ``X | None`` null branch:
    a query string cannot say null, leaving the parameter out does."""
    branches = prop.get("anyOf", [])
    rest = [b for b in branches if b != {"type": "null"}]
    if len(rest) != 1 or len(branches) != 2:
        return prop
    schema = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
    schema.update(rest[0])
    return schema


def _path_parameters(names: list[str]) -> list[dict[str, Any]]:
    return [{"name": n, "in": "path", "required": True, "schema": dict(_ID_SCHEMA)} for n in names]


def _add_error(errors: dict[str, str], status: int, text: str) -> None:
    key = str(status)
    errors[key] = f"{errors[key]} {text}" if key in errors else text


def openapi_document() -> dict[str, Any]:
    """Build the OpenAPI 3.1 document for the admin API."""
    types: list[Any] = [ErrorBody]
    for r in ROUTES:
        response = r.response if r.media_type == "application/json" else None
        types += [t for t in (response, r.body, r.query) if t is not None]
    refs, components = msgspec.json.schema_components(types, ref_template=_REF)
    ref_of = dict(zip(types, refs, strict=True))
    error_ref = ref_of[ErrorBody]
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        op: dict[str, Any] = {
            "operationId": r.endpoint,
            "summary": r.summary,
            "tags": [r.tag],
            "security": [{"bearer": []}] if r.auth else [],
        }
        parameters = _path_parameters(r.path_params)
        if r.query is not None:
            name = r.query.__name__
            parameters += _query_parameters(r.query, components.pop(name))
        if parameters:
            op["parameters"] = parameters
        if r.body is not None:
            # An empty body is read as {}: it may be left out when no field is required.
            body_schema = components[ref_of[r.body]["$ref"].rsplit("/", 1)[1]]
            op["requestBody"] = {
                "required": bool(body_schema.get("required")),
                "content": {"application/json": {"schema": ref_of[r.body]}},
            }
        media_type = r.media_type.partition(";")[0]
        schema = (
            ref_of[r.response]
            if media_type == "application/json"
            else {"type": "string", "contentMediaType": media_type}
        )
        responses: dict[str, Any] = {
            "200": {"description": "Success.", "content": {media_type: {"schema": schema}}},
        }
        errors = dict(_COMMON_ERRORS)
        if r.auth:
            errors |= _AUTH_ERRORS
        for extra in (
            _PATH_ERRORS if r.path_params else {},
            _QUERY_ERRORS if r.query is not None else {},
            _BODY_ERRORS if r.body is not None else {},
        ):
            for code, text in extra.items():
                _add_error(errors, int(code), text)
        if r.endpoint == "health":
            errors["503"] = "The store is not writable (status degraded)."
        for status_code, text in r.errors:
            _add_error(errors, status_code, text)
        for status, text in sorted(errors.items()):
            responses[status] = {
                "description": text,
                "content": {"application/json": {"schema": error_ref}},
            }
        op["responses"] = responses
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "chatd admin API",
            "version": __version__,
            "description": (
                "Local administration API of chatd. It listens on a unix socket (mode 0600) "
                "or a loopback address and is used by chatctl. Every route except health and "
                "this document needs 'Authorization: Bearer <admin token>'. Every error has "
                'the body {"error": {"code", "message"}}.'
            ),
        },
        "servers": [{"url": "http://localhost", "description": "over the admin unix socket"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
