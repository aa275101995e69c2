"""``faas up``, ``faas down`` and ``faas status``: the embedded platform from the command line.

``up`` starts etcd, Valkey, SeaweedFS and the platform services under ``--home`` (progress on stderr,
the gateway URL alone on stdout, so ``URL=$(faas up)`` works) and returns once all of them answer; a
failed ``up`` leaves nothing running.  ``down`` stops what the state file in ``<home>/run`` records, from
any process.  ``status`` asks every component itself (etcd, Valkey, S3, the gateway's ``/healthz``, the
members and leaders registered in etcd) and exits 0 only when all of them are up.

Settings come from ``FAAS_*`` variables; ``--home`` overrides the folder.  ``down`` and ``status`` use
the ports recorded in the state file when there is one, so they find a cluster started with other
ports without repeating its environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from faas.core import keys
from faas.core.errors import Unavailable
from faas.core.settings import Settings
from faas.launcher.embedded import (
    ELECTED_ROLES,
    STOP_GRACE_S,
    EmbeddedCluster,
    ProcessRecord,
    default_services,
    pid_alive,
    probe_etcd,
    probe_gateway,
    probe_s3,
    probe_valkey,
    read_members,
    read_state,
    state_records,
    state_settings,
    stop_from_state,
)

from .commands import format_table

RUNTIMES = ("process", "docker", "auto")


def add_parsers(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "up", help="start the embedded platform (etcd, Valkey, SeaweedFS and the services)"
    )
    _home_option(p)
    p.add_argument("--runtime", choices=RUNTIMES, default=None,
                   help="how the node agent runs instances (default: $FAAS_RUNTIME or process)")  # fmt: skip
    p.set_defaults(func=cmd_up)

    p = subparsers.add_parser("down", help="stop the embedded platform started by 'faas up'")
    _home_option(p)
    p.set_defaults(func=cmd_down)

    p = subparsers.add_parser("status", help="show every component, the leaders and the running instances")
    _home_option(p)
    p.add_argument("-o", "--output", choices=("text", "json"), default="text",
                   help="text for people (default) or JSON")  # fmt: skip
    p.set_defaults(func=cmd_status)


def _home_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, default=None,
                        help="the platform's data folder (default: $FAAS_HOME or .faas)")  # fmt: skip


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    home = getattr(args, "home", None)
    if home is not None:
        overrides["home"] = home
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _recorded_settings(args: argparse.Namespace) -> tuple[Settings, dict[str, Any] | None]:
    """The settings of the cluster recorded under the home folder (else from the environment)."""
    settings = _settings(args)
    state = read_state(settings)
    recorded = state_settings(state) if state is not None else None
    if recorded is not None:
        settings = recorded.model_copy(update={"home": settings.home})
    return settings, state


# -- up ---------------------------------------------------------------------------------------------


class _ProgressLine:
    """Prints ``starting etcd... ok (0.4 s)`` on stderr, one line per step."""

    def __init__(self) -> None:
        self.open = False

    def __call__(self, label: str, seconds: float | None) -> None:
        if seconds is None:
            print(f"starting {label}... ", end="", file=sys.stderr, flush=True)
            self.open = True
        else:
            print(f"ok ({seconds:.1f} s)", file=sys.stderr, flush=True)
            self.open = False

    def failed(self) -> None:
        if self.open:
            print("failed", file=sys.stderr, flush=True)
            self.open = False


def cmd_up(args: argparse.Namespace) -> int:
    settings = _settings(args, runtime=getattr(args, "runtime", None))
    progress = _ProgressLine()
    cluster = EmbeddedCluster(settings, progress=progress)
    started = time.monotonic()
    try:
        asyncio.run(cluster.start())
    except BaseException:
        progress.failed()
        raise
    home = cluster.settings.home
    print(
        f"platform ready in {time.monotonic() - started:.1f} s; data and logs in {home}; "
        f"stop it with 'faas down{_home_flag(args)}'",
        file=sys.stderr,
    )
    print(cluster.settings.gateway_url)
    return 0


def _home_flag(args: argparse.Namespace) -> str:
    return f" --home {args.home}" if getattr(args, "home", None) is not None else ""


# -- down -------------------------------------------------------------------------------------------


def cmd_down(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if read_state(settings) is None:
        print(f"nothing to stop: no cluster is recorded in {settings.run_dir.resolve()}", file=sys.stderr)
        return 0
    for outcome in stop_from_state(settings):
        what = f"{outcome.name} (pid {outcome.pid})"
        if outcome.outcome == "stopped":
            print(f"stopped {what}")
        elif outcome.outcome == "killed":
            print(f"killed {what}: it did not exit within {STOP_GRACE_S:g} s of SIGTERM")
        else:
            print(f"{what} was not running")
    return 0


# -- status -----------------------------------------------------------------------------------------


async def _outcome(coro: Any) -> tuple[bool, str]:
    try:
        return True, str(await coro)
    except Unavailable as exc:
        return False, exc.message


async def _read_etcd_tree(settings: Settings) -> dict[str, Any]:
    from faas.core.etcd import Etcd

    members, leaders = await read_members(settings)
    host, port = settings.etcd_host_port
    etcd = Etcd(host, port, timeout_s=3.0)
    try:
        nodes, _ = await etcd.get_prefix(keys.nodes_prefix())
        instances, _ = await etcd.get_prefix(keys.instances_prefix())
    finally:
        await etcd.close()
    return {
        "members": members,
        "leaders": leaders,
        "nodes": [_loads(kv.value) for kv in nodes],
        "instances": [_loads(kv.value) for kv in instances],
    }


def _loads(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def collect_status(settings: Settings, state: dict[str, Any] | None) -> dict[str, Any]:
    """Every component's status, the leaders, nodes and instances (what ``faas status`` shows)."""
    etcd_ok, valkey_ok, s3_ok, gateway_ok, tree = await asyncio.gather(
        _outcome(probe_etcd(settings)),
        _outcome(probe_valkey(settings)),
        _outcome(probe_s3(settings)),
        _outcome(probe_gateway(settings)),
        _outcome_tree(settings),
    )
    records = {r.name: r for r in state_records(state)} if state is not None else {}
    rows: list[dict[str, Any]] = []

    def add(
        component: str, ident: str, ok: bool | None, address: str, problem: str = "", leader: bool = False
    ) -> None:
        """``ok`` None: unknown (etcd, which knows, cannot be read)."""
        rec = records.get(ident) or records.get(component)
        if not ok and rec is not None and not pid_alive(rec.pid, rec.start_ticks):
            ok = False
            problem = f"process {rec.pid} is not running (log: {rec.log}); {problem}".rstrip("; ")
        rows.append({
            "component": component,
            "id": ident,
            "status": {True: "up", False: "down", None: "unknown"}[ok],
            "address": address,
            "leader": leader,
            "pid": rec.pid if rec is not None else None,
            "problem": "" if ok else problem,
        })  # fmt: skip

    add("etcd", "-", etcd_ok[0], settings.etcd_url, etcd_ok[1])
    add("valkey", "-", valkey_ok[0], settings.redis_url, valkey_ok[1])
    add("seaweedfs", settings.s3_bucket, s3_ok[0], settings.s3_endpoint, s3_ok[1])

    tree_ok, tree_data = tree
    members: dict[str, dict[str, Any]] = tree_data.get("members", {}) if tree_ok else {}
    leaders: dict[str, dict[str, Any]] = tree_data.get("leaders", {}) if tree_ok else {}
    leader_ids = {role: str(rec.get("member_id")) for role, rec in leaders.items()}
    for role, member_id in _expected_services(settings, state):
        member = members.pop(member_id, None)
        ok: bool | None = member is not None if tree_ok else None
        problem = "" if member is not None else "not registered in etcd"
        address = str(member.get("address", "")) if member else ""
        if role == "gateway":
            address = settings.gateway_url
            if not gateway_ok[0]:
                ok, problem = False, gateway_ok[1]
        add(role, member_id, ok, address, problem, leader=leader_ids.get(role) == member_id)
    for member_id, member in sorted(members.items()):  # members nobody expected (started by hand)
        role = str(member.get("role", "?"))
        add(role, member_id, True, str(member.get("address", "")), leader=leader_ids.get(role) == member_id)

    problems = [
        f"{r['component'] if r['id'] == '-' else r['component'] + ' ' + r['id']}: {r['problem']}"
        for r in rows
        if r["status"] == "down"
    ]
    if not tree_ok:
        problems.append(f"cannot read the members from etcd: {tree_data.get('error')}")
    else:
        for role in ELECTED_ROLES:
            if role not in leaders and any(r["component"] == role for r in rows):
                problems.append(f"no {role} leader is elected")
        for node in tree_data.get("nodes", []):
            if node.get("runtime_error"):
                problems.append(f"node {node.get('node_id', '?')}: {node['runtime_error']}")
    return {
        "ok": not problems,
        "home": str(settings.home.resolve()),
        "components": rows,
        "leaders": leader_ids,
        "nodes": tree_data.get("nodes", []) if tree_ok else [],
        "instances": tree_data.get("instances", []) if tree_ok else [],
        "problems": problems,
    }


async def _outcome_tree(settings: Settings) -> tuple[bool, dict[str, Any]]:
    try:
        return True, await _read_etcd_tree(settings)
    except Unavailable as exc:
        return False, {"error": exc.message}


def _expected_services(settings: Settings, state: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(role, member id) of each service the recorded cluster started (the default topology otherwise)."""
    if state is not None:
        services: list[ProcessRecord] = [r for r in state_records(state) if r.kind == "service"]
        if services:
            return [(r.role or "service", r.name) for r in services]
    return [(s.role, s.member_id) for s in default_services(settings)]


def render_status(status: dict[str, Any]) -> str:
    rows = [
        [r["component"], r["id"], r["status"], r["address"] or "-", "leader" if r["leader"] else ""]
        for r in status["components"]
    ]
    out = [format_table(["COMPONENT", "ID", "STATUS", "ADDRESS", "LEADER"], rows)]
    if status["nodes"]:
        node_rows = [
            [
                str(n.get("node_id", "?")),
                str(n.get("runtime", "?")),
                str(n.get("address", "?")),
                f"{n.get('memory_free_mb', '?')}/{n.get('memory_total_mb', '?')} MB",
                str(n.get("instances", 0)),
            ]
            for n in status["nodes"]
        ]
        out += ["", format_table(["NODE", "RUNTIME", "ADDRESS", "MEMORY FREE/TOTAL", "INSTANCES"], node_rows)]
    instances = sorted(
        status["instances"],
        key=lambda i: (str(i.get("namespace")), str(i.get("function")), i.get("version", 0)),
    )
    if instances:
        inst_rows = [
            [
                f"{i.get('namespace', '?')}/{i.get('function', '?')}",
                str(i.get("version", "?")),
                str(i.get("instance_id", "?")),
                str(i.get("node_id", "?")),
                str(i.get("address", "?")),
            ]
            for i in instances
        ]
        out += ["", format_table(["FUNCTION", "VERSION", "INSTANCE", "NODE", "ADDRESS"], inst_rows)]
    elif status["nodes"]:
        out += ["", "no instances running"]
    if status["problems"]:
        out += [""] + [f"problem: {p}" for p in status["problems"]]
    return "\n".join(out)


def cmd_status(args: argparse.Namespace) -> int:
    settings, state = _recorded_settings(args)
    status = asyncio.run(collect_status(settings, state))
    if getattr(args, "output", "text") == "json":
        print(json.dumps(status, indent=2))
    else:
        print(render_status(status))
    return 0 if status["ok"] else 1
