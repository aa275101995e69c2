"""Unit tests of the CloudEvents 1.0 HTTP binding: binary, structured and batched requests, validation
messages a sender reads, and subscription filters."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from starlette.datastructures import Headers

from faas.core.errors import InvalidRequest
from gateway.cloudevents import event_matches, parse_http

BINARY = {"ce-specversion": "1.0", "ce-id": "e-1", "ce-source": "/orders", "ce-type": "order.created"}
EVENT: dict[str, Any] = {"specversion": "1.0", "id": "e-1", "source": "/orders", "type": "order.created"}
STRUCTURED = {"content-type": "application/cloudevents+json"}
BATCH = {"content-type": "application/cloudevents-batch+json"}


def structured(**changes: Any) -> list[dict[str, Any]]:
    return parse_http(STRUCTURED, json.dumps({**EVENT, **changes}).encode())


def binary(body: bytes = b"", headers: dict[str, str] | None = None) -> dict[str, Any]:
    (event,) = parse_http({**BINARY, **(headers or {})}, body)
    return event


# --- binary mode -----------------------------------------------------------------------------------


def test_binary_json_body_becomes_data_value() -> None:
    event = binary(b'{"order": 42}', {"content-type": "application/json", "ce-subject": "o-42"})
    assert event == {**EVENT, "subject": "o-42", "datacontenttype": "application/json", "data": {"order": 42}}


def test_binary_any_plus_json_type_is_json() -> None:
    event = binary(b"[1, 2]", {"content-type": "application/vnd.acme.order+json; charset=utf-8"})
    assert event["data"] == [1, 2]
    assert event["datacontenttype"] == "application/vnd.acme.order+json; charset=utf-8"


def test_binary_invalid_json_body_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="not valid UTF-8 JSON.*application/json"):
        binary(b"{not json", {"content-type": "application/json"})


@pytest.mark.parametrize("content_type", ["text/plain", "text/csv; charset=UTF-8", "application/xml"])
def test_binary_text_body_becomes_string_data(content_type: str) -> None:
    event = binary("héllo, <b/>".encode(), {"content-type": content_type})
    assert event["data"] == "héllo, <b/>"
    assert "data_base64" not in event


def test_binary_opaque_body_becomes_data_base64() -> None:
    payload = bytes(range(256))
    event = binary(payload, {"content-type": "application/octet-stream"})
    assert base64.b64decode(event["data_base64"]) == payload
    assert "data" not in event


def test_binary_text_that_is_not_utf8_is_kept_as_base64() -> None:
    latin1 = "café".encode("latin-1")
    assert base64.b64decode(binary(latin1, {"content-type": "text/plain"})["data_base64"]) == latin1
    event = binary(latin1, {"content-type": "text/plain; charset=iso-8859-1"})
    assert base64.b64decode(event["data_base64"]) == latin1


def test_binary_body_without_content_type_is_base64_and_has_no_datacontenttype() -> None:
    event = binary(b'{"looks": "like json"}')
    assert "datacontenttype" not in event
    assert base64.b64decode(event["data_base64"]) == b'{"looks": "like json"}'


def test_binary_empty_body_means_no_data() -> None:
    event = binary(b"", {"content-type": "application/json"})
    assert event == {**EVENT, "datacontenttype": "application/json"}


def test_binary_header_values_are_percent_decoded() -> None:
    event = binary(
        headers={
            "ce-source": "/orders/caf%C3%A9%20bar",
            "ce-subject": "%22quoted%22%2050%25",
            "ce-comexampleext": "a%2Cb",
        }
    )
    assert event["source"] == "/orders/café bar"
    assert event["subject"] == '"quoted" 50%'
    assert event["comexampleext"] == "a,b"


def test_binary_header_that_is_not_utf8_after_decoding_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="'ce-subject' does not percent-decode to UTF-8"):
        binary(headers={"ce-subject": "%FF%FE"})


def test_binary_headers_are_case_insensitive_and_extensions_kept_as_strings() -> None:
    headers = {"CE-SpecVersion": "1.0", "Ce-Id": "e-1", "ce-Source": "/orders", "CE-TYPE": "order.created"}
    (event,) = parse_http({**headers, "CE-Priority": "7", "Content-Type": "text/plain"}, b"hi")
    assert event == {**EVENT, "priority": "7", "datacontenttype": "text/plain", "data": "hi"}


def test_binary_from_starlette_headers() -> None:
    raw = [(k.encode(), v.encode()) for k, v in {**BINARY, "content-type": "application/json"}.items()]
    (event,) = parse_http(Headers(raw=raw), b'{"a": 1}')
    assert event["data"] == {"a": 1}


def test_binary_duplicate_ce_header_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="'ce-id' is sent more than once"):
        parse_http({**BINARY, "CE-ID": "e-2"}, b"")
    raw = [(k.encode(), v.encode()) for k, v in BINARY.items()] + [(b"ce-id", b"e-2")]
    with pytest.raises(InvalidRequest, match="'ce-id' is sent more than once"):
        parse_http(Headers(raw=raw), b"")


def test_binary_ce_datacontenttype_header_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="Content-Type header"):
        binary(headers={"ce-datacontenttype": "application/json"})


def test_binary_non_ce_headers_are_ignored() -> None:
    event = binary(headers={"authorization": "Bearer x", "x-request-id": "r"})
    assert event == EVENT


# --- structured and batched mode -------------------------------------------------------------------


def test_structured_event_is_returned_as_sent() -> None:
    sent = {**EVENT, "time": "2024-05-01T12:00:00.123+02:00", "tenant": "acme", "data": {"order": 42}}
    assert parse_http(
        {"Content-Type": "application/cloudevents+json; charset=UTF-8"}, json.dumps(sent).encode()
    ) == [sent]


def test_structured_mode_ignores_ce_headers() -> None:
    (event,) = parse_http({**STRUCTURED, "ce-id": "header-id"}, json.dumps(EVENT).encode())
    assert event["id"] == "e-1"


def test_structured_text_and_base64_data_are_kept() -> None:
    (text,) = structured(datacontenttype="text/plain", data="hello")
    assert text["data"] == "hello"
    encoded = base64.b64encode(b"\x00\x01").decode()
    (binary_event,) = structured(datacontenttype="application/octet-stream", data_base64=encoded)
    assert binary_event["data_base64"] == encoded and "data" not in binary_event


def test_structured_null_attributes_are_treated_as_unset() -> None:
    (event,) = structured(subject=None, tenant=None, data=None)
    assert event == EVENT


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b'"just a string"', "must be a JSON object, got a string"),
        (b"[]", "must be a JSON object, got an array.*cloudevents-batch\\+json"),
        (b'{"specversion": "1.0", "id": NaN}', "NaN is not valid JSON"),
    ],
)
def test_structured_body_must_be_a_json_object(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_http(STRUCTURED, body)


def test_structured_non_utf8_charset_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="unsupported charset 'utf-16'"):
        parse_http(
            {"content-type": "application/cloudevents+json; charset=utf-16"}, json.dumps(EVENT).encode()
        )


def test_batch_returns_every_event_in_order() -> None:
    events = [{**EVENT, "id": f"e-{i}", "data": i} for i in range(3)]
    assert parse_http(BATCH, json.dumps(events).encode()) == events


def test_empty_batch_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="batch is empty"):
        parse_http(BATCH, b"[]")


def test_batch_must_be_an_array_of_objects() -> None:
    with pytest.raises(InvalidRequest, match="must be a JSON array, got an object"):
        parse_http(BATCH, json.dumps(EVENT).encode())
    with pytest.raises(InvalidRequest, match="batch event 1: must be a JSON object, got a number"):
        parse_http(BATCH, json.dumps([EVENT, 5]).encode())


def test_invalid_batch_event_names_its_index() -> None:
    events = [EVENT, {**EVENT, "id": ""}]
    with pytest.raises(InvalidRequest, match="batch event 1: attribute 'id' must be a non-empty string"):
        parse_http(BATCH, json.dumps(events).encode())


# --- neither mode ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, {"content-type": "application/json"}, {"ce-id": "e-1", "ce-type": "t"}]
)
def test_request_in_neither_mode_explains_both(headers: dict[str, str]) -> None:
    with pytest.raises(
        InvalidRequest, match="not a CloudEvent: send binary mode.*ce-specversion.*structured mode"
    ):
        parse_http(headers, b'{"a": 1}')


def test_other_event_formats_are_unsupported() -> None:
    with pytest.raises(
        InvalidRequest, match="unsupported CloudEvents format 'application/cloudevents\\+avro'"
    ):
        parse_http({"content-type": "application/cloudevents+avro"}, b"\x00")


# --- attribute validation --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["specversion", "id", "source", "type"])
def test_missing_required_attribute_is_named(name: str) -> None:
    event = {k: v for k, v in EVENT.items() if k != name}
    with pytest.raises(InvalidRequest, match=f"missing required attribute '{name}'"):
        parse_http(STRUCTURED, json.dumps(event).encode())


@pytest.mark.parametrize("name", ["id", "source", "type"])
def test_missing_required_header_is_named_in_binary_mode(name: str) -> None:
    headers = {k: v for k, v in BINARY.items() if k != f"ce-{name}"}
    with pytest.raises(InvalidRequest, match=f"missing required attribute '{name}'"):
        parse_http(headers, b"")


@pytest.mark.parametrize(("name", "value"), [("id", ""), ("source", 5), ("type", ["t"]), ("subject", "")])
def test_attribute_must_be_non_empty_string(name: str, value: Any) -> None:
    with pytest.raises(InvalidRequest, match=f"attribute '{name}' must be a non-empty string"):
        structured(**{name: value})


@pytest.mark.parametrize("version", ["0.3", "2.0", ""])
def test_other_specversions_are_unsupported(version: str) -> None:
    with pytest.raises(InvalidRequest, match=f"unsupported specversion '{version}': only '1.0'"):
        structured(specversion=version)
    with pytest.raises(InvalidRequest, match=f"unsupported specversion '{version}'"):
        binary(headers={"ce-specversion": version})


def test_numeric_specversion_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="'specversion' must be a string such as '1.0', got a number"):
        structured(specversion=1.0)


@pytest.mark.parametrize(
    "value",
    [
        "2024-05-01T12:00:00Z",
        "2024-05-01t12:00:00.123456789z",
        "2024-05-01T12:00:00-07:30",
        "2016-12-31T23:59:60Z",  # leap second
    ],
)
def test_rfc3339_time_is_accepted(value: str) -> None:
    assert structured(time=value)[0]["time"] == value


@pytest.mark.parametrize(
    "value",
    [
        "2024-05-01",
        "2024-05-01 12:00:00Z",
        "2024-05-01T12:00:00",  # no offset
        "2024-02-30T12:00:00Z",
        "2024-05-01T24:00:00Z",
        "2024-05-01T12:00:00+24:00",
        "2024-05-01T12:00:00Z\n",
        "yesterday",
    ],
)
def test_bad_time_is_rejected(value: str) -> None:
    with pytest.raises(InvalidRequest, match="attribute 'time' must be an RFC 3339 timestamp"):
        structured(time=value)
    with pytest.raises(InvalidRequest, match="attribute 'time' must be an RFC 3339 timestamp"):
        binary(headers={"ce-time": value.replace(" ", "%20").replace("\n", "%0A")})


def test_dataschema_must_be_absolute_uri() -> None:
    assert structured(dataschema="https://schemas.example.com/order.json")[0]["dataschema"]
    for bad in ("/relative/path", "https://example.com/a b", ""):
        with pytest.raises(InvalidRequest, match="'dataschema'"):
            structured(dataschema=bad)


@pytest.mark.parametrize("name", ["camelCase", "with-dash", "under_score", "a" * 21, "abc\n", ""])
def test_bad_extension_name_is_rejected(name: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid extension attribute name"):
        structured(**{name: "v"})


def test_bad_extension_header_name_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="invalid extension attribute name 'trace_id'"):
        binary(headers={"ce-trace_id": "x"})


def test_extension_values_string_bool_and_integer_are_accepted() -> None:
    (event,) = structured(tenant="acme", sampled=True, priority=7, big=2**31 - 1)
    assert (event["tenant"], event["sampled"], event["priority"], event["big"]) == (
        "acme",
        True,
        7,
        2**31 - 1,
    )


@pytest.mark.parametrize("value", [{"a": 1}, [1], 1.5, 2**31])
def test_extension_values_of_other_types_are_rejected(value: Any) -> None:
    with pytest.raises(InvalidRequest, match="extension attribute 'ext' must be a string, a boolean or"):
        structured(ext=value)


def test_data_and_data_base64_together_are_rejected() -> None:
    with pytest.raises(InvalidRequest, match="both 'data' and 'data_base64'"):
        structured(data={"a": 1}, data_base64="AAE=")


@pytest.mark.parametrize("value", ["not base64!", "AAE", 5])
def test_bad_data_base64_is_rejected(value: Any) -> None:
    with pytest.raises(InvalidRequest, match="'data_base64'"):
        structured(data_base64=value)


# --- subscription filters --------------------------------------------------------------------------


def test_event_matches_each_filter_exactly() -> None:
    assert event_matches(EVENT, type=None, source=None)
    assert event_matches(EVENT, type="order.created", source=None)
    assert event_matches(EVENT, type=None, source="/orders")
    assert event_matches(EVENT, type="order.created", source="/orders")
    assert not event_matches(EVENT, type="order.created", source="/orders/eu")
    assert not event_matches(EVENT, type="order", source=None)  # no prefix matching
    assert not event_matches(EVENT, type="Order.Created", source=None)  # case-sensitive
    assert event_matches(EVENT)  # both filters default to "any"


def test_deeply_nested_json_is_a_400_not_a_crash() -> None:
    with pytest.raises(InvalidRequest, match="not valid UTF-8 JSON"):
        parse_http({"content-type": "application/cloudevents+json"}, b"[" * 100_000)
