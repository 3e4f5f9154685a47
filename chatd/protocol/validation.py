"""What is wrong with a frame that failed to decode: the field and why.

The strict decoder (msgspec) says only that a frame is invalid, in a message
meant for people. To name the offending field (``$.envelopes[3].ciphertext``)
without reading that text, a frame that failed is decoded again as plain JSON
and walked along the frame's declared type: unknown and missing fields are
found here, and each value is checked on its own with msgspec, whose message
for a lone value carries no path. Only frames that failed take this path.

Nesting: msgspec decodes recursively, so JSON nested a thousand deep ends in
a RecursionError (how deep depends on the caller's stack). A frame nested
deeper than :data:`MAX_NESTING_DEPTH` is refused by a scan of its brackets
before it is decoded again, whatever its shape, so the limit is the same
everywhere. No valid frame comes near it (``tests/test_protocol.py`` checks
the deepest declared type), so a frame that decoded needs no scan.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final

import msgspec

ERR_BAD_FRAME: Final = "bad_frame"  # not JSON, or a field is missing/wrong
ERR_UNKNOWN_TYPE: Final = "unknown_type"  # ``type`` names no frame
MAX_NESTING_DEPTH: Final = 32  # arrays and objects inside one another, the frame's own included
NESTED_TOO_DEEPLY: Final = f"frame is nested deeper than {MAX_NESTING_DEPTH} levels"

_STRING: Final = re.compile(r'"(?:[^"\\]|\\.)*"?', re.DOTALL)  # a JSON string, or its start
_NOT_BRACKETS: Final = {c: None for c in range(128) if chr(c) not in "[]{}"}


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a frame was refused: an error code, a message, the JSON path of
    the field (or None for the frame as a whole), and the frame's usable ``id``."""

    code: str
    message: str
    field: str | None = None
    request_id: str | None = None


def explain(
    data: str, frame_types: Mapping[str, type[msgspec.Struct]], *, max_id_chars: int
) -> Problem:
    """Find what is wrong with ``data``, a text frame the strict decoder refused."""
    if nested_too_deeply(data):
        return Problem(ERR_BAD_FRAME, NESTED_TOO_DEEPLY)
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        return Problem(ERR_BAD_FRAME, f"frame is not a JSON object: {exc}")
    except RecursionError:  # pragma: no cover - the scan above refuses what could recurse
        return Problem(ERR_BAD_FRAME, NESTED_TOO_DEEPLY)
    if not isinstance(raw, dict):
        return Problem(ERR_BAD_FRAME, f"expected a JSON object, got {_json_kind(raw)}")
    request_id = raw.get("id")
    if not (isinstance(request_id, str) and 0 < len(request_id) <= max_id_chars):
        request_id = None
    tag = raw.get("type")
    if tag is None:
        return Problem(ERR_BAD_FRAME, "missing required field `type`", "$.type", request_id)
    if not isinstance(tag, str):
        message = f"expected a string, got {_json_kind(tag)}"
        return Problem(ERR_BAD_FRAME, message, "$.type", request_id)
    frame_type = frame_types.get(tag)
    if frame_type is None:
        return Problem(ERR_UNKNOWN_TYPE, f"unknown frame type {tag!r}", "$.type", request_id)
    found = _locate(raw, frame_type, "$")
    if found is None:  # pragma: no cover - the strict decoder refused it for a reason
        return Problem(ERR_BAD_FRAME, "the frame does not match its type", None, request_id)
    field, message = found
    return Problem(ERR_BAD_FRAME, message, None if field == "$" else field, request_id)


def nested_too_deeply(data: str) -> bool:
    """Whether arrays and objects nest deeper than MAX_NESTING_DEPTH in
    ``data``, well formed or not (brackets inside strings do not count).
    Linear in the length, and cheap when there are few brackets."""
    if data.count("[") + data.count("{") <= MAX_NESTING_DEPTH:
        return False
    depth = 0
    for char in _STRING.sub("", data).translate(_NOT_BRACKETS):
        if char in "[{":
            depth += 1
            if depth > MAX_NESTING_DEPTH:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    return "object"


def _problem(value: Any, annotation: Any) -> str | None:
    """msgspec's message if ``value`` does not convert to ``annotation``."""
    try:
        msgspec.convert(value, annotation)
    except msgspec.ValidationError as exc:
        return str(exc)
    return None


def _locate(value: Any, annotation: Any, path: str) -> tuple[str, str] | None:
    """The path and message of the first problem in ``value``, read as
    ``annotation``; None if it has none."""
    message = _problem(value, annotation)
    if message is None:
        return None
    base, metas = annotation, ()
    if typing.get_origin(annotation) is Annotated:
        base, *rest = typing.get_args(annotation)
        metas = tuple(rest)
    if isinstance(base, type) and issubclass(base, msgspec.Struct) and isinstance(value, dict):
        return _locate_struct(value, base, path) or (path, message)
    if typing.get_origin(base) is list and isinstance(value, list):
        whole = _problem(value, Annotated[list[Any], *metas]) if metas else None
        if whole is not None:
            return path, whole
        (item,) = typing.get_args(base)
        for index, element in enumerate(value):
            found = _locate(element, item, f"{path}[{index}]")
            if found is not None:
                return found
        return path, message
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(base) if m is not type(None)]
        if value is not None and len(members) == 1:
            return _locate(value, members[0], path) or (path, message)
    return path, message


def _locate_struct(
    value: dict[str, Any], struct: type[msgspec.Struct], path: str
) -> tuple[str, str] | None:
    fields = msgspec.structs.fields(struct)
    names = {field.encode_name for field in fields}
    tag_field = struct.__struct_config__.tag_field
    for key in value:
        if key not in names and key != tag_field:
            return f"{path}.{key}", f"unknown field `{key}`"
    for field in fields:
        if field.required and field.encode_name not in value:
            return f"{path}.{field.encode_name}", f"missing required field `{field.encode_name}`"
    hints = typing.get_type_hints(struct, include_extras=True)
    for field in fields:
        name = field.encode_name
        if name in value:
            found = _locate(value[name], hints[field.name], f"{path}.{name}")
            if found is not None:
                return found
    return None
