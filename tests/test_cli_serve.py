"""``faas serve``: a function and a web app run from their folders by the real CLI, reloaded when a
file changes, kept serving the code before when the new code does not start, and gone (hosts
included) after SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from faas.core.procs import processes_matching

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_hosts() -> list[int]:
    return [pid for pid, argv in processes_matching(lambda a: any(x.startswith("serve-") for x in a) and "--tcp-port" in a)]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, int, subprocess.Popen[str], Path]]:
    """(project folder, port, the CLI process, its stderr file); the caller writes the project first."""
    project = tmp_path / "project"
    project.mkdir()
    port = free_port()
    log = tmp_path / "serve.log"
    holder: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "faas.cli.main", "serve", str(project), "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True,
        )  # fmt: skip
        holder.append(proc)
        return proc

    yield project, port, start, log  # type: ignore[misc]
    for proc in holder:
        if proc.poll() is None:
            proc.terminate()  # it stops its hosts
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for(predicate, timeout_s: float = 20.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = predicate()
            if result:
                return result
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def answered(method: str, url: str, **kwargs: object) -> httpx.Response | None:
    """The answer, once the code is running (503 is the server saying it is not yet)."""
    resp = httpx.request(method, url, timeout=5, **kwargs)  # type: ignore[arg-type]
    return None if resp.status_code == 503 else resp


def test_a_function_is_served_reloaded_and_stopped(served) -> None:  # type: ignore[no-untyped-def]
    project, port, start, log = served
    (project / "faas.yaml").write_text("name: greet\nenvironment:\n  GREETING: hej\n")
    handler = project / "handler.py"
    handler.write_text(
        "import os\n\ndef handler(event, context):\n    print('called with', event)\n"
        "    return {'greeting': os.environ['GREETING'], 'name': event['name'], 'v': 1}\n"
    )
    proc = start()
    url = f"http://127.0.0.1:{port}/"
    first = wait_for(lambda: answered("POST", url, json={"name": "Ada"}), what="the function to answer")
    assert first.status_code == 200 and first.json() == {"greeting": "hej", "name": "Ada", "v": 1}
    assert "called with {'name': 'Ada'}" in log.read_text()  # the handler's output, in the terminal
    assert httpx.get(f"http://127.0.0.1:{port}/elsewhere", timeout=5).status_code == 404

    time.sleep(1.1)  # a coarse mtime must move
    handler.write_text(handler.read_text().replace("'v': 1", "'v': 2"))
    wait_for(lambda: httpx.post(url, json={"name": "Ada"}, timeout=5).json().get("v") == 2, what="the reload")

    time.sleep(1.1)
    handler.write_text("def handler(event, context) oops\n")
    wait_for(lambda: "does not start: SyntaxError" in log.read_text(), what="the start error to be reported")
    still = httpx.post(url, json={"name": "Ada"}, timeout=5)
    assert still.status_code == 200 and still.json()["v"] == 2  # the code before keeps serving

    hosts = serve_hosts()
    assert hosts, "no function host found"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    wait_for(lambda: not set(hosts) & set(serve_hosts()), timeout_s=10, what="the hosts to stop")


def test_an_app_is_served_at_the_root_with_its_own_answers(served) -> None:  # type: ignore[no-untyped-def]
    project, port, start, log = served
    (project / "faas.yaml").write_text("name: site\nkind: app\nentry: main:app\n")
    (project / "main.py").write_text(
        "import json\n\ndef app(environ, start_response):\n"
        "    body = json.dumps({'path': environ['PATH_INFO'], 'query': environ['QUERY_STRING'],\n"
        "                       'root': environ['SCRIPT_NAME'], 'body': environ['wsgi.input'].read().decode()})\n"
        "    start_response('201 Created', [('content-type', 'application/json'), ('set-cookie', 'a=1'),\n"
        "                                   ('set-cookie', 'b=2')])\n"
        "    return [body.encode()]\n"
    )
    start()
    url = f"http://127.0.0.1:{port}/shop/items?q=1"
    resp = wait_for(lambda: answered("POST", url, content=b"hello"), what="the app to answer")
    assert resp.status_code == 201
    assert json.loads(resp.content) == {"path": "/shop/items", "query": "q=1", "root": "", "body": "hello"}
    assert resp.headers.get_list("set-cookie") == ["a=1", "b=2"]


def test_no_code_yet_is_a_503_saying_why(served) -> None:  # type: ignore[no-untyped-def]
    project, port, start, log = served
    (project / "faas.yaml").write_text("name: broken\n")
    (project / "handler.py").write_text("raise RuntimeError('missing config')\n")
    start()
    wait_for(lambda: "does not start" in log.read_text(), what="the start error")
    resp = httpx.post(f"http://127.0.0.1:{port}/", json={}, timeout=5)
    assert resp.status_code == 503 and "missing config" in resp.json()["error"]["message"]


def test_a_functions_http_trigger_gets_the_gateways_event(served) -> None:  # type: ignore[no-untyped-def]
    project, port, start, log = served
    (project / "faas.yaml").write_text("name: web\n")
    (project / "handler.py").write_text(
        "def handler(event, context):\n"
        "    return {'statusCode': 201, 'headers': {'x-path': event['rawPath']}, 'cookies': ['a=1', 'b=2'],\n"
        "            'body': {'method': event['requestContext']['http']['method'],\n"
        "                     'q': event['queryStringParameters'], 'body': event['body']}}\n"
    )
    start()
    url = f"http://127.0.0.1:{port}/fn/web/items/7?q=1&q=2"
    resp = wait_for(lambda: answered("PUT", url, content=b"payload", headers={"content-type": "text/plain"}),
                    what="the trigger to answer")  # fmt: skip
    assert resp.status_code == 201, resp.text
    assert resp.json() == {"method": "PUT", "q": {"q": "1,2"}, "body": "payload"}
    assert resp.headers["x-path"] == "/items/7"
    assert resp.headers.get_list("set-cookie") == ["a=1", "b=2"]
