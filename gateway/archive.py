"""Checks on an uploaded code archive before anything is stored.

Guarantees: an archive that passes is a readable zip, within the size limits, with no path escaping
its root, whose every member inflates to the size and CRC its header declares, and that contains the
handler's module (``mod.py`` or ``mod/__init__.py``, nested for dotted modules).  Each failure is an
``InvalidRequest`` or ``PayloadTooLarge`` naming the problem.

No archive is inflated on the event loop, and none beyond its declared sizes:

- ``check_archive_layout`` reads the central directory only (no member is inflated): the archive's
  size, each member's path, the declared unpacked total against ``max_unpacked``, and each large
  member's compression ratio against ``MAX_COMPRESSION_RATIO`` (a zip bomb declares its real size,
  so it is refused here, in microseconds, whatever it would inflate to);
- ``verify_archive_members`` then inflates every member in bounded chunks to check its CRC, and is
  meant for a worker thread (``zlib`` releases the GIL while it inflates).  ``zipfile`` stops reading
  a member at its declared size, so a member that lies about its size inflates no further than the
  size it declared, already within the limit, and then fails its CRC.
"""

from __future__ import annotations

import io
import zipfile
import zlib

from faas.core.errors import InvalidRequest, PayloadTooLarge

# A member that unpacks to more than RATIO_FLOOR_BYTES may be at most this many times its compressed
# size.  Source code and data compress 3-20x; zeros compress about 1000x.
MAX_COMPRESSION_RATIO = 200
RATIO_FLOOR_BYTES = 1024 * 1024
VERIFY_CHUNK_BYTES = 1024 * 1024


def check_archive_layout(
    data: bytes, *, handler_module: str, handler: str, max_bytes: int, max_unpacked: int
) -> None:
    """What the archive's central directory says, checked without inflating anything."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"code archive is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise InvalidRequest("code archive is empty")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise InvalidRequest(f"code archive is not a valid zip file: {exc}") from exc
    total = 0
    names = set()
    for info in infos:
        name = info.filename
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise InvalidRequest(f"code archive member {name!r} escapes the archive root")
        if info.flag_bits & 0x1:
            raise InvalidRequest(f"code archive member {name!r} is encrypted")
        if info.file_size > RATIO_FLOOR_BYTES and info.file_size > MAX_COMPRESSION_RATIO * max(
            info.compress_size, 1
        ):
            raise InvalidRequest(
                f"code archive member {name!r} declares {info.file_size} bytes from {info.compress_size} compressed "
                f"(more than {MAX_COMPRESSION_RATIO}x): refused as a likely zip bomb"
            )
        total += info.file_size
        if total > max_unpacked:
            raise PayloadTooLarge(
                f"code archive declares more than {max_unpacked} unpacked bytes (the limit)"
            )
        names.add(name)
    path = handler_module.replace(".", "/")
    if f"{path}.py" not in names and f"{path}/__init__.py" not in names:
        raise InvalidRequest(
            f"handler module {handler_module!r} not found in the code archive "
            f"(handler {handler!r} needs {path}.py or {path}/__init__.py at the archive root)"
        )


def verify_archive_members(data: bytes) -> None:
    """Inflate every member (at most its declared size, in bounded chunks) and check its CRC."""
    name = "?"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                name = info.filename
                with zf.open(info) as member:
                    while member.read(VERIFY_CHUNK_BYTES):
                        pass
    except zipfile.BadZipFile as exc:
        raise InvalidRequest(f"code archive is corrupt: member {name!r}: {exc}") from exc
    except (zlib.error, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise InvalidRequest(f"code archive member {name!r} cannot be read: {exc}") from exc
