"""What the load generator writes: one ``CallRecord`` per call, one JSON object per line.

Times are ``time.time()`` of the load process, so they compare with the fault time the runner (another
process on the same machine) records.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

CallKind = Literal["sync", "async"]

SKIPPED = "skipped"  # ``client_error`` of a call never sent: too many calls were in flight
CANCELLED = "cancelled"  # ``client_error`` of a call in flight when the load generator was stopped


@dataclass(frozen=True, slots=True)
class CallRecord:
    kind: CallKind
    client_id: str  # unique per call; the payload is ``{"chaos": client_id}``
    sent_at: float  # just before the request was written (or when it was due, for a skipped call)
    finished_at: float
    status: int | None  # the HTTP status; None when no answer came (see ``client_error``)
    client_error: str | None = None  # no answer: timeout, connection refused, skipped, cancelled ...
    error_kind: str | None = None  # an error answer: the platform's ``error.kind`` (``unavailable`` ...)
    invocation_id: str | None = None  # async, answered 202: the id to poll
    echoed: bool | None = None  # sync, answered 200: the body was the payload (the no-op returns its event)

    @property
    def sent(self) -> bool:
        return self.client_error != SKIPPED

    @property
    def acknowledged(self) -> bool:
        return self.kind == "async" and self.status == 202 and self.invocation_id is not None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CallRecord:
        return cls(
            kind=data["kind"],
            client_id=str(data["client_id"]),
            sent_at=float(data["sent_at"]),
            finished_at=float(data["finished_at"]),
            status=data.get("status"),
            client_error=data.get("client_error"),
            error_kind=data.get("error_kind"),
            invocation_id=data.get("invocation_id"),
            echoed=data.get("echoed"),
        )


def payload_of(client_id: str) -> dict[str, str]:
    return {"chaos": client_id}


def read_records(path: Path) -> Iterator[CallRecord]:
    """Every record of a records file; a line cut short (the writer was killed) is skipped."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                data = json.loads(line)
            except ValueError:
                continue
            yield CallRecord.from_json(data)


def api_headers() -> dict[str, str]:
    """The gateway's API key for every client of the fault runner, from ``$FAAS_API_KEY`` (which
    ``ChaosPlatform.up`` sets to the platform's admin key, so the load generator inherits it)."""
    key = os.environ.get("FAAS_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}
