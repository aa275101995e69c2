"""`faas events` and `faas deploy` with `events:` through the real CLI against the real platform."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Platform

pytestmark = pytest.mark.integration


def project(root: Path, name: str, manifest_tail: str = "") -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "faas.yaml").write_text(f"name: {name}\nhandler: handler.handler\n{manifest_tail}")
    (folder / "handler.py").write_text("def handler(event, context):\n    return {'got': event}\n")
    return folder


def listed(platform: Platform, *args: str) -> dict[str, dict[str, object]]:
    out = platform.cli("events", "ls", *args, "-o", "json")
    assert out.returncode == 0, out.stderr
    return {str(sub["name"]): sub for sub in json.loads(out.stdout)}


def test_events_add_ls_rm(platform: Platform, tmp_path: Path) -> None:
    assert platform.cli("deploy", str(project(tmp_path, "ev-target"))).returncode == 0

    added = platform.cli(
        "events",
        "add",
        "ev-target",
        "orders",
        "--cloudevents",
        "--type",
        "com.example.order",
        "--source",
        "/shop",
    )
    assert added.returncode == 0, added.stderr
    assert "added event subscription 'orders' of ev-target" in added.stdout
    added = platform.cli(
        "events",
        "add",
        "ev-target",
        "nightly",
        "--timer",
        "cron(0 0 3 * * *)",
        "--payload",
        '{"job": "report"}',
    )
    assert added.returncode == 0, added.stderr
    replaced = platform.cli("events", "add", "ev-target", "nightly", "--timer", "rate(1 day)", "--disabled")
    assert replaced.returncode == 0, replaced.stderr
    assert "replaced event subscription 'nightly'" in replaced.stdout

    subs = listed(platform, "ev-target")
    assert set(subs) == {"orders", "nightly"}
    assert subs["orders"]["cloudevents"] == {"type": "com.example.order", "source": "/shop"}
    assert subs["nightly"]["timer"] == {"schedule": "rate(1 day)", "payload": None}
    assert subs["nightly"]["enabled"] is False
    assert {sub["origin"] for sub in subs.values()} == {"api"}
    assert {"orders", "nightly"} <= set(listed(platform))  # the namespace's list has them too

    table = platform.cli("events", "ls", "ev-target")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == [
        "FUNCTION", "NAME", "SOURCE", "DETAILS", "QUALIFIER", "ORIGIN", "ENABLED",
    ]  # fmt: skip
    assert "type=com.example.order source=/shop" in table.stdout
    assert "rate(1 day)" in table.stdout

    # The gateway's refusals reach the user as one line and exit 1.
    bad_qualifier = platform.cli("events", "add", "ev-target", "late", "--cloudevents", "-q", "no-such-alias")
    assert bad_qualifier.returncode == 1
    assert bad_qualifier.stderr.startswith("error: ") and "Traceback" not in bad_qualifier.stderr
    missing = platform.cli("events", "add", "ev-ghost", "x", "--cloudevents")
    assert missing.returncode == 1 and "ev-ghost" in missing.stderr
    # A bad flag never reaches the gateway.
    usage = platform.cli("events", "add", "ev-target", "x", "--timer", "rate(1 day)", "--bucket", "photos")
    assert usage.returncode == 2 and "different event sources" in usage.stderr

    for name in ("orders", "nightly"):
        removed = platform.cli("events", "rm", "ev-target", name)
        assert removed.returncode == 0, removed.stderr
    assert listed(platform, "ev-target") == {}
    again = platform.cli("events", "rm", "ev-target", "orders")
    assert again.returncode == 1 and "orders" in again.stderr

    assert platform.cli("rm", "ev-target").returncode == 0


def test_deploy_applies_the_events_of_faas_yaml(platform: Platform, tmp_path: Path) -> None:
    folder = project(
        tmp_path,
        "ev-declared",
        "events:\n  - timer: rate(1 hour)\n  - name: orders\n    cloudevents: {type: com.example.order}\n",
    )
    deployed = platform.cli("deploy", str(folder))
    assert deployed.returncode == 0, deployed.stderr
    assert "timer-1: timer rate(1 hour)" in deployed.stdout
    assert "orders: cloudevents type=com.example.order" in deployed.stdout
    by_hand = platform.cli("events", "add", "ev-declared", "manual", "--cloudevents")
    assert by_hand.returncode == 0, by_hand.stderr
    subs = listed(platform, "ev-declared")
    assert {name: sub["origin"] for name, sub in subs.items()} == {
        "timer-1": "manifest", "orders": "manifest", "manual": "api",
    }  # fmt: skip

    # The declared set is replaced as a whole; the one added by hand stays.
    (folder / "faas.yaml").write_text(
        "name: ev-declared\nhandler: handler.handler\nevents:\n  - name: orders\n    cloudevents: {type: other}\n"
    )
    assert platform.cli("deploy", str(folder)).returncode == 0
    subs = listed(platform, "ev-declared")
    assert set(subs) == {"orders", "manual"}
    assert subs["orders"]["cloudevents"] == {"type": "other", "source": None}

    # Without an events key, deploy leaves them alone; with 'events: []' it removes the declared ones.
    (folder / "faas.yaml").write_text("name: ev-declared\nhandler: handler.handler\n")
    assert platform.cli("deploy", str(folder)).returncode == 0
    assert set(listed(platform, "ev-declared")) == {"orders", "manual"}
    (folder / "faas.yaml").write_text("name: ev-declared\nhandler: handler.handler\nevents: []\n")
    assert platform.cli("deploy", str(folder)).returncode == 0
    assert set(listed(platform, "ev-declared")) == {"manual"}

    # A declared name that one added by hand already has is refused before anything is uploaded.
    (folder / "faas.yaml").write_text(
        "name: ev-declared\nhandler: handler.handler\nevents:\n  - name: manual\n    cloudevents: {}\n"
    )
    clash = platform.cli("deploy", str(folder))
    assert clash.returncode == 1
    assert "faas events rm ev-declared manual" in clash.stderr
    versions = platform.cli("versions", "ev-declared", "-o", "json")
    assert len(json.loads(versions.stdout)) == 4  # the refused deploy made no version

    assert platform.cli("rm", "ev-declared").returncode == 0
