"""API keys and namespaces as a boundary, against the real platform (process backend: the checks
are the gateway's, whatever runs the instances).

Every route without a key, with a revoked key, with another namespace's key, and with an invoker key
on deploy is refused, and nothing runs or changes (counted with a function that appends a line per
call to a file).  Keys are never in clear in etcd, in the API's answers or in the gateway's log.  A
public HTTP trigger answers without a key while its management routes still need one; object-store
webhooks need the webhook secret; the CLI finds the embedded platform's admin key and logs in.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from faas.core.api_keys import KEYS_PREFIX
from faas.core.service import etcd_from_settings
from tests.conftest import Platform
from tests.helpers import deploy, make_zip, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("platform", ["process"], indirect=True)]

# Its runs are counted from the platform's invocation log (a sandboxed function cannot write a file
# the test could read).
COUNTER = """
def handler(event, context):
    print("ran", context.function_name)
    return {"ns": context.namespace, "fn": context.function_name}
"""

WEB = """
def handler(event, context):
    return {"statusCode": 200, "body": "hello " + event["rawPath"]}
"""


async def runs(admin: httpx.AsyncClient, name: str, namespace: str = "default", *, expect: int) -> int:
    """How many times function ``name`` ran, from its invocation log, once it shows ``expect`` runs
    (or 5 s passed: the log is written in batches, right after each call)."""
    count = -1
    give_up_at = asyncio.get_running_loop().time() + 5.0
    while asyncio.get_running_loop().time() < give_up_at:
        resp = await admin.get(f"/v1/functions/{name}/logs", params={"namespace": namespace, "limit": 1000})
        count = sum("ran " in str(entry.get("output", "")) for entry in resp.json()["logs"])
        if count >= expect:
            break
        await asyncio.sleep(0.05)
    return count


async def new_key(gw: httpx.AsyncClient, **spec: object) -> dict[str, object]:
    resp = await gw.post("/v1/keys", json=spec)
    assert resp.status_code == 201, resp.text
    return resp.json()  # type: ignore[no-any-return]


def client_with(platform: Platform, key: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(base_url=platform.url, timeout=60, headers=headers)


async def everything_refused(client: httpx.AsyncClient, name: str, status: int) -> list[str]:
    """Calls every kind of route; the ones not answered ``status``."""
    archive = make_zip({"handler.py": COUNTER})
    calls = [
        client.get("/v1/functions"),
        client.get(f"/v1/functions/{name}"),
        client.get(f"/v1/functions/{name}/versions"),
        client.put(
            f"/v1/functions/{name}",
            data={"config": json.dumps({"handler": "handler.handler"})},
            files={"code": ("code.zip", archive, "application/zip")},
        ),  # fmt: skip
        client.post(f"/v1/functions/{name}/invoke", json={}),
        client.post(f"/v1/functions/{name}/invoke-async", json={}),
        client.post(f"/v1/functions/{name}/invoke", json={}, headers={"X-Faas-Invocation-Type": "async"}),
        client.get(f"/v1/functions/{name}/logs"),
        client.get(f"/v1/functions/{name}/subscriptions"),
        client.get("/v1/subscriptions"),
        client.get("/v1/dead-letters"),
        client.get("/v1/invocations/0123456789abcdef0123456789abcdef"),
        client.post("/v1/events", json={"specversion": "1.0", "id": "1", "source": "s", "type": "t"}),
        client.post(f"/fn/{name}/anything"),
        client.get("/v1/keys"),
        client.post("/v1/keys", json={"role": "admin"}),
        client.delete(f"/v1/functions/{name}"),
    ]
    answers = await asyncio.gather(*calls)
    return [
        f"{r.request.method} {r.request.url.path}: {r.status_code}"
        for r in answers
        if r.status_code != status
    ]


async def test_every_route_needs_a_valid_key_and_nothing_runs_without_one(
    platform: Platform, gw: httpx.AsyncClient, tmp_path: Path
) -> None:
    await deploy(gw, "counted", COUNTER)
    assert (await gw.post("/v1/functions/counted/invoke", json={})).status_code == 200
    assert await runs(gw, "counted", expect=1) == 1

    async with client_with(platform, None) as anonymous:
        assert (await anonymous.get("/healthz")).status_code == 200
        assert await everything_refused(anonymous, "counted", 401) == []
        refused = await anonymous.post("/v1/functions/counted/invoke", json={})
        assert refused.json()["error"]["kind"] == "unauthorized"
        assert "Bearer" in refused.headers["www-authenticate"]
    async with client_with(platform, "faas_0000000000000000_" + "x" * 43) as forged:
        assert await everything_refused(forged, "counted", 401) == []
    async with client_with(platform, "not-a-key") as malformed:
        assert await everything_refused(malformed, "counted", 401) == []

    created = await new_key(gw, role="developer", description="to revoke")
    async with client_with(platform, str(created["key"])) as developer:
        assert (await developer.post("/v1/functions/counted/invoke", json={})).status_code == 200
        assert (await gw.delete(f"/v1/keys/{created['id']}")).status_code == 204

        async def refused_now() -> bool:
            return (await developer.get("/v1/functions")).status_code == 401

        await wait_until(refused_now, timeout_s=5, what="the revoked key to be refused")
        assert await everything_refused(developer, "counted", 401) == []

    await asyncio.sleep(1.0)  # any async call that slipped through would have run by now
    assert await runs(gw, "counted", expect=3) == 2, "a call without a valid key ran the function"
    assert (await gw.get("/v1/functions/counted")).json()["latest_version"] == 1, (
        "a refused deploy changed it"
    )


async def test_a_namespace_is_invisible_to_another_namespaces_keys(
    platform: Platform, gw: httpx.AsyncClient, tmp_path: Path
) -> None:
    team_a = await new_key(gw, namespace="team-a", role="developer")
    team_b = await new_key(gw, namespace="team-b", role="developer")
    async with client_with(platform, str(team_a["key"])) as a, client_with(platform, str(team_b["key"])) as b:
        await deploy(a, "secret-fn", COUNTER, environment={"TOKEN": "team-a-only"})
        called = await a.post("/v1/functions/secret-fn/invoke", json={})
        assert called.status_code == 200 and called.json() == {"ns": "team-a", "fn": "secret-fn"}
        accepted = await a.post("/v1/functions/secret-fn/invoke-async", json={})
        assert accepted.status_code == 202
        invocation = accepted.json()["id"]

        # Team B's key: its own namespace has no such function; naming team A's is "not found".
        assert (await b.get("/v1/functions")).json()["functions"] == []
        for path in (
            "/v1/functions/secret-fn",
            "/v1/functions/secret-fn/logs",
            "/v1/functions/secret-fn/versions",
        ):
            assert (await b.get(path)).status_code == 404, path
            assert (await b.get(path, params={"namespace": "team-a"})).status_code == 404, path
        assert (
            await b.post("/v1/functions/secret-fn/invoke", json={}, params={"namespace": "team-a"})
        ).status_code == 404
        assert (await b.get("/v1/functions", params={"namespace": "team-a"})).status_code == 404
        assert (await b.get(f"/v1/invocations/{invocation}")).status_code == 404
        assert (await b.delete("/v1/functions/secret-fn", params={"namespace": "team-a"})).status_code == 404
        assert (await b.get("/v1/dead-letters", params={"namespace": "team-a"})).status_code == 404
        assert (await b.get("/v1/keys")).status_code == 403  # keys are the admin's

        # Team A sees its own; the admin sees it by naming the namespace.
        assert (await a.get(f"/v1/invocations/{invocation}")).status_code == 200
        assert [f["name"] for f in (await a.get("/v1/functions")).json()["functions"]] == ["secret-fn"]
        admin_view = await gw.get("/v1/functions/secret-fn", params={"namespace": "team-a"})
        assert admin_view.status_code == 200
        assert (
            await gw.get("/v1/functions/secret-fn")
        ).status_code == 404  # the admin's own namespace is "default"

    async def ran_twice() -> bool:
        return await runs(gw, "secret-fn", "team-a", expect=2) >= 2

    await wait_until(ran_twice, timeout_s=20, what="team A's sync and async calls")
    await asyncio.sleep(0.5)
    assert await runs(gw, "secret-fn", "team-a", expect=3) == 2


async def test_roles_limit_what_a_key_may_do(
    platform: Platform, gw: httpx.AsyncClient, tmp_path: Path
) -> None:
    await deploy(gw, "allowed", COUNTER)
    await deploy(gw, "other", COUNTER)
    invoker = await new_key(gw, role="invoker", functions=["allowed"])
    async with client_with(platform, str(invoker["key"])) as inv:
        assert (await inv.post("/v1/functions/allowed/invoke", json={})).status_code == 200
        assert (await inv.post("/v1/functions/other/invoke", json={})).status_code == 404
        refused = await inv.put(
            "/v1/functions/allowed", data={"config": json.dumps({"handler": "handler.handler"})},
            files={"code": ("code.zip", make_zip({"handler.py": COUNTER}), "application/zip")},
        )  # fmt: skip
        assert refused.status_code == 403 and refused.json()["error"]["kind"] == "forbidden"
        assert (await inv.delete("/v1/functions/allowed")).status_code == 403
        assert (await inv.get("/v1/functions/allowed/logs")).status_code == 403
        who = (await inv.get("/v1/whoami")).json()
        assert who["role"] == "invoker" and who["functions"] == ["allowed"] and who["namespace"] == "default"
    assert (await gw.get("/v1/functions/allowed")).json()["latest_version"] == 1
    assert await runs(gw, "allowed", expect=1) == 1
    assert await runs(gw, "other", expect=1) == 0
    bad = await gw.post("/v1/keys", json={"role": "developer", "functions": ["allowed"]})
    assert bad.status_code == 400


async def test_keys_are_never_kept_or_shown_in_clear(platform: Platform, gw: httpx.AsyncClient) -> None:
    created = await new_key(gw, role="invoker", description="clear-text check")
    text = str(created["key"])
    secret = text.split("_", 2)[2]  # faas_<id>_<secret>: the secret itself may hold "_"
    async with client_with(platform, text) as inv:
        await inv.get("/v1/whoami")
        await inv.get("/v1/functions")  # refused (403): the refusal is logged, not the key
    listed = (await gw.get("/v1/keys")).json()["keys"]
    mine = next(k for k in listed if k["id"] == created["id"])
    assert "key" not in mine and "secret_sha256" not in mine
    assert secret not in json.dumps(listed)
    etcd = etcd_from_settings(platform.settings)
    try:
        kvs, _ = await etcd.get_prefix(KEYS_PREFIX.encode())
    finally:
        await etcd.close()
    stored = b"".join(kv.value for kv in kvs)
    assert created["id"].encode() in stored and secret.encode() not in stored  # type: ignore[union-attr]
    for log in (platform.settings.home / "logs").glob("*.log"):
        assert secret not in log.read_text(errors="replace"), log.name


async def test_a_public_http_trigger_answers_without_a_key_but_its_api_does_not(
    platform: Platform, gw: httpx.AsyncClient
) -> None:
    await deploy(gw, "webpage", WEB, public=True)
    await deploy(gw, "private-page", WEB)
    async with client_with(platform, None) as anonymous:
        page = await anonymous.get("/fn/webpage/index.html")
        assert page.status_code == 200 and page.text == "hello /index.html"
        assert (await anonymous.get("/fn/private-page/index.html")).status_code == 401
        assert (await anonymous.get("/fn/no-such-page/index.html")).status_code == 401  # the same answer
        assert (await anonymous.post("/v1/functions/webpage/invoke", json={})).status_code == 401
        assert (await anonymous.get("/v1/functions/webpage")).status_code == 401
        assert (await anonymous.delete("/v1/functions/webpage")).status_code == 401
    assert (await gw.get("/fn/private-page/x")).status_code == 200  # with a key it answers


async def test_object_store_webhooks_need_the_webhook_secret(
    platform: Platform, gw: httpx.AsyncClient
) -> None:
    notification = {"Records": []}
    async with client_with(platform, None) as anonymous:
        assert (await anonymous.post("/v1/events/object-store/minio", json=notification)).status_code == 401
        wrong = await anonymous.post(
            "/v1/events/object-store/minio", json=notification, params={"secret": "wrong"}
        )
        assert wrong.status_code == 401
        secret = platform.settings.webhook_secret
        assert secret
        right = await anonymous.post(
            "/v1/events/object-store/minio", json=notification, params={"secret": secret}
        )
        assert right.status_code == 202, right.text
        bearer = await anonymous.post(
            "/v1/events/object-store/minio", json=notification, headers={"Authorization": f"Bearer {secret}"}
        )
        assert bearer.status_code == 202
    developer = await new_key(gw, role="developer")
    async with client_with(platform, str(developer["key"])) as dev:
        assert (await dev.post("/v1/events/object-store/minio", json=notification)).status_code == 403
    assert (
        await gw.post("/v1/events/object-store/minio", json=notification)
    ).status_code == 202  # an admin key


def test_the_cli_finds_the_admin_key_creates_keys_and_logs_in(platform: Platform, tmp_path: Path) -> None:
    env = {**platform.env(), "FAAS_CONFIG_DIR": str(tmp_path / "config")}  # this test's own 'faas login'

    def faas(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "faas.cli.main", *args], env=env, input=stdin, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip

    who = faas("whoami", "-o", "json")
    assert who.returncode == 0, who.stderr
    assert json.loads(who.stdout)["role"] == "admin"
    created = faas("keys", "create", "--role", "invoker", "--function", "cli-fn", "-o", "json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    login = faas("login", stdin=key["key"] + "\n")
    assert login.returncode == 0, login.stderr
    assert "invoker key of namespace 'default'" in login.stdout
    assert (tmp_path / "config" / "credentials.json").stat().st_mode & 0o077 == 0
    after = faas("whoami", "-o", "json")
    assert json.loads(after.stdout)["role"] == "invoker"  # the saved key comes before the home's
    listed = faas("keys", "ls")
    assert listed.returncode == 1 and "needs admin" in listed.stderr
    admin = (platform.settings.home / "admin.key").read_text().strip()
    revoked = faas("--api-key", admin, "keys", "revoke", key["id"])
    assert revoked.returncode == 0, revoked.stderr
    refused = faas("login", "--key", "faas_0000000000000000_" + "y" * 43)
    assert refused.returncode == 1 and "not valid" in refused.stderr


async def test_streams_and_buckets_belong_to_the_namespace_that_names_them_first(
    platform: Platform, gw: httpx.AsyncClient
) -> None:
    team_a = await new_key(gw, namespace="own-a", role="developer")
    team_b = await new_key(gw, namespace="own-b", role="developer")
    async with client_with(platform, str(team_a["key"])) as a, client_with(platform, str(team_b["key"])) as b:
        await deploy(a, "producer", COUNTER, on_success={"stream": "own-a-results"})
        sub = {"queue": {"stream": "own-a-orders"}}
        assert (await a.put("/v1/functions/producer/subscriptions/orders", json=sub)).status_code == 201
        bucket = {"object_store": {"bucket": "own-a-photos"}}
        assert (await a.put("/v1/functions/producer/subscriptions/photos", json=bucket)).status_code == 201

        await deploy(b, "thief", COUNTER)
        for path, body in (
            ("/v1/functions/thief/subscriptions/orders", sub),
            ("/v1/functions/thief/subscriptions/results", {"queue": {"stream": "own-a-results"}}),
            ("/v1/functions/thief/subscriptions/photos", bucket),
        ):
            refused = await b.put(path, json=body)
            assert refused.status_code == 409, (path, refused.text)
            assert "belongs to another namespace" in refused.json()["error"]["message"]
        stolen = await b.put(
            "/v1/functions/thief", data={"config": json.dumps({"handler": "handler.handler", "on_success": {"stream": "own-a-orders"}})},
            files={"code": ("code.zip", make_zip({"handler.py": COUNTER}), "application/zip")},
        )  # fmt: skip
        assert stolen.status_code == 409, stolen.text
        assert (await b.get("/v1/functions/thief")).json()["latest_version"] == 1


async def test_a_key_is_checked_before_any_body_is_read_and_the_docs_are_open(platform: Platform) -> None:
    host, port = platform.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"PUT /v1/functions/x HTTP/1.1\r\nhost: x\r\ncontent-type: multipart/form-data; boundary=b\r\n"
        b"content-length: 200000000\r\n\r\n" + b"x" * 1024
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # without the other 199 MB
    writer.close()
    assert head.startswith(b"HTTP/1.1 401"), head
    async with client_with(platform, None) as anonymous:
        assert (await anonymous.get("/openapi.json")).status_code == 200


async def test_an_invoker_limited_to_some_functions_reads_only_their_invocations(
    platform: Platform, gw: httpx.AsyncClient
) -> None:
    await deploy(gw, "mine-fn", COUNTER)
    await deploy(gw, "theirs-fn", COUNTER)
    theirs = (await gw.post("/v1/functions/theirs-fn/invoke-async", json={})).json()["id"]
    invoker = await new_key(gw, role="invoker", functions=["mine-fn"])
    async with client_with(platform, str(invoker["key"])) as inv:
        mine = (await inv.post("/v1/functions/mine-fn/invoke-async", json={})).json()["id"]
        assert (await inv.get(f"/v1/invocations/{mine}")).status_code == 200
        assert (await inv.get(f"/v1/invocations/{theirs}")).status_code == 404
