"""Every Redis key name the platform uses is built here."""

from __future__ import annotations

PREFIX = "faas:"


def function_logs(ns: str, name: str) -> str:
    return f"{PREFIX}logs:{ns}:{name}"
