"""Aliases: a version or a weighted split between two, set, listed, rolled back and deleted through the
gateway and the CLI, and the calls of a split alias landing on its versions by their percent.

The pure parts (smooth weighted round robin, the alias body's checks, the CLI's ``--weight`` flags,
where an alias moves) are unit tests; the rest runs against the real platform (process backend: no
part of an alias depends on the runtime backend).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from itertools import islice

import httpx
import pytest
from pydantic import ValidationError

from faas.cli.commands import alias_weights
from faas.cli.errors import UsageError
from faas.core.errors import Conflict, InvalidRequest
from faas.core.models import AliasSpec, FunctionRecord, alias_problem
from faas.core.registry import _move_alias, resolve_qualifier
from faas.core.weighted import SmoothWeighted
from tests.conftest import Platform
from tests.helpers import deploy

process_only = pytest.mark.parametrize("platform", ["process"], indirect=True)


def versioned(n: int) -> str:
    return f"def handler(event, context):\n    return {{'v': {n}}}\n"


# -- pure logic -------------------------------------------------------------------------------------


def test_smooth_weighted_gives_each_its_weight_in_every_cycle_and_spreads_them() -> None:
    rotation = SmoothWeighted({"a": 5, "b": 1, "c": 1})
    first = [rotation.pick() for _ in range(7)]
    assert first == ["a", "a", "b", "a", "c", "a", "a"]  # nginx's documented sequence
    for _ in range(20):
        assert Counter(rotation.pick() for _ in range(7)) == {"a": 5, "b": 1, "c": 1}
    eighty_twenty = SmoothWeighted({2: 80, 3: 20})
    picks = [eighty_twenty.pick() for _ in range(1000)]
    assert Counter(picks) == {2: 800, 3: 200}
    assert max(len(run) for run in "".join(str(p) for p in picks).split("2")) == 1  # no two 3s in a row


def test_smooth_weighted_never_picks_a_zero_weight_and_refuses_nonsense() -> None:
    rotation = SmoothWeighted({1: 0, 2: 3})
    assert set(islice(iter(rotation.pick, None), 30)) == {2}
    with pytest.raises(ValueError):
        SmoothWeighted({1: 0})
    with pytest.raises(ValueError):
        SmoothWeighted({1: -1, 2: 5})


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"version": 2, "weights": {"2": 80, "3": 10}}, "sum to 90%"),
        ({"version": 2, "weights": {"3": 100}}, "its share"),
        ({"version": 2, "weights": {"2": 50, "3": 25, "4": 25}}, "at most two"),
        ({"version": 2, "weights": {"2": 120, "3": -20}}, "0-100"),
        ({"version": 0}, "greater than or equal to 1"),
        ({"version": 2, "extra": 1}, "Extra inputs"),
    ],
)
def test_an_alias_body_that_makes_no_sense_is_refused(body: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        AliasSpec.model_validate(body)


def test_alias_names_that_read_as_versions_are_refused() -> None:
    assert "a number names a version" in (alias_problem("2") or "")
    assert alias_problem("Prod") is not None and alias_problem("-x") is not None
    assert alias_problem("prod") is None and alias_problem("canary-2") is None


def test_weight_flags_give_the_rest_to_the_alias_version() -> None:
    assert alias_weights(2, []) is None
    assert alias_weights(2, ["3=10"]) == {"2": 90, "3": 10}
    assert alias_weights(2, ["3=10%", "2=90"]) == {"2": 90, "3": 10}
    for bad in (["x=1"], ["3"], ["3=ten"], ["3=10", "3=20"], ["3=101"], ["3=60", "4=50"]):
        with pytest.raises(UsageError):
            alias_weights(2, bad)


def test_an_alias_remembers_where_it_was_and_resolves_its_split_through_pick() -> None:
    record = FunctionRecord(namespace="default", name="f", latest_version=3)
    _move_alias(record, "latest", 1, {})
    assert record.aliases == {"latest": 1} and "latest" not in record.routes
    _move_alias(record, "latest", 2, {})
    assert record.routes["latest"].previous == 1
    _move_alias(record, "prod", 2, {2: 90, 3: 10})
    _move_alias(record, "prod", 2, {2: 50, 3: 50})  # a new split of the same version keeps no history of it
    assert record.routes["prod"].previous is None and record.routes["prod"].weights == {2: 50, 3: 50}
    assert resolve_qualifier(record, "prod") == 2  # no pick: the alias's own version
    assert resolve_qualifier(record, "prod", lambda _r, _a, weights: max(weights)) == 3
    assert resolve_qualifier(record, None) == 2 and resolve_qualifier(record, "3") == 3


# -- against the platform ---------------------------------------------------------------------------


async def versions_of(gw: httpx.AsyncClient, name: str, calls: int, qualifier: str) -> Counter[int]:
    """Which version answered each of ``calls`` sync calls of ``name:qualifier`` (by its own answer
    and by the gateway's ``X-Faas-Version``, which must agree)."""
    seen: Counter[int] = Counter()
    for _ in range(calls):
        resp = await gw.post(f"/v1/functions/{name}/invoke", params={"qualifier": qualifier}, json={})
        assert resp.status_code == 200, resp.text
        assert int(resp.headers["x-faas-version"]) == resp.json()["v"]
        seen[resp.json()["v"]] += 1
    return seen


@pytest.mark.integration
@process_only
async def test_a_canary_alias_splits_calls_by_its_weights(platform: Platform, gw: httpx.AsyncClient) -> None:
    for n in (1, 2, 3):
        await deploy(gw, "canary", versioned(n), concurrency=4)
    put = await gw.put("/v1/functions/canary/aliases/prod", json={"version": 2, "weights": {"2": 80, "3": 20}})
    assert put.status_code == 200, put.text
    assert put.json() == {"name": "prod", "version": 2, "weights": {"2": 80, "3": 20}, "previous": None}

    seen = await versions_of(gw, "canary", 1000, "prod")
    assert abs(seen[2] - 800) <= 20 and abs(seen[3] - 200) <= 20 and set(seen) == {2, 3}, seen
    # Async calls of the alias split the same way (each event runs the version it was queued for).
    queued = [
        await gw.post("/v1/functions/canary/invoke-async", params={"qualifier": "prod"}, json={}) for _ in range(10)
    ]
    assert all(r.status_code == 202 for r in queued)

    listed = (await gw.get("/v1/functions/canary/aliases")).json()["aliases"]
    assert {a["name"]: (a["version"], a["weights"]) for a in listed} == {
        "latest": (3, {}),
        "prod": (2, {"2": 80, "3": 20}),
    }
    # Moving the alias whole ends the split; the version it left is its rollback target.
    moved = await gw.put("/v1/functions/canary/aliases/prod", json={"version": 3})
    assert moved.json() == {"name": "prod", "version": 3, "weights": {}, "previous": 2}
    assert await versions_of(gw, "canary", 20, "prod") == {3: 20}


@pytest.mark.integration
@process_only
async def test_rollback_takes_an_alias_back_and_forth(platform: Platform, gw: httpx.AsyncClient) -> None:
    await deploy(gw, "rolled", versioned(1))
    refused = await gw.post("/v1/functions/rolled/aliases/latest/rollback")
    assert refused.status_code == 409, refused.text  # one version: nowhere to go back to
    await deploy(gw, "rolled", versioned(2))
    assert await versions_of(gw, "rolled", 3, "latest") == {2: 3}

    back = await gw.post("/v1/functions/rolled/aliases/latest/rollback")
    assert back.status_code == 200 and back.json()["version"] == 1 and back.json()["previous"] == 2
    assert await versions_of(gw, "rolled", 3, "latest") == {1: 3}  # the default qualifier is latest
    resp = await gw.post("/v1/functions/rolled/invoke", json={})
    assert resp.json() == {"v": 1}
    again = await gw.post("/v1/functions/rolled/aliases/latest/rollback")
    assert again.json()["version"] == 2 and again.json()["previous"] == 1
    # A deploy moves latest to the new version whatever it pointed to, and remembers it.
    await gw.post("/v1/functions/rolled/aliases/latest/rollback")
    new = await deploy(gw, "rolled", versioned(3))
    assert new["aliases"]["latest"] == 3 and new["routes"]["latest"]["previous"] == 1


@pytest.mark.integration
@process_only
async def test_bad_alias_requests_are_refused_and_change_nothing(platform: Platform, gw: httpx.AsyncClient) -> None:
    for n in (1, 2):
        await deploy(gw, "strict", versioned(n))
    ok = await gw.put("/v1/functions/strict/aliases/prod", json={"version": 1})
    assert ok.status_code == 200
    before = (await gw.get("/v1/functions/strict/aliases")).json()

    cases = [
        ("PUT", "/v1/functions/strict/aliases/prod", {"version": 2, "weights": {"2": 70, "1": 20}}, 400, "sum to 90%"),
        ("PUT", "/v1/functions/strict/aliases/prod", {"version": 2, "weights": {"2": 90, "7": 10}}, 400, "no version 7"),
        ("PUT", "/v1/functions/strict/aliases/prod", {"version": 9}, 400, "no version 9"),
        ("PUT", "/v1/functions/strict/aliases/2", {"version": 1}, 400, "a number names a version"),
        ("PUT", "/v1/functions/strict/aliases/Prod", {"version": 1}, 400, "invalid alias"),
        ("PUT", "/v1/functions/strict/aliases/prod", {"weights": {"1": 100}}, 400, "version"),
        ("PUT", "/v1/functions/nosuch/aliases/prod", {"version": 1}, 404, "not found"),
        ("DELETE", "/v1/functions/strict/aliases/latest", None, 400, "cannot be deleted"),
        ("DELETE", "/v1/functions/strict/aliases/beta", None, 404, "no alias 'beta'"),
        ("POST", "/v1/functions/strict/aliases/beta/rollback", None, 404, "no alias 'beta'"),
        ("POST", "/v1/functions/strict/aliases/prod/rollback", None, 409, "no previous version"),
    ]
    for method, path, body, status, text in cases:
        resp = await gw.request(method, path, json=body)
        assert resp.status_code == status, (method, path, body, resp.text)
        error = resp.json()["error"]
        assert text in error["message"], (path, body, error)
        assert error["kind"] == {400: "invalid_request", 404: "not_found", 409: "conflict"}[status]
    assert (await gw.get("/v1/functions/strict/aliases")).json() == before
    unknown = await gw.post("/v1/functions/strict/invoke", params={"qualifier": "beta"}, json={})
    assert unknown.status_code == 400 and "unknown alias" in unknown.text

    deleted = await gw.delete("/v1/functions/strict/aliases/prod")
    assert deleted.status_code == 204
    gone = await gw.post("/v1/functions/strict/invoke", params={"qualifier": "prod"}, json={})
    assert gone.status_code == 400


@pytest.mark.integration
@process_only
async def test_the_cli_sets_lists_and_rolls_back_aliases(platform: Platform, gw: httpx.AsyncClient) -> None:
    for n in (1, 2):
        await deploy(gw, "cli-alias", versioned(n))
    cli = platform.cli
    set_ = await asyncio.to_thread(cli, "alias", "set", "cli-alias", "prod", "1", "--weight", "2=25")
    assert set_.returncode == 0, set_.stderr
    assert "v1 75%, v2 25%" in set_.stdout
    listed = await asyncio.to_thread(cli, "alias", "ls", "cli-alias", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert {a["name"]: a["weights"] for a in json.loads(listed.stdout)} == {
        "latest": {},
        "prod": {"1": 75, "2": 25},
    }
    assert await versions_of(gw, "cli-alias", 8, "prod") == {1: 6, 2: 2}

    bad = await asyncio.to_thread(cli, "alias", "set", "cli-alias", "prod", "1", "--weight", "7=10")
    assert bad.returncode == 1 and "no version 7" in bad.stderr
    for flag, problem in (("two=5", "V=PCT"), ("2=120", "add up to 120%")):
        usage = await asyncio.to_thread(cli, "alias", "set", "cli-alias", "prod", "1", "--weight", flag)
        assert usage.returncode == 2 and problem in usage.stderr, usage.stderr

    rolled = await asyncio.to_thread(cli, "rollback", "cli-alias")
    assert rolled.returncode == 0, rolled.stderr
    assert "cli-alias:latest -> version 1 (was 2)" in rolled.stdout
    assert await versions_of(gw, "cli-alias", 2, "latest") == {1: 2}
    removed = await asyncio.to_thread(cli, "alias", "rm", "cli-alias", "prod")
    assert removed.returncode == 0, removed.stderr
    none_left = await asyncio.to_thread(cli, "rollback", "cli-alias", "--alias", "prod")
    assert none_left.returncode == 1 and "no alias 'prod'" in none_left.stderr


def test_errors_used_here_are_the_documented_kinds() -> None:
    assert InvalidRequest("x").to_body()["error"]["kind"] == "invalid_request"
    assert Conflict("x").to_body()["error"]["kind"] == "conflict"
