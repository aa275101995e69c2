"""Errors of the ``faas`` command itself, raised before anything is sent to the platform."""

from __future__ import annotations

from faas.core.errors import InvalidRequest


class UsageError(InvalidRequest):
    """The command line is wrong; nothing was sent (exit status 2)."""
