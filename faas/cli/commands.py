"""The function commands of ``faas``: init, deploy, invoke, ls, get, versions, logs, rm, events.

Each command is ``cmd_x(args) -> int`` (the exit status) and registers itself in ``add_parsers``.
Results go to stdout, progress and errors to stderr.  Commands raise ``FaasError``s and leave their
printing to ``faas.cli.main``, except ``invoke``, which prints a function's error itself as
``error: <kind>: <type>: <message>``.  A ``UsageError`` (bad arguments, bad -d JSON) exits 2; errors
from the platform or the function exit 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from faas.core.errors import Conflict, FaasError, NotFound
from faas.core.models import name_problem

from .archive import build_archive
from .client import GatewayClient, GatewayError, error_from_response
from .credentials import find_api_key, save_api_key
from .errors import UsageError
from .events import (
    SUBSCRIPTION_HEADERS,
    add_source_options,
    added_by_hand,
    declared_bodies,
    describe,
    request_body,
    source_kind,
    spec_from_flags,
    subscription_rows,
)
from .manifest import MANIFEST_FILE, Manifest, load_manifest

DEFAULT_NAMESPACE = "default"
DEFAULT_LOG_LIMIT = 50
INVOKE_HEADERS = (
    ("request-id", "X-Faas-Request-Id"),
    ("version", "X-Faas-Version"),
    ("instance", "X-Faas-Instance"),
    ("cold", "X-Faas-Cold"),
    ("duration-ms", "X-Faas-Duration-Ms"),
)


def add_parsers(subparsers: Any, *, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Register the function commands; ``parents`` carry the options every command accepts."""
    parents = list(parents)

    p = subparsers.add_parser("init", parents=parents, help="create a function project folder")
    p.add_argument("name", help="the function's name")
    p.add_argument("--dir", help="the folder to create (default: ./NAME)")
    p.set_defaults(func=cmd_init)

    p = subparsers.add_parser(
        "deploy", parents=parents, help="package a project and deploy it as a new version"
    )
    p.add_argument(
        "dir", nargs="?", default=".", help=f"the project folder holding {MANIFEST_FILE} (default: .)"
    )
    _output_option(p)
    p.set_defaults(func=cmd_deploy)

    p = subparsers.add_parser(
        "invoke",
        parents=parents,
        help="invoke a function and print its result",
        description="The event is -d JSON, else stdin when it is not a terminal, else {}.",
    )
    p.add_argument("name")
    p.add_argument("-d", "--data", help="the event as JSON, or @FILE to read it from a file")
    p.add_argument("-q", "--qualifier", help="a version number or an alias (default: latest)")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print the request id, version, instance, cold start and duration on stderr",
    )
    p.add_argument(
        "--async",
        dest="asynchronous",
        action="store_true",
        help="queue the event durably and print its invocation id instead of waiting for the result",
    )
    p.set_defaults(func=cmd_invoke)

    p.add_argument(
        "--idempotency-key", help="with --async: the same key within an hour queues the event once"
    )

    p = subparsers.add_parser("dlq", parents=parents, help="dead-lettered async events: ls, redrive")
    dlq = p.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    q = dlq.add_parser("ls", parents=parents, help="list dead-lettered events with their last error")
    q.add_argument("--function", help="only this function's")
    _output_option(q)
    q.set_defaults(func=cmd_dlq_ls)
    q = dlq.add_parser("redrive", parents=parents, help="queue a dead-lettered event again")
    q.add_argument("dead_letter_id", help="the id 'faas dlq ls' shows")
    q.set_defaults(func=cmd_dlq_redrive)

    p = subparsers.add_parser("login", parents=parents, help="check an API key and keep it for the gateway URL")
    p.add_argument("--key", help="the key (default: read from standard input)")
    p.set_defaults(func=cmd_login)
    p = subparsers.add_parser("whoami", parents=parents, help="show the API key's namespace and role")
    _output_option(p)
    p.set_defaults(func=cmd_whoami)

    p = subparsers.add_parser("keys", parents=parents, help="API keys (admin): create, ls, revoke")
    keys = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    q = keys.add_parser("create", parents=parents, help="create a key; its text is printed once")
    q.add_argument("--role", required=True, choices=("admin", "developer", "invoker"))
    q.add_argument("--function", action="append", default=[], dest="functions",
                   help="an invoker key may call only these functions (repeat; default: all of the namespace)")  # fmt: skip
    q.add_argument("--description", default="")
    _output_option(q)
    q.set_defaults(func=cmd_keys_create)
    q = keys.add_parser("ls", parents=parents, help="list the keys (never their secrets)")
    _output_option(q)
    q.set_defaults(func=cmd_keys_ls)
    q = keys.add_parser("revoke", parents=parents, help="revoke a key by its id")
    q.add_argument("key_id")
    q.set_defaults(func=cmd_keys_revoke)

    p = subparsers.add_parser(
        "invocation", parents=parents, help="show an async invocation's status and result"
    )
    p.add_argument("id", help="the id 'faas invoke --async' printed")
    p.set_defaults(func=cmd_invocation)

    p = subparsers.add_parser("ls", parents=parents, help="list the functions of the namespace")
    _output_option(p)
    p.set_defaults(func=cmd_ls)

    p = subparsers.add_parser("get", parents=parents, help="show a function and its latest version")
    p.add_argument("name")
    _output_option(p)
    p.set_defaults(func=cmd_get)

    p = subparsers.add_parser("versions", parents=parents, help="list a function's versions")
    p.add_argument("name")
    _output_option(p)
    p.set_defaults(func=cmd_versions)

    p = subparsers.add_parser(
        "alias", parents=parents, help="a function's aliases: set (to a version, or split two), ls, rm"
    )
    alias = p.add_subparsers(dest="alias_command", metavar="ACTION", required=True)
    q = alias.add_parser(
        "set",
        parents=parents,
        help="point an alias at a version, or split its calls between two versions",
        description="faas alias set NAME prod 2 --weight 3=10: 90%% of prod's calls go to version 2, "
        "10%% to version 3. Without --weight, all of them go to VERSION.",
    )
    q.add_argument("name")
    q.add_argument("alias")
    q.add_argument("version", type=_positive_int)
    q.add_argument(
        "--weight",
        action="append",
        default=[],
        metavar="V=PCT",
        help="send PCT percent of the calls to version V (the rest go to VERSION); once",
    )
    _output_option(q)
    q.set_defaults(func=cmd_alias_set)
    q = alias.add_parser("ls", parents=parents, help="list a function's aliases")
    q.add_argument("name")
    _output_option(q)
    q.set_defaults(func=cmd_alias_ls)
    q = alias.add_parser("rm", parents=parents, help="delete an alias ('latest' cannot be)")
    q.add_argument("name")
    q.add_argument("alias")
    q.set_defaults(func=cmd_alias_rm)

    p = subparsers.add_parser(
        "rollback", parents=parents, help="point an alias (default: latest) back at its previous version"
    )
    p.add_argument("name")
    p.add_argument("--alias", default="latest", help="the alias to move back (default: latest)")
    _output_option(p)
    p.set_defaults(func=cmd_rollback)

    p = subparsers.add_parser("logs", parents=parents, help="print a function's recent invocation logs")
    p.add_argument("name")
    p.add_argument(
        "--limit",
        type=_positive_int,
        default=DEFAULT_LOG_LIMIT,
        help=f"at most this many records (default: {DEFAULT_LOG_LIMIT})",
    )
    _output_option(p)
    p.set_defaults(func=cmd_logs)

    p = subparsers.add_parser("rm", parents=parents, help="delete a function and all its versions")
    p.add_argument("name")
    p.set_defaults(func=cmd_rm)

    p = subparsers.add_parser(
        "events", parents=parents, help="event sources that invoke a function: ls, add, rm"
    )
    events = p.add_subparsers(dest="events_command", metavar="ACTION", required=True)
    q = events.add_parser(
        "ls", parents=parents, help="list the event subscriptions of a function, or of the namespace"
    )
    q.add_argument("name", nargs="?", metavar="FUNCTION", help="only this function's")
    _output_option(q)
    q.set_defaults(func=cmd_events_ls)
    q = events.add_parser(
        "add",
        parents=parents,
        help="subscribe a function to an event source (replacing a subscription of the same name)",
        description="Give exactly one source: --timer, --bucket, --stream or --cloudevents.",
    )
    q.add_argument("name", metavar="FUNCTION")
    q.add_argument("subscription", metavar="NAME", help="the subscription's name, unique per function")
    add_source_options(q)
    _output_option(q)
    q.set_defaults(func=cmd_events_add)
    q = events.add_parser("rm", parents=parents, help="remove an event subscription")
    q.add_argument("name", metavar="FUNCTION")
    q.add_argument("subscription", metavar="NAME")
    q.set_defaults(func=cmd_events_rm)


# -- init -------------------------------------------------------------------------------------------

MANIFEST_TEMPLATE = """\
# faas.yaml: how the platform runs this function ('faas deploy' reads it).

# The function's name: lowercase letters, digits and '-', starting with a letter.
name: {name}
# The Python version the function runs on.
runtime: python3.11
# module.function called for each event: here handler() in handler.py.
handler: handler.handler
# Memory per instance, in MB (64 to 10240).
memory: 256
# Seconds one invocation may run (at most 900).
timeout: 30
# Invocations one instance serves at the same time.
concurrency: 1
# Instances kept running even when idle (0: start on the first event, stop when idle).
min_instances: 0
# The most instances running at once.
max_instances: 10
# Async invocations: retries after a failed attempt (0-10), and the oldest an event may get (seconds).
max_retries: 2
max_event_age: 21600
# Environment variables the function sees, e.g. {{GREETING: hello}}.
environment: {{}}
# description: what this function does
# The HTTP trigger (/fn/NAME/...) answers callers without an API key (web hooks, browsers):
# public: true
# Package only these files (default: everything in the folder):
# include: ["*.py", "data/*"]
# Never package these (.git, .venv, __pycache__ and *.pyc never are):
# exclude: ["tests", "*.md"]
# Async invocations: where a record of the outcome goes, another function or a Redis stream.
# on_success: function:audit        # or {{function: "audit:prod"}}
# on_failure: stream:hello-failures  # or {{stream: hello-failures}}
# Event sources that invoke this function ('faas deploy' makes these exactly the declared ones;
# without an 'events' key it leaves them alone). Each has one source; 'name' defaults to <kind>-<n>.
# events:
#   - timer: rate(5 minutes)                      # or cron(SEC MIN HOUR DOM MON DOW), in UTC
#   - name: uploads
#     object_store: {{bucket: photos, prefix: in/, suffix: .jpg}}  # events: [ObjectCreated:*]
#   - queue: {{stream: orders, batch_size: 10, batch_window: 2s, start: latest}}
#     # qualifier: prod                          # a version or alias (default: latest)
#   - cloudevents: {{type: com.example.order.created, source: /shop}}
#     enabled: false
"""

HANDLER_TEMPLATE = '''\
"""The function: the platform calls handler(event, context) once per invocation.

event is the invocation's JSON payload (for 'faas invoke NAME -d JSON', that JSON; for an HTTP call to
/fn/NAME/, an API-gateway style request).  Return anything JSON can encode.  What the function prints
shows up in 'faas logs NAME'.
"""


def handler(event, context):
    name = event.get("name", "world") if isinstance(event, dict) else "world"
    print(f"greeting {name}")
    return {"message": f"Hello, {name}!"}
'''

REQUIREMENTS_TEMPLATE = """\
# Packages this function needs, one per line in pip's format (for example: requests>=2.31).
# 'faas deploy' installs them into the function's archive.
"""


def cmd_init(args: argparse.Namespace) -> int:
    name: str = args.name
    if problem := name_problem(name):
        raise UsageError(problem)
    target = Path(args.dir) if args.dir else Path(name)
    if target.exists() and not target.is_dir():
        raise Conflict(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        raise Conflict(f"folder {target} already exists and is not empty: not overwriting it")
    files = {
        MANIFEST_FILE: MANIFEST_TEMPLATE.format(name=name),
        "handler.py": HANDLER_TEMPLATE,
        "requirements.txt": REQUIREMENTS_TEMPLATE,
    }
    try:
        target.mkdir(parents=True, exist_ok=True)
        for filename, text in files.items():
            (target / filename).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise FaasError(f"cannot create {exc.filename or target}: {exc.strerror or exc}") from None
    print(f"created {target}/ with {', '.join(files)}")
    print(f'next: faas deploy {shlex.quote(str(target))} && faas invoke {name} -d \'{{"name": "world"}}\'')
    return 0


# -- deploy -----------------------------------------------------------------------------------------


def cmd_deploy(args: argparse.Namespace) -> int:
    """Upload a new version, then (when faas.yaml has an ``events`` key) make the function's declared
    subscriptions exactly those.  The two steps are separate requests: if the second fails, the
    version stays deployed and the error says so."""
    text = args.output != "json"
    with _client(args) as client:
        manifest = load_manifest(args.dir)
        if manifest.events:
            _check_declared_names(client, manifest, args)
        _progress(f"packaging {manifest.name} from {manifest.project_dir}")
        archive = build_archive(manifest.project_dir, manifest, progress=_progress)
        _progress(f"sha256 {hashlib.sha256(archive).hexdigest()[:16]}…, uploading to {client.url}")
        view = client.deploy(manifest.name, manifest.config.model_dump(mode="json"), archive)
        config = view.get("config") or {}
        version = config.get("version", view.get("latest_version", "?"))
        if text:
            print(f"deployed {manifest.name} version {version}")
            print(f"url: {_function_url(view, client, manifest.name)}")
        applied = None
        if manifest.events is not None:
            try:
                applied = client.replace_declared_subscriptions(
                    manifest.name, declared_bodies(manifest.events)
                )
            except GatewayError as exc:
                raise GatewayError(
                    f"{manifest.name} version {version} is deployed, but the events in "
                    f"{MANIFEST_FILE} were not applied: {exc.message}",
                    kind=exc.kind,
                    error_type=exc.error_type,
                    status=exc.status,
                ) from None
    if not text:
        _print_json(view if applied is None else {**view, "subscriptions": applied})
        return 0
    if applied is not None:
        _print_declared(applied)
    print(f"invoke: faas invoke {manifest.name}{_ns_flag(args)} -d '{{}}'")
    return 0


def _check_declared_names(client: GatewayClient, manifest: Manifest, args: argparse.Namespace) -> None:
    """Refuse, before uploading, a declared subscription whose name one added by hand already has:
    the gateway would reject the set after the new version was deployed."""
    try:
        existing = client.subscriptions(manifest.name)
    except GatewayError as exc:
        if exc.status == 404:  # a new function has no subscriptions
            return
        raise
    clashes = added_by_hand(existing, (event.name for event in manifest.events or ()))
    if clashes:
        names = ", ".join(repr(name) for name in clashes)
        first = clashes[0]
        raise Conflict(
            f"{MANIFEST_FILE} declares event subscription {names} of {manifest.name}, which was added "
            f"with 'faas events add': rename it in {MANIFEST_FILE}, or remove the other with "
            f"'faas events rm {manifest.name} {first}{_ns_flag(args)}'"
        )


def _print_declared(applied: list[dict[str, Any]]) -> None:
    if not applied:
        print(f"events: none declared in {MANIFEST_FILE} (any declared before were removed)")
        return
    print(f"events (from {MANIFEST_FILE}):")
    for sub in applied:
        state = "" if sub.get("enabled", True) else " (disabled)"
        print(f"  {sub.get('name', '?')}: {source_kind(sub)} {describe(sub)}{state}")


# -- invoke -----------------------------------------------------------------------------------------


def cmd_invoke(args: argparse.Namespace) -> int:
    name = _name(args)
    payload = read_payload(args.data)
    with _client(args) as client:
        status, headers, body = client.invoke(
            name,
            payload,
            qualifier=args.qualifier,
            asynchronous=getattr(args, "asynchronous", False),
            idempotency_key=getattr(args, "idempotency_key", None),
        )
    if args.verbose:
        for label, header in INVOKE_HEADERS:
            print(f"{label}: {headers.get(header, '-')}", file=sys.stderr)
    if status >= 400:
        return _report_error(status, body)
    try:
        result = json.loads(body) if body else None
    except ValueError:
        sys.stdout.write(body.decode("utf-8", "replace") + "\n")
        return 0
    _print_json(result)
    return 0


def cmd_dlq_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status, body = client.raw(
            "GET", "/v1/dead-letters", params={"function": args.function} if args.function else None
        )
    if status >= 400:
        return _report_error(status, body)
    letters = json.loads(body)["dead_letters"]
    if getattr(args, "output", "text") == "json":
        _print_json(letters)
        return 0
    rows = [
        [d["dead_letter_id"], f"{d['function']} v{d['version']}", str(d["invocation_id"]), str(d["attempts"]),
         d.get("fault") or "-", f"{(d['error'] or {}).get('type', '?')}: {(d['error'] or {}).get('message', '')}"[:80]]
        for d in letters
    ]  # fmt: skip
    print(
        format_table(["DEAD LETTER", "FUNCTION", "INVOCATION", "ATTEMPTS", "FAULT", "LAST ERROR"], rows)
        if rows
        else "no dead letters"
    )
    return 0


def cmd_dlq_redrive(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status, body = client.raw("POST", f"/v1/dead-letters/{args.dead_letter_id}/redrive")
    if status >= 400:
        return _report_error(status, body)
    _print_json(json.loads(body))
    return 0


def cmd_invocation(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status, body = client.invocation(args.id)
    if status >= 400:
        return _report_error(status, body)
    _print_json(json.loads(body))
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    key = (args.key if args.key is not None else sys.stdin.readline()).strip()
    if not key:
        raise UsageError("no API key given: pass --key KEY or write it on standard input")
    url = _url(args)
    with GatewayClient(url, api_key=key) as client:
        who = client.whoami()  # a key the gateway refuses is not saved
    path = save_api_key(url, key)
    print(f"logged in to {url} as a {who['role']} key of namespace {who['namespace']!r} (kept in {path})")
    return 0


def cmd_whoami(args: argparse.Namespace) -> int:
    with _client(args) as client:
        who = client.whoami()
    if args.output == "json":
        _print_json(who)
        return 0
    functions = ", ".join(who.get("functions") or []) or "all"
    print(f"key {who['key_id']}: {who['role']} of namespace {who['namespace']!r} (functions: {functions})")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    spec: dict[str, Any] = {"role": args.role, "functions": args.functions, "description": args.description}
    if args.namespace:
        spec["namespace"] = args.namespace
    with _client(args) as client:
        created = client.create_key(spec)
    if args.output == "json":
        _print_json(created)
        return 0
    print(created["key"])
    print(
        f"created {created['role']} key {created['id']} of namespace {created['namespace']!r}; "
        "this is the only time its text is shown",
        file=sys.stderr,
    )
    return 0


def cmd_keys_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        listed = client.list_keys()
    if args.output == "json":
        _print_json(listed)
        return 0
    rows = [
        [k["id"], k["namespace"], k["role"], ", ".join(k.get("functions") or []) or "-",
         time.strftime("%Y-%m-%d %H:%M", time.gmtime(k["created_at"])), k.get("description") or ""]
        for k in listed
    ]  # fmt: skip
    print(format_table(["ID", "NAMESPACE", "ROLE", "FUNCTIONS", "CREATED (UTC)", "DESCRIPTION"], rows) if rows else "no keys")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.revoke_key(args.key_id)
    print(f"revoked key {args.key_id}")
    return 0


def _report_error(status: int, body: bytes) -> int:
    """Print a gateway error response as ``error: kind: type: message``; the exit code for it."""
    err = error_from_response(status, body)
    print(f"error: {err.kind}: {err.error_type}: {err.message}", file=sys.stderr)
    return 1


def read_payload(data: str | None) -> bytes:
    """The invocation event: ``-d`` (JSON, or ``@FILE``), else stdin when it is not a terminal, else ``{}``."""
    if data is not None:
        source = "-d"
        text = data
        if data.startswith("@"):
            source = data[1:]
            try:
                text = Path(source).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"cannot read the event from {source}: {exc}") from None
    elif sys.stdin is not None and not sys.stdin.isatty():
        source = "stdin"
        try:
            text = sys.stdin.read()
        except OSError:
            text = ""
    else:
        return b"{}"
    if not text.strip():
        return b"{}"
    try:
        json.loads(text)
    except ValueError as exc:
        raise UsageError(f"the event from {source} is not valid JSON: {exc}") from None
    return text.encode("utf-8")


# -- ls / get / versions ----------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        functions = client.list()
    if args.output == "json":
        _print_json(functions)
        return 0
    if not functions:
        print(f"no functions in {_ns_label(args)}", file=sys.stderr)
        return 0
    rows = []
    for fn in sorted(functions, key=lambda f: str(f.get("name", ""))):
        config = fn.get("config") or {}
        rows.append(
            [
                str(fn.get("name", "?")),
                str(fn.get("latest_version", "-")),
                str(config.get("runtime", "-")),
                str(config.get("handler", "-")),
                _memory(config.get("memory_mb")),
                _seconds(config.get("timeout_s")),
                _when(fn.get("updated_at")),
            ]
        )
    print(format_table(["NAME", "VERSION", "RUNTIME", "HANDLER", "MEMORY", "TIMEOUT", "UPDATED"], rows))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    name = _name(args)
    with _client(args) as client:
        view = _named(name, args, lambda: client.get(name))
        if args.output == "json":
            _print_json(view)
            return 0
        url = _function_url(view, client, name)
    config = view.get("config") or {}
    code = config.get("code") or {}
    aliases = view.get("aliases") or {}
    env = config.get("environment") or {}
    fields = [
        ("name", view.get("name", name)),
        ("namespace", view.get("namespace", args.namespace)),
        ("version", f"{view.get('latest_version', '-')} (latest)"),
        ("aliases", ", ".join(_alias_text(k, v, view) for k, v in sorted(aliases.items())) or "(none)"),
        ("url", url),
        ("runtime", config.get("runtime", "-")),
        ("handler", config.get("handler", "-")),
        ("memory", _memory(config.get("memory_mb"))),
        ("timeout", _seconds(config.get("timeout_s"))),
        ("concurrency", config.get("concurrency", "-")),
        ("instances", f"min {config.get('min_instances', '-')}, max {config.get('max_instances', '-')}"),
        ("environment", ", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "(none)"),
        ("description", config.get("description") or "(none)"),
        (
            "code",
            f"sha256 {str(code.get('sha256', '-'))[:16]}… ({_bytes(code.get('size'))})" if code else "-",
        ),
        ("created", _when(view.get("created_at"))),
        ("updated", _when(view.get("updated_at"))),
    ]
    width = max(len(label) for label, _ in fields) + 2
    for label, value in fields:
        print(f"{label + ':':<{width}}{value}")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    name = _name(args)
    with _client(args) as client:
        versions = _named(name, args, lambda: client.versions(name))
    if args.output == "json":
        _print_json(versions)
        return 0
    rows = []
    for spec in sorted(
        versions, key=lambda v: v.get("version", 0) if isinstance(v.get("version"), int) else 0
    ):
        code = spec.get("code") or {}
        rows.append(
            [
                str(spec.get("version", "?")),
                _when(spec.get("created_at")),
                str(spec.get("handler", "-")),
                _memory(spec.get("memory_mb")),
                _seconds(spec.get("timeout_s")),
                str(code.get("sha256", "-"))[:12],
                _bytes(code.get("size")),
            ]
        )
    print(format_table(["VERSION", "CREATED", "HANDLER", "MEMORY", "TIMEOUT", "SHA256", "SIZE"], rows))
    return 0


# -- aliases ----------------------------------------------------------------------------------------


def alias_weights(version: int, weights: Sequence[str]) -> dict[str, int] | None:
    """The ``weights`` of an alias's body from ``--weight V=PCT`` flags (VERSION gets the rest), or
    None when there are none; ``UsageError`` for a malformed flag."""
    if not weights:
        return None
    out: dict[int, int] = {}
    for flag in weights:
        left, sep, right = flag.partition("=")
        if not sep or not left.strip().isdigit() or not right.strip().removesuffix("%").isdigit():
            raise UsageError(f"--weight {flag!r}: expected V=PCT, a version number and a percent, e.g. 3=10")
        other, pct = int(left), int(right.strip().removesuffix("%"))
        if other in out:
            raise UsageError(f"--weight: version {other} is given twice")
        out[other] = pct
    given = sum(out.values())
    if any(pct > 100 for pct in out.values()) or (version not in out and given > 100):
        raise UsageError(f"--weight: the percents given add up to {given}%; the alias's calls are 100%")
    if version not in out:
        out[version] = 100 - given
    return {str(v): pct for v, pct in sorted(out.items())}


def _alias_text(alias: str, version: Any, view: dict[str, Any]) -> str:
    """``prod=2`` or, for a split, ``prod=2 (v2 90%, v3 10%)``."""
    weights = ((view.get("routes") or {}).get(alias) or {}).get("weights") or {}
    split = ", ".join(f"v{v} {pct}%" for v, pct in sorted(weights.items(), key=lambda kv: int(kv[0])))
    return f"{alias}={version}" + (f" ({split})" if split else "")


def _alias_rows(aliases: list[dict[str, Any]]) -> str:
    rows = []
    for item in aliases:
        weights = item.get("weights") or {}
        split = ", ".join(f"v{v} {pct}%" for v, pct in sorted(weights.items(), key=lambda kv: int(kv[0])))
        previous = item.get("previous")
        rows.append([str(item.get("name")), str(item.get("version")), split or "-", "-" if previous is None else str(previous)])
    return format_table(["ALIAS", "VERSION", "SPLIT", "PREVIOUS"], rows)


def cmd_alias_set(args: argparse.Namespace) -> int:
    name = _name(args)
    body: dict[str, Any] = {"version": args.version}
    weights = alias_weights(args.version, args.weight)
    if weights is not None:
        body["weights"] = weights
    with _client(args) as client:
        result = _named(name, args, lambda: client.set_alias(name, args.alias, body))
    if args.output == "json":
        _print_json(result)
    else:
        print(_alias_rows([result]))
    return 0


def cmd_alias_ls(args: argparse.Namespace) -> int:
    name = _name(args)
    with _client(args) as client:
        aliases = _named(name, args, lambda: client.aliases(name))
    if args.output == "json":
        _print_json(aliases)
    else:
        print(_alias_rows(aliases))
    return 0


def cmd_alias_rm(args: argparse.Namespace) -> int:
    name = _name(args)
    with _client(args) as client:
        client.delete_alias(name, args.alias)
    print(f"deleted alias {args.alias} of {name}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    name = _name(args)
    with _client(args) as client:
        result = client.rollback(name, args.alias)
    if args.output == "json":
        _print_json(result)
    else:
        print(f"{name}:{result.get('name')} -> version {result.get('version')} (was {result.get('previous')})")
    return 0


# -- logs / rm --------------------------------------------------------------------------------------


def cmd_logs(args: argparse.Namespace) -> int:
    name = _name(args)
    with _client(args) as client:
        records = _named(name, args, lambda: client.logs(name, args.limit))
    if args.output == "json":
        _print_json(records)
        return 0
    if not records:
        print(f"no logs for {name!r} yet", file=sys.stderr)
        return 0
    for record in records:
        print(format_log_record(record))
    return 0


def format_log_record(record: dict[str, Any]) -> str:
    """One record: a header line (time, request id, version, status, duration), then the output indented."""
    duration = record.get("duration_ms")
    head = "  ".join(
        [
            _when(record.get("ts"), millis=True),
            str(record.get("request_id", "-")),
            f"v{record.get('version', '?')}",
            str(record.get("status", "-")),
            f"{duration:.1f} ms" if isinstance(duration, int | float) else "- ms",
        ]
    )
    output = str(record.get("output") or "").rstrip("\n")
    lines = [head, *("    " + line for line in output.splitlines())] if output else [head]
    return "\n".join(lines)


def cmd_rm(args: argparse.Namespace) -> int:
    name = _name(args)
    with _client(args) as client:
        _named(name, args, lambda: client.delete(name))
    print(f"deleted {name}")
    return 0


# -- events -----------------------------------------------------------------------------------------


def cmd_events_ls(args: argparse.Namespace) -> int:
    name = _name(args) if args.name else None
    with _client(args) as client:
        if name is None:
            subs = client.subscriptions()
        else:
            subs = _named(name, args, lambda: client.subscriptions(name))
    if args.output == "json":
        _print_json(subs)
        return 0
    if not subs:
        where = f"function {name!r}" if name else _ns_label(args)
        print(f"no event subscriptions in {where}", file=sys.stderr)
        return 0
    print(format_table(SUBSCRIPTION_HEADERS, subscription_rows(subs)))
    return 0


def cmd_events_add(args: argparse.Namespace) -> int:
    name = _name(args)
    subscription = _subscription_name(args)
    body = request_body(spec_from_flags(args))
    with _client(args) as client:
        created, sub = client.put_subscription(name, subscription, body)
    if args.output == "json":
        _print_json(sub)
        return 0
    state = "" if sub.get("enabled", True) else " (disabled)"
    target = f" (version {sub['qualifier']})" if sub.get("qualifier") else ""
    print(
        f"{'added' if created else 'replaced'} event subscription {subscription!r} of {name}{target}: "
        f"{source_kind(sub)} {describe(sub)}{state}"
    )
    return 0


def cmd_events_rm(args: argparse.Namespace) -> int:
    name = _name(args)
    subscription = _subscription_name(args)
    with _client(args) as client:
        client.delete_subscription(name, subscription)
    print(f"removed event subscription {subscription!r} of {name}")
    return 0


def _subscription_name(args: argparse.Namespace) -> str:
    subscription: str = args.subscription
    if problem := name_problem(subscription, "subscription name"):
        raise UsageError(problem)
    return subscription


# -- helpers ----------------------------------------------------------------------------------------


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    lines = [
        "   ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines)


def _client(args: argparse.Namespace) -> GatewayClient:
    url = _url(args)
    if args.namespace is not None and (problem := name_problem(args.namespace, "namespace")):
        raise UsageError(problem)
    return GatewayClient(url, args.namespace, api_key=find_api_key(url, getattr(args, "api_key", None)))


def _url(args: argparse.Namespace) -> str:
    url = str(args.url or "").strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"invalid gateway URL {url!r}: it must start with http:// or https://")
    return url


def _ns_label(args: argparse.Namespace) -> str:
    return f"namespace {args.namespace!r}" if args.namespace else "your key's namespace"


def _name(args: argparse.Namespace) -> str:
    name: str = args.name
    if problem := name_problem(name):
        raise UsageError(problem)
    return name


def _named(name: str, args: argparse.Namespace, call: Any) -> Any:
    """Run ``call``; a 404 becomes "function 'x' not found" (naming the namespace unless it is the default)."""
    try:
        return call()
    except GatewayError as exc:
        if exc.status == 404:
            where = "" if args.namespace in (None, DEFAULT_NAMESPACE) else f" in namespace {args.namespace!r}"
            raise NotFound(f"function {name!r} not found{where}") from None
        raise


def _function_url(view: dict[str, Any], client: GatewayClient, name: str) -> str:
    url = view.get("url")
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        return url
    if isinstance(url, str) and url.startswith("/"):
        return client.url + url
    query = "" if client.namespace in (None, DEFAULT_NAMESPACE) else f"?namespace={client.namespace}"
    return f"{client.url}/fn/{name}/{query}"


def _ns_flag(args: argparse.Namespace) -> str:
    return "" if args.namespace in (None, DEFAULT_NAMESPACE) else f" -n {args.namespace}"


def _output_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=("text", "json"),
        default="text",
        help="text for people (default) or the gateway's JSON",
    )


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {number})")
    return number


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _when(ts: Any, *, millis: bool = False) -> str:
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        return str(ts) if ts not in (None, "") else "-"
    text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    return f"{text}.{int((ts % 1) * 1000):03d}" if millis else text


def _memory(mb: Any) -> str:
    return f"{mb}MB" if isinstance(mb, int) else "-"


def _seconds(seconds: Any) -> str:
    return f"{seconds:g}s" if isinstance(seconds, int | float) else "-"


def _bytes(size: Any) -> str:
    if not isinstance(size, int):
        return "-"
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"
