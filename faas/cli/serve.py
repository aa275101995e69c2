"""``faas serve``: run a function or a web app from its project folder on this machine, reloading on
change (Douban App Engine's ``dae serve``).

No platform is involved: the folder's code runs in the platform's own function host
(``faas/runtime/host.py``), started with this Python and its installed packages (not ``-S``: the
packages the developer installed stand in for the vendored ``requirements.txt``), on a loopback port.
A small HTTP server on ``127.0.0.1:PORT`` passes requests to it:

- an app (``kind: app``): every request, streamed both ways, the app mounted at ``/``;
- a function: ``POST /`` (or ``/invoke``) with the event as its JSON body, answered with the result,
  as ``POST /v1/functions/{name}/invoke`` answers; and its HTTP trigger at ``/fn/{name}/...``, the
  request as the same API Gateway event the gateway builds (``faas.core.http_events``), the result
  as the same HTTP answer.  What the handler prints goes to this terminal.

Guarantees: the host is specialised exactly as a platform instance of the manifest would be (handler
or entry, memory, timeout, concurrency, environment, readiness); a change of any file of the folder
(``.git``, ``__pycache__`` and virtualenvs aside) starts a new host with the new code, and only once
it is ready stops the old one; code that fails to start is reported here with its error while the
code before keeps serving (before any code started, requests get 503 saying why), and the next change
tries again.  Nothing listens beyond loopback; SIGTERM or Ctrl-C stops the hosts too.

"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from faas.core.http_events import http_answer, http_event
from faas.core.models import VersionConfig

from .errors import UsageError
from .manifest import load_manifest

HOST_SCRIPT = Path(__file__).resolve().parent.parent / "runtime" / "host.py"
SKIPPED_DIRS = frozenset({".git", "__pycache__", ".venv", "venv", ".faas", "node_modules", ".mypy_cache"})
POLL_S = 0.5
HOST_READY_S = 30.0
CHUNK = 64 * 1024
HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"})


def add_parsers(subparsers: Any, *, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve", parents=parents, help="run a function or app from its folder here, reloading on change"
    )
    p.add_argument("dir", nargs="?", default=".", help="the project folder holding faas.yaml (default: .)")
    p.add_argument("--port", type=int, default=8000, help="the port on 127.0.0.1 to serve on (default: 8000)")
    p.add_argument("--no-reload", action="store_true", help="do not restart when a file changes")
    p.set_defaults(func=cmd_serve)


def snapshot(folder: Path) -> dict[str, float]:
    """The modification time of every file of the project (what a change is measured against)."""
    out: dict[str, float] = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        for name in files:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                out[path] = os.stat(path).st_mtime
    return out


def _die_with_parent() -> None:
    """In the host's process, before it runs: the kernel ends it when ``faas serve`` ends, however it
    ends (Linux; elsewhere a ``faas serve`` killed with SIGKILL leaves its host behind)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DevHost:
    """One host process serving the project's current code, replaced on every reload."""

    def __init__(self, folder: Path, name: str, config: VersionConfig, workdir: Path) -> None:
        self.folder = folder
        self.name = name
        self.config = config
        self.workdir = workdir
        self.lock = threading.Lock()
        self.port: int | None = None  # the ready host's, None while none is
        self.process: subprocess.Popen[bytes] | None = None
        self.error = "starting"
        self.generation = 0

    def start(self) -> bool:
        """Start a host with the folder's code as it is now; False (and ``error`` says why) if it fails."""
        self.generation += 1
        cache = self.workdir / f"cache-{self.generation}"
        cache.mkdir()
        digest = hashlib.sha256(f"{self.folder}:{self.generation}".encode()).hexdigest()
        (cache / digest).symlink_to(self.folder)  # the host finds its code "already unpacked"
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, str(HOST_SCRIPT), "--tcp-port", str(port), "--cache-dir", str(cache),
             "--instance-id", f"serve-{self.generation}"],
            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )  # fmt: skip
        try:
            self._wait_ready(port, process)
            answer = self._call(port, "POST", "/_/specialize", json.dumps(self._spec(digest)).encode(), timeout=120)
        except OSError as exc:
            process.kill()
            process.wait()
            self.error = f"the function host did not start: {exc}"
            return False
        status, body = answer
        if status != 200:
            process.wait(10)
            try:
                error = json.loads(body)["error"]
                self.error = f"{error.get('type')}: {error.get('message')}"
            except (ValueError, KeyError, TypeError):
                self.error = body.decode(errors="replace")[:500]
            return False
        with self.lock:
            old, self.process, self.port, self.error = self.process, process, port, ""
        if old is not None:
            old.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                old.wait(5)
        return True

    def _spec(self, digest: str) -> dict[str, Any]:
        c = self.config
        return {
            "code_url": "file:///serve", "sha256": digest, "size": 0, "handler": c.handler, "kind": c.kind,
            "readiness_path": c.readiness_path, "namespace": "default", "function": self.name, "version": 0,
            "memory_mb": c.memory_mb, "timeout_s": c.timeout_s, "concurrency": c.concurrency,
            "environment": c.environment,
        }  # fmt: skip

    def _wait_ready(self, port: int, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + HOST_READY_S
        while True:
            if process.poll() is not None:
                raise OSError(f"it exited with code {process.returncode}")
            with contextlib.suppress(OSError):
                if self._call(port, "GET", "/_/health", b"", timeout=2)[0] == 200:
                    return
            if time.monotonic() > deadline:
                raise OSError(f"no answer within {HOST_READY_S:g} s")
            time.sleep(0.05)

    @staticmethod
    def _call(port: int, method: str, path: str, body: bytes, *, timeout: float) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers={"content-type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def stop(self) -> None:
        with self.lock:
            process, self.process, self.port = self.process, None, None
        if process is not None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)


def make_handler(host: DevHost, is_app: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            print(f"faas serve: {self.command} {self.path} -> {args[1] if len(args) > 1 else ''}", file=sys.stderr)

        def _error(self, status: int, kind: str, message: str) -> None:
            body = json.dumps({"error": {"kind": kind, "type": "DevServer", "message": message}}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("content-length") or 0))

        def _forward(self) -> None:
            port = host.port
            if port is None:
                self._error(503, "unavailable", f"the code does not run: {host.error}")
                return
            body = self._body()
            trigger_path: str | None = None
            if is_app:
                target = "/_/app" + self.path
            elif self.command == "POST" and self.path.split("?")[0] in ("/", "/invoke"):
                target = "/_/invoke"
            elif self.path.startswith(f"/fn/{host.name}/") or self.path.split("?")[0] == f"/fn/{host.name}":
                # The HTTP trigger, as the gateway's /fn/{name}/...: the request as an API Gateway event.
                path, _, query = self.path.removeprefix(f"/fn/{host.name}").lstrip("/").partition("?")
                trigger_path, target = path, "/_/invoke"
                event = http_event(
                    method=self.command, path=path, query=query,
                    headers=[(k.lower(), v) for k, v in self.headers.items()], body=body,
                    request_id=uuid.uuid4().hex, source_ip=self.client_address[0],
                )  # fmt: skip
                body = json.dumps(event).encode()
            else:
                self._error(
                    404, "not_found",
                    f"a function takes POST / (the event as JSON body) or its HTTP trigger at /fn/{host.name}/",
                )  # fmt: skip
                return
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=host.config.timeout_s + 30)
            try:
                if is_app:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                    headers["x-faas-root-path"] = ""
                else:  # an invocation: the event, as the dispatcher sends it
                    headers = {"content-type": "application/json", "x-faas-request-id": uuid.uuid4().hex}
                headers["content-length"] = str(len(body))
                conn.request(self.command if is_app else "POST", target, body=body, headers=headers)
                resp = conn.getresponse()
                if not is_app:
                    self._answer_invocation(resp, trigger=trigger_path is not None)
                    return
                self.send_response(resp.status)
                length = resp.getheader("content-length")
                for name, value in resp.getheaders():
                    if name.lower() not in HOP_HEADERS:
                        self.send_header(name, value)
                if length is None and self.command != "HEAD":
                    self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                while chunk := resp.read1(CHUNK) if self.command != "HEAD" else b"":
                    self.wfile.write(chunk if length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                if length is None and self.command != "HEAD":
                    self.wfile.write(b"0\r\n\r\n")
            except OSError as exc:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self._error(502, "instance_start_error", f"the function host did not answer: {exc}")
            finally:
                conn.close()

        def _answer_invocation(self, resp: http.client.HTTPResponse, *, trigger: bool) -> None:
            data = resp.read()
            logs_bytes = int(resp.getheader("x-faas-logs-bytes") or 0)
            logs, result = data[:logs_bytes], data[logs_bytes:]
            if logs:
                sys.stderr.write(logs.decode(errors="replace"))
            status, headers, content = resp.status, [("content-type", "application/json")], result
            if trigger and resp.status == 200:
                status, headers, content = http_answer(json.loads(result))
            self.send_response(status)
            for name, value in headers:
                if name not in ("content-length", *HOP_HEADERS):
                    self.send_header(name, value)
            self.send_header("content-length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _forward

    return Handler


def cmd_serve(args: argparse.Namespace) -> int:
    folder = Path(args.dir).resolve()
    manifest = load_manifest(folder)
    config = manifest.config
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: not a port")
    with tempfile.TemporaryDirectory(prefix="faas-serve-") as workdir:
        host = DevHost(folder, manifest.name, config, Path(workdir))
        try:
            server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(host, config.kind == "app"))
        except OSError as exc:
            raise UsageError(f"cannot serve on 127.0.0.1:{args.port}: {exc}") from exc
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="serve", daemon=True).start()
        what = "an app" if config.kind == "app" else "a function (POST / with the event as JSON)"
        print(f"serving {manifest.name}, {what}, on http://127.0.0.1:{args.port}/", file=sys.stderr, flush=True)
        def stop(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        try:
            seen = snapshot(folder)
            report(host, host.start())
            while True:
                time.sleep(POLL_S)
                if args.no_reload:
                    continue
                now = snapshot(folder)
                if now != seen:
                    seen = now
                    print("faas serve: a file changed; reloading", file=sys.stderr, flush=True)
                    report(host, host.start())
        except KeyboardInterrupt:
            return 0
        finally:
            server.shutdown()
            host.stop()


def report(host: DevHost, started: bool) -> None:
    if started:
        print(f"faas serve: ready (code as of {time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)
    else:
        print(f"faas serve: the code does not start: {host.error}", file=sys.stderr, flush=True)
