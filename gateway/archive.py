"""Checks on an uploaded code archive before anything is stored.

Guarantees: an archive that passes is a readable zip, within the size limits, with no path escaping
its root, that contains the handler's module (``mod.py`` or ``mod/__init__.py``, nested for dotted
modules).  Each failure is an ``InvalidRequest`` or ``PayloadTooLarge`` naming the problem.
"""

from __future__ import annotations

import io
import zipfile

from faas.core.errors import InvalidRequest, PayloadTooLarge


def check_archive(data: bytes, *, handler_module: str, handler: str, max_bytes: int, max_unpacked: int) -> None:
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"code archive is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise InvalidRequest("code archive is empty")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            bad = zf.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise InvalidRequest(f"code archive is not a valid zip file: {exc}") from exc
    if bad is not None:
        raise InvalidRequest(f"code archive is corrupt: member {bad!r} fails its CRC check")
    total = 0
    names = set()
    for info in infos:
        name = info.filename
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise InvalidRequest(f"code archive member {name!r} escapes the archive root")
        total += info.file_size
        names.add(name)
    if total > max_unpacked:
        raise PayloadTooLarge(f"code archive unpacks to {total} bytes; the limit is {max_unpacked}")
    path = handler_module.replace(".", "/")
    if f"{path}.py" not in names and f"{path}/__init__.py" not in names:
        raise InvalidRequest(
            f"handler module {handler_module!r} not found in the code archive "
            f"(handler {handler!r} needs {path}.py or {path}/__init__.py at the archive root)"
        )
