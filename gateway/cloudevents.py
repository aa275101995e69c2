"""CloudEvents 1.0 over HTTP: requests to events in the JSON event format, and subscription filters.

We implement the HTTP protocol binding ourselves rather than depend on an SDK.  ``parse_http`` takes
the request's headers and body and returns every event it carries, each as a ``dict`` in the
structured JSON form (context attributes at the top level, then ``data`` or ``data_base64``).

Supported (specversion ``1.0`` only):

- **binary mode**: attributes in ``ce-*`` headers (names case-insensitive, values percent-decoded as
  UTF-8 per the binding's section 3.1.3.2), ``Content-Type`` as ``datacontenttype``, the body as the
  data.  An empty body means the event has no data.  The body becomes ``data`` as a JSON value when the
  content type is JSON (``*/json`` or ``*/*+json``; a body that is not valid JSON is rejected), ``data``
  as a string for text types (``text/*``, XML, ...) that decode as UTF-8, and ``data_base64`` otherwise
  (including a body without a ``Content-Type``, and text in a charset other than UTF-8 or ASCII).
- **structured mode**: ``Content-Type: application/cloudevents+json`` (charset UTF-8, if given), the
  body one JSON object.  The event is returned as sent, except that attributes set to ``null`` are
  dropped (the JSON format says null means unset); ``data_base64`` is kept encoded, never decoded.
  ``ce-*`` headers are ignored in this mode, as the binding requires.
- **batched mode**: ``Content-Type: application/cloudevents-batch+json``, the body a non-empty JSON
  array of structured events; all are returned, in order.  One invalid event rejects the whole batch.

Guarantees: every returned event has ``specversion == "1.0"`` and non-empty string ``id``, ``source``
and ``type``; ``time`` (if present) is RFC 3339; ``dataschema`` is an absolute URI; ``subject`` and
``datacontenttype`` are non-empty strings; extension names are 1-20 of ``a-z0-9`` with string, boolean
or 32-bit integer values (CloudEvents has no floating-point type; binary-mode values are always
strings, since headers carry no type); at most one of ``data`` and ``data_base64``, the latter valid
base64.  Anything else raises ``InvalidRequest`` naming the attribute (and, in a batch, the index).

Deliberately not supported: specversion 0.3 and older; event formats other than JSON (Avro, Protobuf,
XML) and their ``application/cloudevents+...`` content types; writing events to HTTP responses;
typing binary-mode extension values by guessing; checking that ``source`` is a URI-reference beyond
being non-empty; normalising ``time``.  A header sent twice (including ``ce-id`` next to ``CE-Id`` in a
plain ``dict``) is rejected rather than guessed at.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

from faas.core.errors import InvalidRequest

SPECVERSION = "1.0"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"

REQUIRED_ATTRIBUTES = ("specversion", "id", "source", "type")
OPTIONAL_ATTRIBUTES = ("datacontenttype", "dataschema", "subject", "time")
_DATA_MEMBERS = ("data", "data_base64")

_ATTRIBUTE_NAME_RE = re.compile(r"[a-z0-9]{1,20}")
_URI_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# Used with fullmatch: ``$`` would accept a trailing newline, ``\d`` any Unicode digit.
_RFC3339_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_TEXT_MEDIA_TYPES = frozenset(
    {
        "application/xml",
        "application/javascript",
        "application/x-www-form-urlencoded",
        "application/yaml",
        "application/x-yaml",
    }
)
_UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
_MODES_HELP = (
    "send binary mode (attributes in ce-* headers, including ce-specversion, and the data as the body) "
    f"or structured mode (Content-Type: {STRUCTURED_CONTENT_TYPE} with the event as a JSON object, "
    f"or {BATCH_CONTENT_TYPE} with a JSON array of events)"
)


def parse_http(headers: Mapping[str, str], body: bytes) -> list[dict[str, Any]]:
    """The events an HTTP request carries, validated, in the structured JSON form.

    ``headers`` may be Starlette's ``Headers`` or a plain ``dict`` in any letter case.  Raises
    ``InvalidRequest`` if the request is not a valid CloudEvents 1.0 binary, structured or batched
    request.
    """
    lowered = _lower_headers(headers)
    content_type = lowered.get("content-type", "").strip()
    media_type, params = _parse_media_type(content_type)
    if media_type == STRUCTURED_CONTENT_TYPE:
        document = _load_json_body(body, params, what="structured CloudEvent")
        if not isinstance(document, dict):
            raise InvalidRequest(
                f"a structured CloudEvent must be a JSON object, got {_json_kind(document)}"
                f" (use {BATCH_CONTENT_TYPE} for an array of events)"
            )
        return [_validate_structured(document, where="")]
    if media_type == BATCH_CONTENT_TYPE:
        document = _load_json_body(body, params, what="CloudEvents batch")
        if not isinstance(document, list):
            raise InvalidRequest(f"a CloudEvents batch must be a JSON array, got {_json_kind(document)}")
        if not document:
            raise InvalidRequest("the CloudEvents batch is empty: send at least one event")
        events = []
        for index, item in enumerate(document):
            where = f"batch event {index}: "
            if not isinstance(item, dict):
                raise InvalidRequest(f"{where}must be a JSON object, got {_json_kind(item)}")
            events.append(_validate_structured(item, where=where))
        return events
    if media_type.startswith("application/cloudevents"):
        raise InvalidRequest(
            f"unsupported CloudEvents format {media_type!r}: only {STRUCTURED_CONTENT_TYPE} and "
            f"{BATCH_CONTENT_TYPE} are supported"
        )
    if "ce-specversion" in lowered:
        return [_parse_binary(lowered, content_type, media_type, params, body)]
    raise InvalidRequest(f"the request is not a CloudEvent: {_MODES_HELP}")


def event_matches(event: Mapping[str, Any], *, type: str | None = None, source: str | None = None) -> bool:
    """Whether ``event`` passes a subscription filter: an exact match on each filter set (None = any)."""
    if type is not None and event.get("type") != type:
        return False
    return source is None or event.get("source") == source


# --- modes -----------------------------------------------------------------------------------------


def _parse_binary(
    headers: Mapping[str, str], content_type: str, media_type: str, params: Mapping[str, str], body: bytes
) -> dict[str, Any]:
    event: dict[str, Any] = {}
    for key, raw in headers.items():
        if not key.startswith("ce-"):
            continue
        name = key[3:]
        if name == "datacontenttype":
            raise InvalidRequest(
                "in binary mode send datacontenttype as the Content-Type header, not ce-datacontenttype"
            )
        if name == "data":
            raise InvalidRequest("header ce-data is not allowed: in binary mode the request body is the data")
        event[name] = _percent_decode(raw, header=key)
    if content_type:
        event["datacontenttype"] = content_type
    _validate_attributes(event, where="")
    if body:
        event.update(_binary_data(body, media_type, params, content_type))
    return _ordered(event)


def _binary_data(
    body: bytes, media_type: str, params: Mapping[str, str], content_type: str
) -> dict[str, Any]:
    if _is_json(media_type):
        try:
            return {"data": json.loads(body.decode("utf-8"), parse_constant=_reject_constant)}
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise InvalidRequest(
                f"the body is not valid UTF-8 JSON, but Content-Type is {content_type!r}: {exc}"
            ) from exc
    charset = params.get("charset", "utf-8").lower()
    if _is_text(media_type) and charset in _UTF8_CHARSETS:
        try:
            return {"data": body.decode("utf-8")}
        except UnicodeDecodeError:
            pass  # mislabelled bytes: keep them exact rather than guess
    return {"data_base64": base64.b64encode(body).decode("ascii")}


def _validate_structured(document: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    # The JSON format: "when decoding attributes and a null value is encountered, it MUST be treated
    # as the equivalent of unset or omitted".
    event = {key: value for key, value in document.items() if value is not None}
    _validate_attributes({k: v for k, v in event.items() if k not in _DATA_MEMBERS}, where=where)
    if "data" in event and "data_base64" in event:
        raise InvalidRequest(f"{where}an event must not have both 'data' and 'data_base64'")
    if "data_base64" in event:
        encoded = event["data_base64"]
        if not isinstance(encoded, str):
            raise InvalidRequest(
                f"{where}attribute 'data_base64' must be a base64 string, got {_json_kind(encoded)}"
            )
        try:
            base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest(f"{where}attribute 'data_base64' is not valid base64: {exc}") from exc
    return event


# --- attributes ------------------------------------------------------------------------------------


def _validate_attributes(attributes: Mapping[str, Any], *, where: str) -> None:
    """Check the context attributes (not ``data``/``data_base64``) of one event."""
    specversion = attributes.get("specversion")
    if specversion is None:
        raise InvalidRequest(f"{where}missing required attribute 'specversion'")
    if not isinstance(specversion, str):
        raise InvalidRequest(
            f"{where}attribute 'specversion' must be a string such as {SPECVERSION!r}, got {_json_kind(specversion)}"
        )
    if specversion != SPECVERSION:
        raise InvalidRequest(
            f"{where}unsupported specversion {specversion!r}: only {SPECVERSION!r} is supported"
        )
    for name in REQUIRED_ATTRIBUTES[1:]:
        if name not in attributes:
            raise InvalidRequest(f"{where}missing required attribute {name!r}")
        _require_string(attributes[name], name, where)
    for name in ("datacontenttype", "subject"):
        if name in attributes:
            _require_string(attributes[name], name, where)
    if "dataschema" in attributes:
        value = attributes["dataschema"]
        _require_string(value, "dataschema", where)
        if not _URI_SCHEME_RE.match(value) or any(ch.isspace() or not ch.isprintable() for ch in value):
            raise InvalidRequest(f"{where}attribute 'dataschema' must be an absolute URI, got {value!r}")
    if "time" in attributes:
        value = attributes["time"]
        _require_string(value, "time", where)
        if not _is_rfc3339(value):
            raise InvalidRequest(
                f"{where}attribute 'time' must be an RFC 3339 timestamp such as "
                f"'2024-05-01T12:00:00Z', got {value!r}"
            )
    for name, value in attributes.items():
        if name in REQUIRED_ATTRIBUTES or name in OPTIONAL_ATTRIBUTES:
            continue
        if not _ATTRIBUTE_NAME_RE.fullmatch(name):
            raise InvalidRequest(
                f"{where}invalid extension attribute name {name!r}: "
                "names are 1-20 characters, lowercase letters a-z and digits 0-9 only"
            )
        _check_extension_value(name, value, where)


def _require_string(value: Any, name: str, where: str) -> None:
    if not isinstance(value, str) or not value:
        got = repr(value) if isinstance(value, str) else _json_kind(value)
        raise InvalidRequest(f"{where}attribute {name!r} must be a non-empty string, got {got}")


def _check_extension_value(name: str, value: Any, where: str) -> None:
    if isinstance(value, str | bool):
        return
    if isinstance(value, int | float):
        integral = isinstance(value, int) or value.is_integer()
        if integral and _INT32_MIN <= value <= _INT32_MAX:
            return
        raise InvalidRequest(
            f"{where}extension attribute {name!r} must be a string, a boolean or a 32-bit integer, got {value!r}"
            " (CloudEvents has no floating-point type: send it as a string)"
        )
    raise InvalidRequest(
        f"{where}extension attribute {name!r} must be a string, a boolean or an integer, got {_json_kind(value)}"
    )


def _is_rfc3339(value: str) -> bool:
    match = _RFC3339_RE.fullmatch(value)
    if not match:
        return False
    year, month, day, hour, minute, second = (int(part) for part in match.group(1, 2, 3, 4, 5, 6))
    try:
        dt.date(year, month, day)
    except ValueError:
        return False
    # Second 60 is RFC 3339's leap second.
    if hour > 23 or minute > 59 or second > 60:
        return False
    if match.group(8):
        return int(match.group(9)) <= 23 and int(match.group(10)) <= 59
    return True


# --- HTTP details ----------------------------------------------------------------------------------


def _lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    lowered: dict[str, str] = {}
    for key, value in headers.items():
        name = key.lower()
        if name in lowered and (name.startswith("ce-") or name == "content-type"):
            raise InvalidRequest(f"header {name!r} is sent more than once")
        lowered[name] = value
    return lowered


def _percent_decode(value: str, *, header: str) -> str:
    # Section 3.1.3.2: senders percent-encode space, '"', '%' and every character outside printable
    # ASCII as UTF-8; a '%' not followed by two hex digits is left as it is, like urllib does.
    try:
        return unquote_to_bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"header {header!r} does not percent-decode to UTF-8 text: {exc}") from exc


def _parse_media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """``'Text/Plain; Charset="UTF-8"'`` -> ``('text/plain', {'charset': 'UTF-8'})``."""
    media_type, *rest = content_type.split(";")
    params: dict[str, str] = {}
    for param in rest:
        key, sep, value = param.partition("=")
        if sep:
            params[key.strip().lower()] = value.strip().strip('"')
    return media_type.strip().lower(), params


def _is_json(media_type: str) -> bool:
    # The JSON format: JSON data has a media type of the form */json or */*+json.
    subtype = media_type.partition("/")[2]
    return subtype == "json" or subtype.endswith("+json")


def _is_text(media_type: str) -> bool:
    return media_type.startswith("text/") or media_type.endswith("+xml") or media_type in _TEXT_MEDIA_TYPES


def _load_json_body(body: bytes, params: Mapping[str, str], *, what: str) -> Any:
    charset = params.get("charset", "utf-8").lower()
    if charset not in _UTF8_CHARSETS:
        raise InvalidRequest(f"unsupported charset {charset!r} for a {what}: JSON must be UTF-8")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidRequest(f"the body of a {what} is not valid UTF-8 JSON: {exc}") from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _ordered(event: Mapping[str, Any]) -> dict[str, Any]:
    """Required attributes first, data last: the order people expect to read an event in."""
    head = {name: event[name] for name in REQUIRED_ATTRIBUTES if name in event}
    middle = {k: v for k, v in event.items() if k not in head and k not in _DATA_MEMBERS}
    tail = {k: event[k] for k in _DATA_MEMBERS if k in event}
    return head | middle | tail
