"""Event subscriptions on the command line: the source flags of ``faas events add``, and how a
subscription is shown.

``spec_from_flags`` turns the flags into a ``SubscriptionSpec`` and checks it whole with the platform's
own model before anything is sent, so a bad schedule, bucket or batch size exits 2 naming the flag it
came from.  Each subscription has exactly one source, chosen by one of ``--timer``, ``--bucket``,
``--stream`` or ``--cloudevents``; an option of another source (``--prefix`` with ``--timer``) is an
error rather than silently dropped.

``describe`` and ``subscription_rows`` read subscriptions as the gateway returns them (plain dicts), so
a field a newer gateway adds is ignored and a source kind this CLI does not know shows as ``?``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import ValidationError

from faas.core.subscriptions import SOURCE_KINDS, NamedSubscriptionSpec, SubscriptionSpec

from .errors import UsageError
from .manifest import error_reason, parse_duration

SUBSCRIPTION_HEADERS = ["FUNCTION", "NAME", "SOURCE", "DETAILS", "QUALIFIER", "ORIGIN", "ENABLED"]
DEFAULT_OBJECT_EVENTS = ["ObjectCreated:*"]
# The flag that picks each source kind.
SOURCE_FLAGS = {
    "timer": "--timer",
    "object_store": "--bucket",
    "queue": "--stream",
    "cloudevents": "--cloudevents",
}
# The argparse dest of each source's flag.
_SOURCE_DEST = {"timer": "timer", "object_store": "bucket", "queue": "stream", "cloudevents": "cloudevents"}
# argparse dest of each source's other options -> (flag, source kind).
_SOURCE_OPTIONS = {
    "payload": ("--payload", "timer"),
    "prefix": ("--prefix", "object_store"),
    "suffix": ("--suffix", "object_store"),
    "events": ("--event", "object_store"),
    "batch_size": ("--batch-size", "queue"),
    "batch_window": ("--batch-window", "queue"),
    "start": ("--start", "queue"),
    "ce_type": ("--type", "cloudevents"),
    "ce_source": ("--source", "cloudevents"),
}
# SubscriptionSpec field -> the flag that sets it (for validation messages).
_FLAG_OF_FIELD = {
    ("timer", "schedule"): "--timer",
    ("timer", "payload"): "--payload",
    ("object_store", "bucket"): "--bucket",
    ("object_store", "prefix"): "--prefix",
    ("object_store", "suffix"): "--suffix",
    ("object_store", "events"): "--event",
    ("queue", "stream"): "--stream",
    ("queue", "batch_size"): "--batch-size",
    ("queue", "batch_window_s"): "--batch-window",
    ("queue", "start"): "--start",
    ("cloudevents", "type"): "--type",
    ("cloudevents", "source"): "--source",
    ("qualifier",): "--qualifier",
    ("enabled",): "--disabled",
}


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """The flags of ``faas events add``: one source (and its options), ``--qualifier``, ``--disabled``."""
    timer = parser.add_argument_group("timer source")
    timer.add_argument(
        "--timer", metavar="EXPR", help="a schedule: 'rate(5 minutes)' or 'cron(SEC MIN HOUR DOM MON DOW)'"
    )
    timer.add_argument("--payload", metavar="JSON", help="the event's 'detail' (JSON; default: null)")

    bucket = parser.add_argument_group("object store source")
    bucket.add_argument("--bucket", metavar="BUCKET", help="objects changed in this bucket")
    bucket.add_argument("--prefix", help="only keys starting with this")
    bucket.add_argument("--suffix", help="only keys ending with this")
    bucket.add_argument(
        "--event",
        dest="events",
        action="append",
        metavar="EVENT",
        help="ObjectCreated:*, ObjectCreated:Put, ObjectRemoved:*... (repeatable; default: ObjectCreated:*)",
    )

    stream = parser.add_argument_group("queue source")
    stream.add_argument("--stream", metavar="STREAM", help="records added to this Redis stream")
    stream.add_argument(
        "--batch-size", type=_whole_number, metavar="N", help="at most N records per invocation (default: 10)"
    )
    stream.add_argument(
        "--batch-window",
        metavar="SECONDS",
        help="wait up to this long to fill a batch: 2, 2s, 500ms, 1m (default: 1s)",
    )
    stream.add_argument(
        "--start", choices=("latest", "earliest"), help="where a new subscription starts (default: latest)"
    )

    cloudevents = parser.add_argument_group("CloudEvents source (POST /v1/events)")
    cloudevents.add_argument("--cloudevents", action="store_true", help="CloudEvents posted to the gateway")
    cloudevents.add_argument("--type", dest="ce_type", metavar="TYPE", help="only events of this type")
    cloudevents.add_argument(
        "--source", dest="ce_source", metavar="SOURCE", help="only events from this source"
    )

    parser.add_argument(
        "-q", "--qualifier", help="the version number or alias events go to (default: latest)"
    )
    parser.add_argument("--disabled", action="store_true", help="create it switched off")


def spec_from_flags(args: argparse.Namespace) -> SubscriptionSpec:
    """The subscription the flags describe; a ``UsageError`` naming the flags when they are wrong."""
    chosen = [kind for kind, dest in _SOURCE_DEST.items() if _given(args, dest)]
    if not chosen:
        *first, last = SOURCE_FLAGS.values()
        raise UsageError(f"give an event source: {', '.join(first)} or {last}")
    if len(chosen) > 1:
        flags = " and ".join(SOURCE_FLAGS[kind] for kind in chosen)
        raise UsageError(f"{flags} are different event sources: a subscription has exactly one")
    kind = chosen[0]
    stray = [flag for dest, (flag, owner) in _SOURCE_OPTIONS.items() if owner != kind and _given(args, dest)]
    if stray:
        raise UsageError(
            f"{', '.join(stray)} cannot be used with {SOURCE_FLAGS[kind]} "
            f"({'they belong' if len(stray) > 1 else 'it belongs'} to another event source)"
        )

    source: dict[str, Any]
    if kind == "timer":
        source = {"schedule": args.timer}
        if args.payload is not None:
            try:
                source["payload"] = json.loads(args.payload)
            except ValueError as exc:
                raise UsageError(f"--payload is not valid JSON: {exc}") from None
    elif kind == "object_store":
        source = {"bucket": args.bucket, "prefix": args.prefix or "", "suffix": args.suffix or ""}
        source["events"] = args.events or DEFAULT_OBJECT_EVENTS
    elif kind == "queue":
        source = {"stream": args.stream}
        if args.batch_size is not None:
            source["batch_size"] = args.batch_size
        if args.batch_window is not None:
            try:
                source["batch_window_s"] = parse_duration(args.batch_window)
            except ValueError as exc:
                raise UsageError(f"--batch-window: {exc}") from None
        if args.start is not None:
            source["start"] = args.start
    else:
        source = {"type": args.ce_type, "source": args.ce_source}

    try:
        return SubscriptionSpec.model_validate(
            {kind: source, "qualifier": args.qualifier, "enabled": not getattr(args, "disabled", False)}
        )
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            loc = tuple(str(part) for part in error.get("loc") or ())
            flag = (
                _FLAG_OF_FIELD.get(loc[:2]) or _FLAG_OF_FIELD.get(loc[:1]) or ".".join(loc) or "subscription"
            )
            problems.append(f"{flag}: {error_reason(error)}")
        raise UsageError("; ".join(problems)) from None


def request_body(spec: SubscriptionSpec) -> dict[str, Any]:
    """The JSON the gateway takes for ``spec`` (unset sources and a null qualifier left out)."""
    return spec.model_dump(mode="json", exclude_none=True)


def declared_bodies(events: Iterable[NamedSubscriptionSpec]) -> list[dict[str, Any]]:
    """The ``subscriptions`` list of ``PUT /v1/functions/{name}/subscriptions`` for a manifest."""
    return [event.model_dump(mode="json", exclude_none=True) for event in events]


def added_by_hand(existing: Iterable[dict[str, Any]], declared: Iterable[str]) -> list[str]:
    """The declared names that a subscription added with the API or CLI already has (the gateway
    refuses to replace those with manifest ones)."""
    wanted = set(declared)
    return sorted(
        str(sub.get("name"))
        for sub in existing
        if sub.get("name") in wanted and sub.get("origin", "api") != "manifest"
    )


def source_kind(sub: dict[str, Any]) -> str:
    return next((kind for kind in SOURCE_KINDS if sub.get(kind) is not None), "?")


def describe(sub: dict[str, Any]) -> str:
    """A subscription's source in one line: ``bucket=photos prefix=in/``, ``stream=orders batch=10/1s``,
    ``cron(0 0 3 * * *)``, ``type=com.example.order source=/shop``."""
    kind = source_kind(sub)
    src = sub.get(kind)
    if not isinstance(src, dict):
        return "-"
    parts: list[str] = []
    if kind == "object_store":
        parts.append(f"bucket={src.get('bucket', '?')}")
        parts.extend(f"{key}={src[key]}" for key in ("prefix", "suffix") if src.get(key))
        events = src.get("events")
        if isinstance(events, list) and events != DEFAULT_OBJECT_EVENTS:
            parts.append("events=" + ",".join(str(e) for e in events))
    elif kind == "queue":
        window = src.get("batch_window_s")
        shown_window = f"{window:g}s" if isinstance(window, int | float) else "?"
        parts.append(f"stream={src.get('stream', '?')} batch={src.get('batch_size', '?')}/{shown_window}")
        if src.get("start", "latest") != "latest":
            parts.append(f"start={src['start']}")
    elif kind == "timer":
        parts.append(str(src.get("schedule", "?")))
        if src.get("payload") is not None:
            payload = json.dumps(src["payload"], separators=(",", ":"), ensure_ascii=False)
            parts.append(f"payload={payload if len(payload) <= 40 else payload[:37] + '...'}")
    elif kind == "cloudevents":
        parts.extend(f"{key}={src[key]}" for key in ("type", "source") if src.get(key))
        if not parts:
            parts.append("every event")
    return " ".join(parts)


def subscription_rows(subs: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The rows of ``faas events ls`` (see ``SUBSCRIPTION_HEADERS``), by function then name."""
    rows = []
    for sub in sorted(subs, key=lambda s: (str(s.get("function", "")), str(s.get("name", "")))):
        rows.append(
            [
                str(sub.get("function", "?")),
                str(sub.get("name", "?")),
                source_kind(sub),
                describe(sub),
                str(sub.get("qualifier") or "latest"),
                str(sub.get("origin", "?")),
                "yes" if sub.get("enabled", True) else "no",
            ]
        )
    return rows


def _given(args: argparse.Namespace, dest: str) -> bool:
    value = getattr(args, dest, None)
    return value is not None and value is not False


def _whole_number(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
