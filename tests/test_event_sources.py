"""Event subscriptions end to end, on the real platform (etcd, Valkey, SeaweedFS): CloudEvents in both
modes, object-store notifications from SeaweedFS, queue subscriptions with batches and partial batch
failures, timers, and on-success / on-failure destinations.

The event sources do not depend on the runtime backend, so these run on the process backend only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import boto3
import httpx
import pytest
import redis.asyncio as aioredis
from botocore.config import Config

from faas.core import redis_keys
from tests.conftest import Platform
from tests.helpers import deploy, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("platform", ["process"], indirect=True)]

ECHO = """
def handler(event, context):
    return {"event": event}
"""

BATCH = """
def handler(event, context):
    failed = [{"itemIdentifier": r["messageId"]} for r in event["Records"] if r["body"].get("fail")]
    return {"batchItemFailures": failed, "size": len(event["Records"])}
"""

FAIL = """
def handler(event, context):
    raise RuntimeError("no luck")
"""


@pytest.fixture
async def redis(platform: Platform) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(platform.settings.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def uid() -> str:
    return uuid.uuid4().hex[:8]


async def invocations_of(redis: aioredis.Redis, function: str) -> list[dict[str, Any]]:
    """Status records of every invocation queued for ``function`` (written with the enqueue itself)."""
    out = []
    async for key in redis.scan_iter(match=redis_keys.invocation("*"), count=1000):
        fields = await redis.hgetall(key)
        if fields.get(b"function", b"").decode() == function:
            record = {k.decode(): v.decode() for k, v in fields.items()}
            out.append({**record, "id": key.decode().rsplit(":", 1)[-1]})
    return out


async def stream_records(redis: aioredis.Redis, stream: str) -> list[dict[str, Any]]:
    return [json.loads(fields[b"record"]) for _, fields in await redis.xrange(stream)]


async def subscribe(gw: httpx.AsyncClient, function: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    resp = await gw.put(f"/v1/functions/{function}/subscriptions/{name}", json=spec)
    assert resp.status_code == 201, resp.text
    return resp.json()


async def final_status(gw: httpx.AsyncClient, invocation_id: str, timeout_s: float = 30) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        body = (await gw.get(f"/v1/invocations/{invocation_id}")).json()
        return body if body.get("status") in ("succeeded", "dead-lettered") else None

    result: dict[str, Any] = await wait_until(done, timeout_s=timeout_s, what=f"invocation {invocation_id}")
    return result


# -- CloudEvents ------------------------------------------------------------------------------


async def test_cloudevents_in_both_modes_reach_the_subscribed_function(gw: httpx.AsyncClient) -> None:
    fn, ce_type = f"ce-{uid()}", f"com.example.order.{uid()}"
    await deploy(gw, fn, ECHO)
    await subscribe(gw, fn, "orders", {"cloudevents": {"type": ce_type, "source": "/shop"}})

    binary = await gw.post(
        "/v1/events",
        content=json.dumps({"order": 1}),
        headers={"content-type": "application/json", "ce-specversion": "1.0", "ce-id": "b-1",
                 "ce-source": "/shop", "ce-type": ce_type, "ce-region": "eu%20west"},
    )  # fmt: skip
    assert binary.status_code == 202, binary.text
    [inv] = [i for i in binary.json()["invocations"] if i["function"] == fn]
    event = (await final_status(gw, inv["id"]))["result"]["event"]
    assert event["id"] == "b-1" and event["type"] == ce_type and event["source"] == "/shop"
    assert event["data"] == {"order": 1} and event["region"] == "eu west"

    structured = await gw.post(
        "/v1/events",
        content=json.dumps({"specversion": "1.0", "id": "s-1", "source": "/shop", "type": ce_type,
                            "datacontenttype": "text/plain", "data": "hello"}),
        headers={"content-type": "application/cloudevents+json"},
    )  # fmt: skip
    assert structured.status_code == 202, structured.text
    [inv] = [i for i in structured.json()["invocations"] if i["function"] == fn]
    event = (await final_status(gw, inv["id"]))["result"]["event"]
    assert event["id"] == "s-1" and event["data"] == "hello"


async def test_cloudevent_of_another_type_or_source_invokes_nothing(
    gw: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    fn, ce_type = f"ce-{uid()}", f"com.example.{uid()}"
    await deploy(gw, fn, ECHO)
    await subscribe(gw, fn, "only-this", {"cloudevents": {"type": ce_type, "source": "/a"}})
    for attrs in ({"type": ce_type + ".other", "source": "/a"}, {"type": ce_type, "source": "/b"}):
        resp = await gw.post(
            "/v1/events",
            json={"specversion": "1.0", "id": uid(), **attrs},
            headers={"content-type": "application/cloudevents+json"},
        )
        assert resp.status_code == 202, resp.text
        assert resp.json() == {"accepted": 1, "invocations": []}
    assert await invocations_of(redis, fn) == []


@pytest.mark.parametrize(
    ("headers", "body", "message"),
    [
        ({"ce-specversion": "1.0", "ce-source": "/a", "ce-type": "t"}, b"{}", "id"),
        ({"content-type": "application/cloudevents+json"}, b'{"specversion": "1.0", "id": "1", "type": "t"}', "source"),
        ({"content-type": "application/cloudevents+json"}, b'{"specversion": "0.3", "id": "1", "source": "/a", "type": "t"}', "specversion"),
        ({"content-type": "application/cloudevents+json"}, b"not json", "JSON"),
        ({"content-type": "application/json"}, b"{}", "ce-specversion"),
    ],
)  # fmt: skip
async def test_malformed_cloudevents_get_400_and_nothing_is_queued(
    gw: httpx.AsyncClient, redis: aioredis.Redis, headers: dict[str, str], body: bytes, message: str
) -> None:
    fn = f"ce-{uid()}"
    await deploy(gw, fn, ECHO)
    await subscribe(gw, fn, "all", {"cloudevents": {}})  # every event of the namespace
    try:
        resp = await gw.post("/v1/events", content=body, headers=headers)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["kind"] == "invalid_request"
        assert message in resp.json()["error"]["message"]
        assert await invocations_of(redis, fn) == []
    finally:  # other tests count the invocations an event produces
        await gw.delete(f"/v1/functions/{fn}/subscriptions/all")


async def test_oversized_event_gets_413(gw: httpx.AsyncClient) -> None:
    resp = await gw.post(
        "/v1/events",
        content=json.dumps(
            {"specversion": "1.0", "id": "1", "source": "/a", "type": "t", "data": "x" * 1_100_000}
        ),
        headers={"content-type": "application/cloudevents+json"},
    )
    assert resp.status_code == 413, resp.text


# -- object store -----------------------------------------------------------------------------


def s3_client(platform: Platform) -> Any:
    s = platform.settings
    return boto3.client(
        "s3", endpoint_url=s.s3_endpoint, aws_access_key_id=s.s3_access_key, aws_secret_access_key=s.s3_secret_key,
        region_name=s.s3_region, config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )  # fmt: skip


async def test_object_put_in_a_subscribed_bucket_invokes_the_function(
    platform: Platform, gw: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    fn, bucket, seen = f"obj-{uid()}", f"photos-{uid()}", f"obj-seen-{uid()}"
    await deploy(gw, fn, ECHO, on_success={"stream": seen})
    s3 = s3_client(platform)
    await asyncio.to_thread(s3.create_bucket, Bucket=bucket)
    await subscribe(gw, fn, "incoming", {"object_store": {"bucket": bucket, "prefix": "in/", "suffix": ".jpg"}})
    for key in ("out/skip.jpg", "in/skip.png", "in/a cat é.jpg"):
        await asyncio.to_thread(s3.put_object, Bucket=bucket, Key=key, Body=b"meow")

    [record] = await wait_until(lambda: stream_records(redis, seen), timeout_s=20, what="the object event")
    [s3_record] = record["requestPayload"]["Records"]
    assert s3_record["eventName"] == "ObjectCreated:Put"
    assert s3_record["s3"]["bucket"]["name"] == bucket
    assert s3_record["s3"]["object"]["key"] == "in/a+cat+%C3%A9.jpg"
    assert s3_record["s3"]["object"]["size"] == 4
    assert s3_record["s3"]["object"]["eTag"].strip('"') == hashlib.md5(b"meow").hexdigest()
    await asyncio.sleep(1.0)
    assert len(await stream_records(redis, seen)) == 1, "an object outside the prefix/suffix filter was delivered"
    # Removing the object is not in the subscription's events (ObjectCreated:* by default).
    await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key="in/a cat é.jpg")
    await asyncio.sleep(1.0)
    assert len(await invocations_of(redis, fn)) == 1


async def test_minio_notifications_are_normalised(gw: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    fn, seen = f"minio-{uid()}", f"minio-seen-{uid()}"
    await deploy(gw, fn, ECHO, on_success={"stream": seen})
    await subscribe(gw, fn, "all", {"object_store": {"bucket": "media", "events": ["ObjectRemoved:*"]}})
    notification = {
        "EventName": "s3:ObjectRemoved:Delete",
        "Key": "media/old/file.txt",
        "Records": [{
            "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "", "eventTime": "2026-11-22T05:00:00.000Z",
            "eventName": "s3:ObjectRemoved:Delete", "userIdentity": {"principalId": "minio"},
            "requestParameters": {}, "responseElements": {},
            "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config", "bucket": {"name": "media", "arn": "arn:aws:s3:::media"},
                   "object": {"key": "old%2Ffile.txt", "sequencer": "17A1B2C3D4E5F607"}},
        }],
    }  # fmt: skip
    resp = await gw.post("/v1/events/object-store/minio", json=notification)
    assert resp.status_code == 202, resp.text
    [record] = await wait_until(lambda: stream_records(redis, seen), timeout_s=20, what="the MinIO event")
    [s3_record] = record["requestPayload"]["Records"]
    assert s3_record["eventName"] == "ObjectRemoved:Delete"
    assert s3_record["s3"]["object"]["key"] == "old/file.txt"
    bad = await gw.post("/v1/events/object-store/minio", json={"hello": "world"})
    assert bad.status_code == 400, bad.text


# -- subscription management ------------------------------------------------------------------


async def test_bad_subscriptions_are_refused_and_nothing_is_stored(gw: httpx.AsyncClient) -> None:
    fn = f"subs-{uid()}"
    await deploy(gw, fn, ECHO)
    cases = [
        (f"/v1/functions/missing-{uid()}/subscriptions/s", {"timer": {"schedule": "rate(1 minute)"}}, 404),
        (f"/v1/functions/{fn}/subscriptions/s", {"timer": {"schedule": "cron(0 61 * * * *)"}}, 400),
        (f"/v1/functions/{fn}/subscriptions/s", {"timer": {"schedule": "every day"}}, 400),
        (f"/v1/functions/{fn}/subscriptions/s", {"object_store": {"bucket": "Bad_Bucket"}}, 400),
        (f"/v1/functions/{fn}/subscriptions/s", {"object_store": {"bucket": "faas-code"}}, 400),
        (f"/v1/functions/{fn}/subscriptions/s", {"object_store": {"bucket": "b1", "events": ["Created"]}}, 400),
        (f"/v1/functions/{fn}/subscriptions/s", {"queue": {"stream": "faas:async:stream"}}, 400),
        (f"/v1/functions/{fn}/subscriptions/s", {"queue": {"stream": "q", "batch_size": 0}}, 400),
        (f"/v1/functions/{fn}/subscriptions/s", {}, 400),
        (
            f"/v1/functions/{fn}/subscriptions/s",
            {"timer": {"schedule": "rate(1 minute)"}, "cloudevents": {}},
            400,
        ),
        (f"/v1/functions/{fn}/subscriptions/s", {"cloudevents": {}, "qualifier": "no-such-alias"}, 400),
        (f"/v1/functions/{fn}/subscriptions/Bad_Name", {"cloudevents": {}}, 400),
    ]
    for path, spec, status in cases:
        resp = await gw.put(path, json=spec)
        assert resp.status_code == status, (spec, resp.text)
        assert resp.json()["error"]["message"], resp.text
    assert (await gw.get(f"/v1/functions/{fn}/subscriptions")).json() == {"subscriptions": []}


async def test_subscriptions_are_listed_replaced_and_deleted_with_their_function(
    gw: httpx.AsyncClient,
) -> None:
    fn = f"subs-{uid()}"
    await deploy(gw, fn, ECHO)
    await subscribe(gw, fn, "by-hand", {"cloudevents": {"type": "t"}})
    declared = await gw.put(
        f"/v1/functions/{fn}/subscriptions",
        json={"subscriptions": [{"name": "nightly", "timer": {"schedule": "cron(0 0 3 * * *)"}}]},
    )
    assert declared.status_code == 200, declared.text
    names = {
        s["name"]: s["origin"]
        for s in (await gw.get(f"/v1/functions/{fn}/subscriptions")).json()["subscriptions"]
    }
    assert names == {"by-hand": "api", "nightly": "manifest"}
    # Declaring a new set replaces the declared ones only.
    await gw.put(f"/v1/functions/{fn}/subscriptions", json={"subscriptions": []})
    names = {s["name"] for s in (await gw.get(f"/v1/functions/{fn}/subscriptions")).json()["subscriptions"]}
    assert names == {"by-hand"}
    assert (await gw.delete(f"/v1/functions/{fn}/subscriptions/nightly")).status_code == 404
    assert (await gw.delete(f"/v1/functions/{fn}")).status_code == 204
    listed = (await gw.get("/v1/subscriptions")).json()["subscriptions"]
    assert not [s for s in listed if s["function"] == fn]


# -- destinations -----------------------------------------------------------------------------


async def test_destinations_receive_outcome_records(gw: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    sink, ok_stream, bad_stream = f"dest-sink-{uid()}", f"dest-ok-{uid()}", f"dest-bad-{uid()}"
    await deploy(gw, sink, ECHO)
    ok_fn, bad_fn = f"dest-ok-{uid()}", f"dest-bad-{uid()}"
    await deploy(gw, ok_fn, ECHO, on_success={"function": sink}, on_failure={"stream": bad_stream})
    await deploy(
        gw, bad_fn, FAIL, max_retries=0, on_success={"stream": ok_stream}, on_failure={"stream": bad_stream}
    )

    ok = await gw.post(f"/v1/functions/{ok_fn}/invoke-async", json={"n": 1})
    assert (await final_status(gw, ok.json()["id"]))["status"] == "succeeded"
    [sink_call] = await wait_until(
        lambda: invocations_of(redis, sink), timeout_s=20, what="destination invocation"
    )
    record = (await final_status(gw, sink_call["id"]))["result"]["event"]
    assert record["requestContext"]["condition"] == "Success"
    assert record["requestContext"]["requestId"] == ok.json()["id"]
    assert record["requestPayload"] == {"n": 1} and record["responsePayload"] == {"event": {"n": 1}}

    bad = await gw.post(f"/v1/functions/{bad_fn}/invoke-async", json={"n": 2})
    assert (await final_status(gw, bad.json()["id"]))["status"] == "dead-lettered"
    [failure] = await wait_until(
        lambda: stream_records(redis, bad_stream), timeout_s=10, what="failure record"
    )
    assert failure["requestContext"]["condition"] == "RetriesExhausted"
    assert failure["requestContext"]["approximateInvokeCount"] == 1
    assert failure["responsePayload"]["error"]["type"] == "RuntimeError"
    assert await stream_records(redis, ok_stream) == []


async def test_bad_destinations_are_refused_at_deploy(gw: httpx.AsyncClient) -> None:
    fn = f"dest-{uid()}"
    for config, message in (
        ({"on_success": {"function": f"missing-{uid()}"}}, "does not exist"),
        ({"on_failure": {"function": fn}}, "own destination"),
        ({"on_failure": {"stream": "faas:x"}}, "reserved"),
        ({"on_failure": {"function": "a", "stream": "b"}}, "exactly one"),
    ):
        resp = await gw.put(
            f"/v1/functions/{fn}",
            data={"config": json.dumps({"handler": "handler.handler", **config})},
            files={"code": ("code.zip", b"not checked first", "application/zip")},
        )
        assert resp.status_code == 400, resp.text
        assert message in resp.json()["error"]["message"]
    assert (await gw.get(f"/v1/functions/{fn}")).status_code == 404


# -- queue subscriptions ----------------------------------------------------------------------


async def test_queue_subscription_delivers_messages_in_batches(
    gw: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    fn, stream, ok_stream = f"q-{uid()}", f"orders-{uid()}", f"q-ok-{uid()}"
    await deploy(gw, fn, BATCH, on_success={"stream": ok_stream})
    for n in range(7):
        await redis.xadd(stream, {"order": str(n)})
    await subscribe(
        gw,
        fn,
        "orders",
        {"queue": {"stream": stream, "batch_size": 3, "batch_window_s": 0.5, "start": "earliest"}},
    )

    async def all_delivered() -> list[dict[str, Any]] | None:
        records = await stream_records(redis, ok_stream)
        return records if sum(len(r["requestPayload"]["Records"]) for r in records) >= 7 else None

    records = await wait_until(all_delivered, timeout_s=30, what="7 messages delivered")
    # Batches run concurrently, so they may finish in any order; within a batch, stream order holds.
    records.sort(key=lambda r: r["requestPayload"]["Records"][0]["messageId"])
    sizes = [len(r["requestPayload"]["Records"]) for r in records]
    assert sizes == [3, 3, 1], sizes
    orders = [m["body"]["order"] for r in records for m in r["requestPayload"]["Records"]]
    assert orders == [str(n) for n in range(7)]
    group = redis_keys.queue_subscription_group("default", fn, "orders")
    assert (await redis.xpending(stream, group))["pending"] == 0  # every message acknowledged

    # Messages added later arrive too, and are acknowledged once their invocation succeeded.
    await redis.xadd(stream, {"order": "late"})
    await wait_until(
        lambda: _delivered(redis, ok_stream, "late"), timeout_s=20, what="a message added after subscribing"
    )
    await wait_until(lambda: _nothing_pending(redis, stream, group), timeout_s=10, what="acknowledgement")

    # Deleting the subscription removes its consumer group from the user's stream.
    assert (await gw.delete(f"/v1/functions/{fn}/subscriptions/orders")).status_code == 204
    assert [g["name"] for g in await redis.xinfo_groups(stream)] == []


async def _delivered(redis: aioredis.Redis, stream: str, order: str) -> bool:
    records = await stream_records(redis, stream)
    return any(m["body"]["order"] == order for r in records for m in r["requestPayload"]["Records"])


async def _nothing_pending(redis: aioredis.Redis, stream: str, group: str) -> bool:
    return bool((await redis.xpending(stream, group))["pending"] == 0)


async def test_partial_batch_failure_redelivers_only_the_failed_messages(
    gw: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    fn, stream, bad_stream = f"q-{uid()}", f"jobs-{uid()}", f"q-bad-{uid()}"
    await deploy(gw, fn, BATCH, max_retries=1, on_failure={"stream": bad_stream})
    ids = [await redis.xadd(stream, {"job": str(n), **({"fail": "1"} if n == 2 else {})}) for n in range(4)]
    await subscribe(
        gw,
        fn,
        "jobs",
        {"queue": {"stream": stream, "batch_size": 10, "batch_window_s": 0.5, "start": "earliest"}},
    )

    [failure] = await wait_until(
        lambda: stream_records(redis, bad_stream), timeout_s=30, what="the failure record"
    )
    # The retry carried only the failed message, and it was dead-lettered after max_retries.
    assert [m["messageId"] for m in failure["requestPayload"]["Records"]] == [ids[2].decode()]
    assert failure["requestContext"]["approximateInvokeCount"] == 2
    [inv] = await invocations_of(redis, fn)
    assert inv["status"] == "dead-lettered" and json.loads(inv["attempts"]) == 2
    dead = (await gw.get("/v1/dead-letters", params={"function": fn})).json()["dead_letters"]
    assert [r["messageId"] for r in json.loads(dead[0]["payload"])["Records"]] == [ids[2].decode()]
    group = redis_keys.queue_subscription_group("default", fn, "jobs")
    assert (await redis.xpending(stream, group))["pending"] == 0  # dead-lettered ones are kept in the DLQ


# -- timers -----------------------------------------------------------------------------------


async def test_timer_fires_every_tick_once(gw: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    fn = f"tick-{uid()}"
    await deploy(gw, fn, ECHO)
    started = time.time()
    await subscribe(
        gw, fn, "every-second", {"timer": {"schedule": "cron(*/1 * * * * *)", "payload": {"hello": 1}}}
    )
    await asyncio.sleep(4.5)
    assert (await gw.delete(f"/v1/functions/{fn}/subscriptions/every-second")).status_code == 204
    # The primary stops the timer within its reconcile interval (0.5 s).  Reading only once nothing
    # can be added keeps SCAN exact (a key created during a SCAN may be missed).
    await asyncio.sleep(2.5)
    fired = await invocations_of(redis, fn)
    await asyncio.sleep(2.0)
    assert len(await invocations_of(redis, fn)) == len(fired), "the timer kept firing after it was deleted"
    assert len(fired) >= 3, fired
    events = [(await final_status(gw, inv["id"]))["result"]["event"] for inv in fired]
    ticks = sorted(e["tick"] for e in events)
    assert len(set(ticks)) == len(ticks), ticks  # no tick fired twice
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks))), ticks  # and none skipped
    assert ticks[0] >= int(started)
    assert all(e["detail"] == {"hello": 1} and e["detail-type"] == "Scheduled Event" for e in events)


async def test_queue_subscription_from_latest_starts_when_it_is_created(
    gw: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    fn, stream, ok_stream = f"q-{uid()}", f"news-{uid()}", f"q-ok-{uid()}"
    await deploy(gw, fn, BATCH, on_success={"stream": ok_stream})
    await redis.xadd(stream, {"order": "before"})
    await subscribe(gw, fn, "news", {"queue": {"stream": stream, "batch_window_s": 0}})
    await redis.xadd(stream, {"order": "right-after"})  # before the trigger's poller has even started
    await wait_until(lambda: _delivered(redis, ok_stream, "right-after"), timeout_s=20, what="the new message")
    assert not await _delivered(redis, ok_stream, "before")

    await redis.set(f"not-a-stream-{fn}", "x")
    resp = await gw.put(f"/v1/functions/{fn}/subscriptions/wrong", json={"queue": {"stream": f"not-a-stream-{fn}"}})
    assert resp.status_code == 400 and "WRONGTYPE" in resp.json()["error"]["message"], resp.text


async def test_a_loop_of_destinations_stops_after_the_hop_limit(gw: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    from faas.dispatcher.consumer import MAX_DESTINATION_HOPS

    ping, pong = f"ping-{uid()}", f"pong-{uid()}"
    ok = "def handler(event, context):\n    return 'ok'\n"  # each record nests the one before: keep it small
    await deploy(gw, pong, ok)
    await deploy(gw, ping, ok, on_success={"function": pong})
    await deploy(gw, pong, ok, on_success={"function": ping})  # pong -> ping -> pong ...
    first = await gw.post(f"/v1/functions/{ping}/invoke-async", json={"n": 0})
    assert first.status_code == 202, first.text

    async def chain() -> list[dict[str, Any]]:
        return await invocations_of(redis, ping) + await invocations_of(redis, pong)

    async def finished() -> bool:
        calls = await chain()
        return len(calls) >= 1 + MAX_DESTINATION_HOPS and all(c["status"] == "succeeded" for c in calls)

    await wait_until(finished, timeout_s=60, what="the destination chain to reach the hop limit")
    await asyncio.sleep(2.0)  # and nothing more comes
    calls = await chain()
    assert len(calls) == 1 + MAX_DESTINATION_HOPS, sorted((c["status"], c.get("enqueued_at")) for c in calls)


async def test_subscriptions_honour_their_qualifier_and_enabled_flag(
    gw: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    fn, ce_type = f"pinned-{uid()}", f"com.example.pinned.{uid()}"
    await deploy(gw, fn, "def handler(event, context):\n    return 'one'\n")
    await deploy(gw, fn, "def handler(event, context):\n    return 'two'\n")
    await subscribe(gw, fn, "pinned", {"cloudevents": {"type": ce_type}, "qualifier": "1"})
    await subscribe(gw, fn, "paused", {"timer": {"schedule": "rate(1 second)"}, "enabled": False})
    resp = await gw.post(
        "/v1/events",
        json={"specversion": "1.0", "id": "p-1", "source": "/t", "type": ce_type},
        headers={"content-type": "application/cloudevents+json"},
    )
    [inv] = [i for i in resp.json()["invocations"] if i["function"] == fn]
    assert inv["version"] == 1
    assert (await final_status(gw, inv["id"]))["result"] == "one"
    await asyncio.sleep(2.5)
    assert len(await invocations_of(redis, fn)) == 1, "a disabled timer fired"
