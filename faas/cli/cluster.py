"""``faas up``, ``faas down`` and ``faas status``: the embedded platform from the command line.

``up`` starts the supervisor (``faas.launcher.supervisor``), which starts etcd, Valkey, SeaweedFS and
the platform services under ``--home`` and then keeps them running (a component that dies is started
again); ``up`` follows its progress (on stderr; the gateway URL alone on stdout, so ``URL=$(faas up)``
works) and returns once all of them answer.  A failed ``up`` leaves nothing running.  ``down`` asks
the supervisor to stop everything (and stops from the state file in ``<home>/run`` whatever is left,
for example when the supervisor was killed), from any process.  ``status`` asks every component itself (etcd, Valkey, S3, the gateway's ``/healthz``, the
members and leaders registered in etcd) and exits 0 only when all of them are up.

Settings come from ``FAAS_*`` variables; ``--home`` overrides the folder.  ``down`` and ``status`` use
the ports recorded in the state file when there is one, so they find a cluster started with other
ports without repeating its environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from faas.core import keys
from faas.core.errors import Unavailable
from faas.core.settings import Settings
from faas.launcher.embedded import (
    ADMIN_KEY_FILE,
    ELECTED_ROLES,
    STOP_GRACE_S,
    ProcessRecord,
    default_services,
    live_records,
    log_tail,
    pid_alive,
    probe_etcd,
    probe_gateway,
    probe_s3,
    probe_valkey,
    project_root,
    read_members,
    read_state,
    redacted,
    settings_env,
    state_records,
    state_settings,
    stop_from_state,
)
from faas.launcher.supervisor import read_status, status_path, supervisor_alive

from .commands import format_table
from .credentials import save_api_key

RUNTIMES = ("process", "docker", "auto")


def add_parsers(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "up", help="start the embedded platform (etcd, Valkey, SeaweedFS and the services)"
    )
    _home_option(p)
    p.add_argument("--runtime", choices=RUNTIMES, default=None,
                   help="how the node agent runs instances (default: $FAAS_RUNTIME or process)")  # fmt: skip
    p.add_argument("--nodes", type=int, default=None,
                   help="how many node agents to run, each with its own folder and backend (default 1)")  # fmt: skip
    p.add_argument("--etcd-members", type=int, choices=(1, 3, 5), default=None,
                   help="run etcd as a cluster of this many members (default 1)")  # fmt: skip
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


SUPERVISOR_READY_S = 180.0  # SeaweedFS alone may take a minute on a slow first start


def cmd_up(args: argparse.Namespace) -> int:
    settings = _settings(
        args,
        runtime=getattr(args, "runtime", None),
        nodes=getattr(args, "nodes", None),
        etcd_members=getattr(args, "etcd_members", None),
    )
    settings = settings.model_copy(update={"home": settings.home.expanduser().resolve()})
    state = read_state(settings)
    if state is not None and live_records(state):
        pids = ", ".join(f"{r.name} {r.pid}" for r in live_records(state))
        raise Unavailable(f"a platform under {settings.home} is already running (pid {pids}); run 'faas down' first")
    if supervisor_alive(read_status(settings)):
        raise Unavailable(f"a supervisor under {settings.home} is already starting a platform; run 'faas down' first")
    status_path(settings).unlink(missing_ok=True)
    progress = _ProgressLine()
    started = time.monotonic()
    proc = _spawn_supervisor(settings)
    try:
        outcome = _follow_supervisor(settings, proc, progress)
    except KeyboardInterrupt:
        progress.failed()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        raise
    if outcome is not None:
        progress.failed()
        raise Unavailable(outcome)
    # The CLI finds the admin key from any folder: kept for this URL as 'faas login' would.
    kept = save_api_key(settings.gateway_url, (settings.home / ADMIN_KEY_FILE).read_text().strip())
    print(
        f"platform ready in {time.monotonic() - started:.1f} s, kept running by the supervisor (pid {proc.pid}); "
        f"data and logs in {settings.home}; its admin API key is in {settings.home / ADMIN_KEY_FILE} "
        f"(and in {kept} for the CLI); stop it with 'faas down{_home_flag(args)}'",
        file=sys.stderr,
    )
    print(settings.gateway_url)
    return 0


def _spawn_supervisor(settings: Settings) -> subprocess.Popen[bytes]:
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(settings_env(settings))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(project_root()), env.get("PYTHONPATH")) if p)
    with open(settings.log_dir / "supervisor.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "faas.launcher.supervisor", "--home", str(settings.home)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a Ctrl-C in this terminal later must not reach the platform
            close_fds=True,
        )


def _follow_supervisor(settings: Settings, proc: subprocess.Popen[bytes], progress: _ProgressLine) -> str | None:
    """Print the supervisor's steps until the platform is ready (None) or failed (the reason)."""
    shown = 0
    deadline = time.monotonic() + SUPERVISOR_READY_S
    while True:
        status = read_status(settings)
        if status is not None and status.get("pid") == proc.pid:
            steps = status.get("steps") or []
            for label, seconds in steps[shown:]:
                progress(label, seconds)
            shown = len(steps)
            if status.get("phase") == "ready":
                return None
            if status.get("phase") == "failed":
                proc.wait(60)
                return str(status.get("error") or "the platform did not start")
        code = proc.poll()
        if code is not None:
            tail = log_tail(settings.log_dir / "supervisor.log", 0, 15)
            return f"the supervisor exited with code {code} before the platform was ready; last lines of its log:\n{tail}"
        if time.monotonic() > deadline:
            proc.send_signal(signal.SIGTERM)
            return f"the platform was not ready after {SUPERVISOR_READY_S:.0f} s (see {settings.log_dir})"
        time.sleep(0.1)


def _home_flag(args: argparse.Namespace) -> str:
    return f" --home {args.home}" if getattr(args, "home", None) is not None else ""


# -- down -------------------------------------------------------------------------------------------


SUPERVISOR_STOP_S = 90.0


def cmd_down(args: argparse.Namespace) -> int:
    settings = _settings(args)
    status = read_status(settings)
    if supervisor_alive(status):
        assert status is not None
        pid = int(status["pid"])
        print(f"stopping the supervisor (pid {pid}) and everything it runs", file=sys.stderr)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + SUPERVISOR_STOP_S
        while supervisor_alive(status) and time.monotonic() < deadline:
            time.sleep(0.1)
        if supervisor_alive(status):
            print(f"the supervisor did not stop within {SUPERVISOR_STOP_S:g} s; killing it", file=sys.stderr)
            os.kill(pid, signal.SIGKILL)
        else:
            print(f"stopped the supervisor (pid {pid})")
    if read_state(settings) is None:
        if status is None:
            print(f"nothing to stop: no cluster is recorded in {settings.run_dir.resolve()}", file=sys.stderr)
        status_path(settings).unlink(missing_ok=True)
        return 0
    for outcome in stop_from_state(settings):
        what = f"{outcome.name} (pid {outcome.pid})"
        if outcome.outcome == "stopped":
            print(f"stopped {what}")
        elif outcome.outcome == "killed":
            print(f"killed {what}: it did not exit within {STOP_GRACE_S:g} s of SIGTERM")
        else:
            print(f"{what} was not running")
    status_path(settings).unlink(missing_ok=True)
    return 0


# -- status -----------------------------------------------------------------------------------------


async def _outcome(coro: Any) -> tuple[bool, str]:
    try:
        return True, str(await coro)
    except Unavailable as exc:
        return False, exc.message


async def _read_etcd_tree(settings: Settings) -> dict[str, Any]:
    from faas.core.service import etcd_from_settings

    members, leaders = await read_members(settings)
    etcd = etcd_from_settings(settings, timeout_s=3.0)
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
        if rec is not None and not pid_alive(rec.pid, rec.start_ticks):
            # Checked even when etcd still lists the member: its record outlives a killed process
            # until its lease lapses.
            ok = False
            problem = f"process {rec.pid} is not running (log: {rec.log}); {problem}".rstrip("; ")
        if rec is not None and rec.state == "crash-loop":
            problem = f"crash-looping ({rec.restarts} restarts, last exit code {rec.last_exit}; log: {rec.log})"
            ok = False
        rows.append({
            "component": component,
            "id": ident,
            "status": {True: "up", False: "down", None: "unknown"}[ok],
            "address": address,
            "leader": leader,
            "pid": rec.pid if rec is not None else None,
            "restarts": rec.restarts if rec is not None else 0,
            "state": rec.state if rec is not None else None,
            "last_exit": rec.last_exit if rec is not None else None,
            "problem": "" if ok else problem,
        })  # fmt: skip

    supervisor = read_status(settings)
    if supervisor is not None:
        alive = supervisor_alive(supervisor)
        rows.append({
            "component": "supervisor", "id": "-", "status": "up" if alive else "down",
            "address": "-", "leader": False, "pid": supervisor.get("pid"), "restarts": 0, "state": None,
            "last_exit": None,
            "problem": "" if alive else "the supervisor is not running: nothing restarts a component that dies",
        })  # fmt: skip
    etcd_records = [r for r in records.values() if r.name == "etcd" or r.name.startswith("etcd-")]
    if len(etcd_records) > 1:
        for rec in etcd_records:
            add("etcd", rec.name, pid_alive(rec.pid, rec.start_ticks), settings.etcd_url, etcd_ok[1])
    else:
        add("etcd", "-", etcd_ok[0], settings.etcd_url, etcd_ok[1])
    add("valkey", "-", valkey_ok[0], redacted(settings.redis_url), valkey_ok[1])
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


# What keeps one function's instances from the platform and from each other, for nodes whose record
# does not say it (README, "Security model").
ISOLATION = {
    "process": "single-tenant: instances run as the platform's user",
    "docker": "containers",
}


def node_isolation(node: dict[str, Any]) -> str:
    return str(node.get("isolation") or ISOLATION.get(str(node.get("runtime")), "?"))


def render_status(status: dict[str, Any]) -> str:
    rows = [
        [
            r["component"],
            r["id"],
            r["status"],
            r["address"] or "-",
            "leader" if r["leader"] else "",
            str(r.get("restarts", 0)) + (" (crash loop)" if r.get("state") == "crash-loop" else ""),
        ]
        for r in status["components"]
    ]
    out = [format_table(["COMPONENT", "ID", "STATUS", "ADDRESS", "LEADER", "RESTARTS"], rows)]
    if status["nodes"]:
        node_rows = [
            [
                str(n.get("node_id", "?")),
                str(n.get("runtime", "?")),
                node_isolation(n),
                str(n.get("address", "?")),
                f"{n.get('memory_free_mb', '?')}/{n.get('memory_total_mb', '?')} MB",
                str(n.get("instances", 0)),
            ]
            for n in status["nodes"]
        ]
        out += ["", format_table(["NODE", "RUNTIME", "ISOLATION", "ADDRESS", "MEMORY FREE/TOTAL", "INSTANCES"], node_rows)]
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
