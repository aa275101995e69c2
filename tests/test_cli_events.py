"""Event subscriptions and destinations in the `faas` CLI, without a platform: the `events:` and
`on_success`/`on_failure` keys of faas.yaml, the flags of `faas events add`, and the requests that
`faas events` and `faas deploy` send (to httpx's MockTransport, not a server)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from faas.cli import commands
from faas.cli.client import GatewayClient
from faas.cli.main import main
from faas.cli.manifest import ManifestError, load_manifest, parse_duration

Handler = Callable[[httpx.Request], httpx.Response]


def manifest_at(tmp_path: Path, text: str) -> Path:
    (tmp_path / "faas.yaml").write_text(text)
    (tmp_path / "handler.py").write_text("def handler(event, context):\n    return event\n")
    return tmp_path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest_at(tmp_path, text))
    prefix = f"{tmp_path / 'faas.yaml'}: "
    assert all(p.startswith(prefix) for p in info.value.problems)
    return [p.removeprefix(prefix) for p in info.value.problems]


class FakeGateway:
    """Records every request the commands send and answers with ``handler``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, handler: Handler) -> None:
        self.requests: list[httpx.Request] = []
        self.handler = handler

        def client(url: str, namespace: str | None, **options: object) -> GatewayClient:
            return GatewayClient(url, namespace, transport=httpx.MockTransport(self._answer))

        monkeypatch.setattr(commands, "GatewayClient", client)

    def _answer(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return self.handler(request)

    @property
    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.path) for r in self.requests]

    def json_of(self, index: int) -> object:
        return json.loads(self.requests[index].content)


def error(status: int, kind: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"kind": kind, "type": "X", "message": message}})


def echo_subscription(request: httpx.Request, status: int = 201) -> httpx.Response:
    """What the gateway answers to PUT .../subscriptions/{sub}: the stored subscription."""
    _, _, function, _, name = request.url.path.removeprefix("/").split("/")
    stored = {**json.loads(request.content), "namespace": "default", "function": function, "name": name}
    return httpx.Response(status, json={"origin": "api", "created_at": 1.0, **stored})


# -- faas.yaml: events ------------------------------------------------------------------------------

FULL_EVENTS = """\
name: hello
events:
  - timer: rate(5 minutes)
  - name: uploads
    object_store: {bucket: photos, prefix: in/, events: "ObjectCreated:*"}
    qualifier: 3
  - queue: {stream: orders, batch_size: 20, batch_window: 500ms, start: earliest}
    enabled: false
  - cloudevents:
  - timer: {schedule: "cron(0 0 3 * * *)", payload: {kind: nightly}}
  - object_store: {bucket: logs, suffix: .gz}
"""


def test_manifest_events_become_the_declared_subscriptions(tmp_path: Path) -> None:
    from faas.cli.events import declared_bodies

    events = load_manifest(manifest_at(tmp_path, FULL_EVENTS)).events
    assert events is not None
    assert declared_bodies(events) == [
        {"name": "timer-1", "timer": {"schedule": "rate(5 minutes)"}, "enabled": True},
        {
            "name": "uploads",
            "object_store": {
                "bucket": "photos",
                "prefix": "in/",
                "suffix": "",
                "events": ["ObjectCreated:*"],
            },
            "qualifier": "3",
            "enabled": True,
        },
        {
            "name": "queue-1",
            "queue": {"stream": "orders", "batch_size": 20, "batch_window_s": 0.5, "start": "earliest"},
            "enabled": False,
        },
        {"name": "cloudevents-1", "cloudevents": {}, "enabled": True},
        {
            "name": "timer-2",
            "timer": {"schedule": "cron(0 0 3 * * *)", "payload": {"kind": "nightly"}},
            "enabled": True,
        },
        # Default names count the items of one kind, named or not: renaming 'uploads' renames nothing.
        {
            "name": "object-store-2",
            "object_store": {"bucket": "logs", "prefix": "", "suffix": ".gz", "events": ["ObjectCreated:*"]},
            "enabled": True,
        },
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: hello\n", None),  # no key: deploy leaves the function's subscriptions alone
        ("name: hello\nevents: []\n", ()),  # an explicit empty list removes the declared ones
        ("name: hello\nevents:\n", ()),  # a key with no value means empty, as for 'environment:'
    ],
)
def test_manifest_without_events_is_told_apart_from_empty_events(
    tmp_path: Path, text: str, expected: tuple[()] | None
) -> None:
    assert load_manifest(manifest_at(tmp_path, text)).events == expected


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("2s", 2.0), ("2", 2.0), (2, 2.0), (1.5, 1.5), ("500ms", 0.5), ("1m", 60.0), (" 0.25s ", 0.25)],
)
def test_batch_window_accepts_seconds_and_units(tmp_path: Path, value: object, seconds: float) -> None:
    written = json.dumps(value)
    events = load_manifest(
        manifest_at(tmp_path, f"name: hello\nevents:\n  - queue: {{stream: s, batch_window: {written}}}\n")
    ).events
    assert events is not None and events[0].queue is not None
    assert events[0].queue.batch_window_s == seconds
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("events", "problem"),
    [
        (
            "  - timer: rate(1 minute)\n  - queue: {stream: orders, batch_size: 5000}\n",
            "field 'events[1].queue.batch_size': must be <= 1000 (got 5000)",
        ),
        (
            "  - queue: {stream: orders, batch_window: soon}\n",
            "field 'events[0].queue.batch_window': must be a duration like 2s, 500ms, 1m or 6h (got 'soon')",
        ),
        (
            "  - queue: {stream: orders, batch_window: 10m}\n",
            "field 'events[0].queue.batch_window': must be <= 300 (got 600.0)",
        ),
        (
            "  - queue: {stream: orders, batch_size: true}\n",
            "field 'events[0].queue.batch_size': must be a whole",
        ),
        ("  - queue: {stream: 'faas:x'}\n", "field 'events[0].queue.stream': stream name 'faas:x' uses"),
        ("  - queue:\n", "field 'events[0].queue': must be a mapping with 'stream' (got null)"),
        (
            "  - queue: {stream: o, batchsize: 5}\n",
            "field 'events[0].queue': unknown field 'batchsize' (did you mean 'batch_size'?)",
        ),
        ("  - timer: every day\n", "field 'events[0].timer': invalid cron expression \"every day\""),
        ("  - timer: {schedule: 'cron(bad)'}\n", "field 'events[0].timer.schedule': invalid cron expression"),
        ("  - object_store: {bucket: B}\n", "field 'events[0].object_store.bucket': invalid bucket name 'B'"),
        (
            "  - object_store: {bucket: ok-b, events: []}\n",
            "field 'events[0].object_store.events': must not be",
        ),
        (
            "  - object_store: {bucket: ok-b, events: [Created]}\n",
            "field 'events[0].object_store.events': unknown object event 'Created'",
        ),
        ("  - cloudevents: {type: ''}\n", "field 'events[0].cloudevents.type': must not be empty (got '')"),
        (
            "  - bucket: photos\n",
            "field 'events[0]': unknown field 'bucket' (it belongs under 'object_store')",
        ),
        ("  - {name: x}\n", "field 'events[0]': needs exactly one source of object_store, queue, timer"),
        (
            "  - {timer: rate(1 minute), cloudevents: {}}\n",
            "field 'events[0]': needs exactly one source of object_store, queue, timer, cloudevents "
            "(got timer, cloudevents; give each its own item)",
        ),
        ("  - cloudevents: {}\n    name: Bad_Name\n", "field 'events[0].name': invalid subscription name"),
        ("  - cloudevents: {}\n    enabled: maybe\n", "field 'events[0].enabled': must be true or false"),
        (
            "  - cloudevents: {}\n    qualifier: [1]\n",
            "field 'events[0].qualifier': must be a version number",
        ),
        ("  - rate(1 minute)\n", "field 'events[0]': must be a mapping with one of object_store"),
        (
            "  - timer: rate(1 minute)\n  - name: timer-1\n    cloudevents: {}\n",
            "field 'events[1].name': the name 'timer-1' is already used by events[0]",
        ),
        (
            "  - name: timer-2\n    cloudevents: {}\n  - timer: rate(1 minute)\n  - timer: rate(2 minutes)\n",
            "field 'events[2].name': the default name 'timer-2' (give one of them a 'name') "
            "is already used by events[0]",
        ),
    ],
)
def test_manifest_event_errors_point_at_the_item_and_field(tmp_path: Path, events: str, problem: str) -> None:
    problems = problems_of(tmp_path, "name: hello\nevents:\n" + events)
    assert any(p.startswith(problem) for p in problems), problems


def test_manifest_events_must_be_a_list(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "name: hello\nevents: {timer: rate(1 minute)}\n") == [
        "field 'events': must be a list of event sources (got a mapping)"
    ]


def test_manifest_reports_every_event_problem_at_once(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path, "name: hello\nmemory: 1\nevents:\n  - timer: nope\n  - queue: {stream: s, batch_size: 0}\n"
    )
    assert [p.split(":")[0] for p in problems] == [
        "field 'events[0].timer'",
        "field 'events[1].queue.batch_size'",
        "field 'memory'",
    ]


# -- faas.yaml: destinations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "destination"),
    [
        ("function:audit", {"function": "audit", "stream": None}),
        ("function:audit:prod", {"function": "audit:prod", "stream": None}),
        ("stream:hello-failures", {"function": None, "stream": "hello-failures"}),
        ("stream:a:b", {"function": None, "stream": "a:b"}),
        ("{function: 'audit:2'}", {"function": "audit:2", "stream": None}),
        ("{stream: results}", {"function": None, "stream": "results"}),
    ],
)
def test_destinations_in_both_forms_reach_the_version_config(
    tmp_path: Path, written: str, destination: dict[str, str | None]
) -> None:
    manifest = load_manifest(
        manifest_at(tmp_path, f"name: hello\non_success: {written}\non_failure: {written}\n")
    )
    config = manifest.config.model_dump(mode="json")
    assert config["on_success"] == destination
    assert config["on_failure"] == destination


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        ("audit", "field 'on_failure': must be 'function:NAME[:QUALIFIER]', 'stream:NAME' or a mapping"),
        ("'function:'", "field 'on_failure': must be 'function:NAME[:QUALIFIER]'"),
        ("{fn: audit}", "field 'on_failure': unknown field 'fn' (known fields: function, stream)"),
        ("{function: a, stream: b}", "field 'on_failure': a destination names exactly one of"),
        ("function:Audit", "field 'on_failure': invalid destination function name 'Audit'"),
        ("'function:audit:'", "field 'on_failure': destination 'audit:': the qualifier after ':' is empty"),
        ("stream:faas:x", "field 'on_failure': stream name 'faas:x' uses the platform's reserved prefix"),
        ("[stream]", "field 'on_failure': must be a mapping with 'function' or 'stream' (got a list)"),
    ],
)
def test_destination_errors(tmp_path: Path, written: str, problem: str) -> None:
    problems = problems_of(tmp_path, f"name: hello\non_failure: {written}\n")
    assert any(p.startswith(problem) for p in problems), problems


def test_init_template_examples_are_valid_when_uncommented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init", "hello"]) == 0
    template = (tmp_path / "hello" / "faas.yaml").read_text()
    # Uncomment the YAML (not the prose) from the destinations on, as a user would.
    lines = template.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# on_success:"))
    yaml_line = re.compile(r"^# ( *- |[a-z_]+:| +[a-z_]+:)")
    uncommented = [
        line.removeprefix("# ") if i >= start and yaml_line.match(line) else line
        for i, line in enumerate(lines)
    ]
    assert sum(line != original for line, original in zip(uncommented, lines, strict=True)) == 9
    manifest = load_manifest(manifest_at(tmp_path / "hello", "\n".join(uncommented) + "\n"))
    assert manifest.config.on_success is not None and manifest.config.on_success.function == "audit"
    assert manifest.config.on_failure is not None and manifest.config.on_failure.stream == "hello-failures"
    assert manifest.events is not None
    assert [(e.name, e.kind) for e in manifest.events] == [
        ("timer-1", "timer"),
        ("uploads", "object_store"),
        ("queue-1", "queue"),
        ("cloudevents-1", "cloudevents"),
    ]


# -- faas events add: flags and the request ---------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "body"),
    [
        (
            ["--timer", "rate(5 minutes)", "--payload", '{"report": "daily"}'],
            {"timer": {"schedule": "rate(5 minutes)", "payload": {"report": "daily"}}, "enabled": True},
        ),
        (
            [
                "--bucket",
                "photos",
                "--prefix",
                "in/",
                "--event",
                "ObjectCreated:*",
                "--event",
                "ObjectRemoved:*",
            ],
            {
                "object_store": {
                    "bucket": "photos",
                    "prefix": "in/",
                    "suffix": "",
                    "events": ["ObjectCreated:*", "ObjectRemoved:*"],
                },
                "enabled": True,
            },
        ),
        (
            ["--bucket", "photos"],
            {
                "object_store": {
                    "bucket": "photos",
                    "prefix": "",
                    "suffix": "",
                    "events": ["ObjectCreated:*"],
                },
                "enabled": True,
            },
        ),
        (
            [
                "--stream",
                "orders",
                "--batch-size",
                "50",
                "--batch-window",
                "2s",
                "--start",
                "earliest",
                "-q",
                "prod",
            ],
            {
                "queue": {"stream": "orders", "batch_size": 50, "batch_window_s": 2.0, "start": "earliest"},
                "qualifier": "prod",
                "enabled": True,
            },
        ),
        (["--cloudevents", "--disabled"], {"cloudevents": {}, "enabled": False}),
        (
            ["--cloudevents", "--type", "com.example.order", "--source", "/shop"],
            {"cloudevents": {"type": "com.example.order", "source": "/shop"}, "enabled": True},
        ),
    ],
)
def test_events_add_sends_the_subscription_the_flags_describe(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    body: dict[str, object],
) -> None:
    gw = FakeGateway(monkeypatch, echo_subscription)
    assert main(["-n", "dev", "events", "add", "hello", "sub-1", *flags]) == 0
    assert gw.calls == [("PUT", "/v1/functions/hello/subscriptions/sub-1")]
    assert dict(gw.requests[0].url.params) == {"namespace": "dev"}
    assert gw.json_of(0) == body
    assert capsys.readouterr().out.startswith("added event subscription 'sub-1' of hello")


def test_events_add_says_added_or_replaced_and_shows_the_source(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    FakeGateway(monkeypatch, lambda request: echo_subscription(request, status=200))
    args = [
        "events",
        "add",
        "hello",
        "orders",
        "--stream",
        "orders",
        "--batch-size",
        "10",
        "--batch-window",
        "1",
    ]
    assert main([*args, "-q", "3"]) == 0
    assert capsys.readouterr().out == (
        "replaced event subscription 'orders' of hello (version 3): queue stream=orders batch=10/1s\n"
    )
    assert main([*args, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["queue"]["stream"] == "orders"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "error: give an event source: --timer, --bucket, --stream or --cloudevents"),
        (
            ["--timer", "rate(1 minute)", "--bucket", "photos"],
            "error: --timer and --bucket are different event sources: a subscription has exactly one",
        ),
        (
            ["--timer", "rate(1 minute)", "--prefix", "in/", "--batch-size", "3"],
            "error: --prefix, --batch-size cannot be used with --timer (they belong to another event source)",
        ),
        (["--cloudevents", "--payload", "{}"], "error: --payload cannot be used with --cloudevents"),
        (["--timer", "every day"], "error: --timer: invalid cron expression"),
        (["--timer", "rate(1 minute)", "--payload", "{x"], "error: --payload is not valid JSON"),
        (["--bucket", "B"], "error: --bucket: invalid bucket name 'B'"),
        (["--bucket", "photos", "--event", "Created"], "error: --event: unknown object event 'Created'"),
        (["--stream", "orders", "--batch-size", "0"], "error: --batch-size: must be >= 1 (got 0)"),
        (["--stream", "orders", "--batch-window", "soon"], "error: --batch-window: must be a duration like"),
        (["--stream", "faas:jobs"], "error: --stream: stream name 'faas:jobs' uses the platform's reserved"),
        (["--cloudevents", "--type", ""], "error: --type: must not be empty"),
    ],
)
def test_events_add_flag_errors_exit_2_before_any_request(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    gw = FakeGateway(monkeypatch, echo_subscription)
    assert main(["events", "add", "hello", "sub-1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert "Traceback" not in err
    assert gw.calls == []


def test_events_add_rejects_a_bad_subscription_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = FakeGateway(monkeypatch, echo_subscription)
    assert main(["events", "add", "hello", "Nightly", "--timer", "rate(1 day)"]) == 2
    assert "invalid subscription name 'Nightly'" in capsys.readouterr().err
    assert gw.calls == []


def test_events_add_gateway_error_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    FakeGateway(
        monkeypatch, lambda request: error(404, "not_found", "alias 'prod' of function 'hello' not found")
    )
    assert main(["events", "add", "hello", "t", "--timer", "rate(1 minute)", "-q", "prod"]) == 1
    assert capsys.readouterr() == ("", "error: alias 'prod' of function 'hello' not found\n")


# -- faas events ls / rm ----------------------------------------------------------------------------

STORED = [
    {
        "namespace": "default", "function": "thumbs", "name": "uploads", "origin": "manifest", "enabled": True,
        "object_store": {"bucket": "photos", "prefix": "in/", "suffix": "", "events": ["ObjectCreated:*"]},
    },
    {
        "namespace": "default", "function": "billing", "name": "orders", "origin": "api", "enabled": False,
        "queue": {"stream": "orders", "batch_size": 10, "batch_window_s": 1.0, "start": "latest"},
        "qualifier": "prod",
    },
    {
        "namespace": "default", "function": "billing", "name": "nightly", "origin": "api", "enabled": True,
        "timer": {"schedule": "cron(0 0 3 * * *)", "payload": None},
    },
    {
        "namespace": "default", "function": "thumbs", "name": "ce", "origin": "api", "enabled": True,
        "cloudevents": {"type": "com.example.photo", "source": None}, "future_field": 1,
    },
]  # fmt: skip


def test_events_ls_shows_one_row_per_subscription(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = FakeGateway(monkeypatch, lambda request: httpx.Response(200, json={"subscriptions": STORED}))
    assert main(["events", "ls"]) == 0
    assert gw.calls == [("GET", "/v1/subscriptions")]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["FUNCTION", "NAME", "SOURCE", "DETAILS", "QUALIFIER", "ORIGIN", "ENABLED"]
    rows = [line.split("   ") for line in lines[1:]]
    assert [[cell.strip() for cell in row if cell.strip()] for row in rows] == [
        ["billing", "nightly", "timer", "cron(0 0 3 * * *)", "latest", "api", "yes"],
        ["billing", "orders", "queue", "stream=orders batch=10/1s", "prod", "api", "no"],
        ["thumbs", "ce", "cloudevents", "type=com.example.photo", "latest", "api", "yes"],
        ["thumbs", "uploads", "object_store", "bucket=photos prefix=in/", "latest", "manifest", "yes"],
    ]


def test_events_ls_of_one_function_and_as_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = FakeGateway(monkeypatch, lambda request: httpx.Response(200, json={"subscriptions": STORED[:1]}))
    assert main(["events", "ls", "thumbs", "-o", "json", "-n", "dev"]) == 0
    assert gw.calls == [("GET", "/v1/functions/thumbs/subscriptions")]
    assert dict(gw.requests[0].url.params) == {"namespace": "dev"}
    assert json.loads(capsys.readouterr().out) == STORED[:1]


def test_events_ls_of_a_missing_function_or_of_none(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    FakeGateway(monkeypatch, lambda request: error(404, "not_found", "no such function"))
    assert main(["events", "ls", "ghost"]) == 1
    assert capsys.readouterr().err == "error: function 'ghost' not found\n"

    FakeGateway(monkeypatch, lambda request: httpx.Response(200, json={"subscriptions": []}))
    assert main(["events", "ls"]) == 0
    assert capsys.readouterr() == ("", "no event subscriptions in your key's namespace\n")


def test_events_rm_deletes_and_reports_a_missing_subscription(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = FakeGateway(monkeypatch, lambda request: httpx.Response(204))
    assert main(["events", "rm", "hello", "nightly"]) == 0
    assert gw.calls == [("DELETE", "/v1/functions/hello/subscriptions/nightly")]
    assert capsys.readouterr().out == "removed event subscription 'nightly' of hello\n"

    message = "subscription 'nightly' of function 'hello' not found"
    FakeGateway(monkeypatch, lambda request: error(404, "not_found", message))
    assert main(["events", "rm", "hello", "nightly"]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"


# -- faas deploy with events and destinations -------------------------------------------------------

DEPLOYED = {"name": "hello", "latest_version": 4, "config": {"version": 4}, "url": "http://gw/fn/hello/"}


def deploy_gateway(
    monkeypatch: pytest.MonkeyPatch,
    *,
    existing: list[dict[str, object]] | None = None,
    apply: Handler | None = None,
) -> FakeGateway:
    """A gateway where the function exists with ``existing`` subscriptions (None: it does not exist)."""

    def handler(request: httpx.Request) -> httpx.Response:
        if (request.method, request.url.path) == ("GET", "/v1/functions/hello/subscriptions"):
            if existing is None:
                return error(404, "not_found", "function 'hello' not found")
            return httpx.Response(200, json={"subscriptions": existing})
        if (request.method, request.url.path) == ("PUT", "/v1/functions/hello"):
            return httpx.Response(201, json=DEPLOYED)
        if (request.method, request.url.path) == ("PUT", "/v1/functions/hello/subscriptions"):
            if apply is not None:
                return apply(request)
            declared = json.loads(request.content)["subscriptions"]
            stored = [{**s, "function": "hello", "origin": "manifest"} for s in declared]
            return httpx.Response(200, json={"subscriptions": stored})
        raise AssertionError(f"unexpected request {request.method} {request.url.path}")

    return FakeGateway(monkeypatch, handler)


def test_deploy_applies_the_declared_events_after_the_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = manifest_at(
        tmp_path,
        "name: hello\non_failure: stream:hello-failures\nevents:\n"
        "  - timer: rate(5 minutes)\n  - name: uploads\n    object_store: {bucket: photos, prefix: in/}\n",
    )
    existing = [{"name": "manual", "origin": "api", "cloudevents": {}}]
    gw = deploy_gateway(monkeypatch, existing=existing)
    assert main(["--url", "http://gw", "deploy", str(root)]) == 0
    assert gw.calls == [
        ("GET", "/v1/functions/hello/subscriptions"),
        ("PUT", "/v1/functions/hello"),
        ("PUT", "/v1/functions/hello/subscriptions"),
    ]
    assert b'"on_failure": {"function": null, "stream": "hello-failures"}' in gw.requests[1].content
    assert gw.json_of(2) == {
        "subscriptions": [
            {"name": "timer-1", "timer": {"schedule": "rate(5 minutes)"}, "enabled": True},
            {
                "name": "uploads",
                "object_store": {
                    "bucket": "photos",
                    "prefix": "in/",
                    "suffix": "",
                    "events": ["ObjectCreated:*"],
                },
                "enabled": True,
            },
        ]
    }
    assert capsys.readouterr().out.splitlines() == [
        "deployed hello version 4",
        "url: http://gw/fn/hello/",
        "events (from faas.yaml):",
        "  timer-1: timer rate(5 minutes)",
        "  uploads: object_store bucket=photos prefix=in/",
        "invoke: faas invoke hello -d '{}'",
    ]


def test_deploy_json_output_includes_the_applied_subscriptions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = manifest_at(tmp_path, "name: hello\nevents:\n  - cloudevents: {type: a.b}\n")
    deploy_gateway(monkeypatch)  # a new function: the name check finds nothing to clash with
    assert main(["deploy", str(root), "-o", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["latest_version"] == 4
    assert [s["name"] for s in shown["subscriptions"]] == ["cloudevents-1"]


def test_deploy_without_an_events_key_leaves_subscriptions_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = deploy_gateway(monkeypatch, existing=[])
    assert main(["deploy", str(manifest_at(tmp_path, "name: hello\n"))]) == 0
    assert gw.calls == [("PUT", "/v1/functions/hello")]
    assert "events" not in capsys.readouterr().out


def test_deploy_with_empty_events_removes_the_declared_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = deploy_gateway(monkeypatch, existing=[])
    assert main(["deploy", str(manifest_at(tmp_path, "name: hello\nevents: []\n"))]) == 0
    assert gw.calls == [("PUT", "/v1/functions/hello"), ("PUT", "/v1/functions/hello/subscriptions")]
    assert gw.json_of(1) == {"subscriptions": []}
    assert "events: none declared in faas.yaml (any declared before were removed)" in capsys.readouterr().out


def test_deploy_refuses_before_uploading_when_a_declared_name_was_added_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = manifest_at(tmp_path, "name: hello\nevents:\n  - name: nightly\n    timer: rate(1 day)\n")
    gw = deploy_gateway(
        monkeypatch, existing=[{"name": "nightly", "origin": "api", "timer": {"schedule": "x"}}]
    )
    assert main(["-n", "dev", "deploy", str(root)]) == 1
    assert gw.calls == [("GET", "/v1/functions/hello/subscriptions")]
    assert capsys.readouterr().err == (
        "error: faas.yaml declares event subscription 'nightly' of hello, which was added with "
        "'faas events add': rename it in faas.yaml, or remove the other with "
        "'faas events rm hello nightly -n dev'\n"
    )


def test_deploy_says_the_version_is_live_when_its_events_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = manifest_at(tmp_path, "name: hello\nevents:\n  - timer: rate(1 day)\n    qualifier: prod\n")
    refuse = lambda request: error(404, "not_found", "alias 'prod' of 'hello' not found")  # noqa: E731
    deploy_gateway(monkeypatch, existing=[], apply=refuse)
    assert main(["deploy", str(root)]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("deployed hello version 4\n")
    assert err.splitlines()[-1] + "\n" == (
        "error: hello version 4 is deployed, but the events in faas.yaml were not applied: "
        "alias 'prod' of 'hello' not found\n"
    )


def test_deploy_with_invalid_events_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = deploy_gateway(monkeypatch, existing=[])
    root = manifest_at(tmp_path, "name: hello\nevents:\n  - queue: {stream: orders, batch_size: 0}\n")
    assert main(["deploy", str(root)]) == 2
    assert gw.calls == []
    assert "field 'events[0].queue.batch_size': must be >= 1 (got 0)" in capsys.readouterr().err
