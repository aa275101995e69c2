"""The function host: one process that becomes one instance of one function version.

Started as ``python -S -E host.py --socket PATH --cache-dir DIR --instance-id ID``.  It imports the
standard library only, so the user's code sees the standard library and its own archive, nothing of
the platform.  It serves HTTP/1.1 with keep-alive on a unix socket; the wire contract is in
``docs/contracts.md`` ("Function host").  Each connection has a thread of its own that reads with
blocking calls and runs a sync handler itself, so a warm call crosses no thread and no event loop
(an asyncio event loop in pure Python costs several times more per call than the handler); async
handlers run on the main thread's loop.

Lifecycle: *generic* (started, answering ``GET /_/health``) -> one ``POST /_/specialize`` -> *ready*.
A failed specialisation is answered with ``instance_start_error`` and then the process exits: a host is
specialised at most once and never reused after a failure.  A failure of the user's code or archive
(the handler module's import raised, no such handler, a bad zip) carries ``"fault": "function"``;
the others (download, checksum, cache, a bad request) carry none and count as the platform's.

Guarantees:

- At most ``concurrency`` invocations run at once; one more is refused at once with 429 (no queue).
- Every invocation is answered within its budget, ``min(timeout_s, X-Faas-Deadline-Ms - now)``.  An
  async handler that overruns is cancelled and the host stays, unless the event loop does not get to
  the cancellation within ``ASYNC_UNWIND_GRACE_S`` (a handler blocking the loop): then the host
  retires as below.  A sync handler cannot be stopped in its
  thread, so the host answers 504 with ``X-Faas-Retire: 1``, refuses new invocations (429 with the same
  header) and exits as soon as every other admitted invocation has been answered.  A ``MemoryError``
  retires the host the same way (507).
- Anything the handler raises, ``SystemExit`` included, is a ``function_error`` (500); the host stays.
- Text written to ``sys.stdout`` / ``sys.stderr`` while a handler runs (in its connection thread or
  its asyncio tasks) is returned with that invocation only, truncated to 64 KiB with a marker.
- The code archive is verified against its sha256 before use and unpacked once per sha256 into the
  shared cache dir through an atomic rename; hosts sharing the cache reuse each other's result.  The
  node agent evicts a dir from the cache only when no host of its node runs or is specialising with
  it, by renaming it away first (``code_cache``): a host finds either the whole dir or none.
- Host diagnostics go to the real stderr; nothing reaches the real stdout except handler output
  written outside any invocation (for instance at import time).

Caveats:

- Output from threads the handler starts itself (``threading.Thread`` does not copy contextvars) and
  bytes written to ``sys.stdout.buffer`` go to the host's log, not to the invocation.
- The unpacked code dir is shared by every host of the same archive and is the working directory; a
  handler that writes into it affects the others.
- The memory cap is ``RLIMIT_AS`` (address space, not resident memory), set once specialised; it is
  best-effort (see ``_apply_memory_limit``).
- A handler module named like a standard-library module the host has already imported (``json``,
  ``asyncio``, ...) cannot be loaded; specialisation says so.
- An empty invoke body is the event ``{}`` (as an AWS Lambda invoke without payload).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextvars
import hashlib
import http.client
import importlib
import inspect
import itertools
import json
import math
import os
import resource
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
import zipfile
import zlib
from typing import Any

MIB = 1024 * 1024
MAX_ARCHIVE_BYTES = 512 * MIB
MAX_UNPACKED_BYTES = 512 * MIB
# As the gateway's upload check (gateway/archive.py): a member over RATIO_FLOOR_BYTES may unpack to at
# most MAX_COMPRESSION_RATIO times its compressed size.
MAX_COMPRESSION_RATIO = 200
RATIO_FLOOR_BYTES = 1 * MIB
MAX_REQUEST_BODY_BYTES = 64 * MIB
MAX_LOG_CHARS = 64 * 1024
DOWNLOAD_TIMEOUT_S = 30.0
DOWNLOAD_CHUNK_BYTES = 1 * MIB
# RLIMIT_AS counts address space, not resident memory: the interpreter, its shared libraries and the
# malloc arenas reserve a few hundred MiB that a function never "uses".  Without this allowance a
# 128 MiB function would fail its first allocations.
MEMORY_OVERHEAD_MIB = 384
TRACEBACK_FRAMES = 20
CLOSE_FLUSH_TIMEOUT_S = 2.0
MAX_HEAD_BYTES = 64 * 1024
READ_CHUNK_BYTES = 64 * 1024
LISTEN_BACKLOG = 1024
# One thread per connection; callers keep about one connection per concurrency slot.
MAX_CONNECTIONS = 1024
# Threads beyond one per slot that the memory cap leaves room for: the acceptor, the watchdog, the
# connections of health checks.
SPARE_THREADS = 4
# How long an async handler past its timeout may take to unwind once cancelled before the host takes
# the loop for blocked and retires.
ASYNC_UNWIND_GRACE_S = 1.0
M_ARENA_MAX = -8  # mallopt's parameter number (glibc malloc.h)
MALLOC_ARENAS = 2

EXIT_SIGNALLED = 0
EXIT_START_FAILED = 3
EXIT_RETIRED = 4

_HOST_FILE = __file__

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    409: b"Conflict",
    413: b"Payload Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    507: b"Insufficient Storage",
}


def _diag(message: str) -> None:
    """Host diagnostics: always the real stderr, never an invocation's captured output."""
    stream = sys.__stderr__
    if stream is None:
        return
    try:
        stream.write(f"faas-host[{os.getpid()}]: {message}\n")
        stream.flush()
    except (OSError, ValueError):
        pass


# --------------------------------------------------------------------------------------------------
# Output capture


class _LogBuffer:
    """One invocation's captured output, truncated to ``MAX_LOG_CHARS`` characters."""

    __slots__ = ("parts", "size", "dropped")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.dropped = 0

    def write(self, text: str) -> None:
        room = MAX_LOG_CHARS - self.size
        if len(text) <= room:
            self.parts.append(text)
            self.size += len(text)
            return
        if room > 0:
            self.parts.append(text[:room])
            self.size = MAX_LOG_CHARS
        self.dropped += len(text) - max(room, 0)

    def getvalue(self) -> str:
        text = "".join(self.parts)
        if self.dropped:
            text += f"\n[... output truncated at 64 KiB: {self.dropped} more characters dropped ...]\n"
        return text


_current_log: contextvars.ContextVar[_LogBuffer | None] = contextvars.ContextVar(
    "faas_current_log", default=None
)


class _CapturingStream:
    """Stands in for sys.stdout / sys.stderr: writes go to the current invocation's buffer if any.

    The buffer is found through a contextvar, which asyncio tasks inherit and which the connection
    thread running a sync handler sets around the call, so concurrent invocations never see each other's output.
    """

    def __init__(self, real: Any) -> None:
        self._real = real

    def write(self, text: str) -> int:
        buffer = _current_log.get()
        if buffer is None:
            return self._real.write(text)
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        buffer.write(text)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if _current_log.get() is None:
            self._real.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


# --------------------------------------------------------------------------------------------------
# What the handler sees


class InvocationContext:
    """The ``context`` argument of a handler (the familiar subset of AWS Lambda's)."""

    __slots__ = (
        "request_id",
        "aws_request_id",
        "function_name",
        "function_version",
        "namespace",
        "memory_limit_in_mb",
        "invoked_function_arn",
        "_deadline",
    )

    def __init__(
        self,
        *,
        request_id: str,
        function_name: str,
        function_version: str,
        namespace: str,
        memory_limit_in_mb: int,
        deadline_monotonic: float,
    ) -> None:
        self.request_id = request_id
        self.aws_request_id = request_id
        self.function_name = function_name
        self.function_version = function_version
        self.namespace = namespace
        self.memory_limit_in_mb = memory_limit_in_mb
        self.invoked_function_arn = f"arn:faas:{namespace}:function:{function_name}:{function_version}"
        self._deadline = deadline_monotonic

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))

    def __repr__(self) -> str:
        return (
            f"InvocationContext(request_id={self.request_id!r}, function_name={self.function_name!r}, "
            f"function_version={self.function_version!r}, namespace={self.namespace!r})"
        )


def _call_sync(handler: Any, event: Any, context: InvocationContext) -> tuple[bool, Any]:
    # Runs in the connection's thread.  Returning the exception instead of raising keeps BaseExceptions
    # (SystemExit, KeyboardInterrupt) from ending the thread: every failure of user code is answered.
    try:
        return True, handler(event, context)
    except BaseException as exc:  # noqa: BLE001 - every failure of user code is a function error
        return False, exc


async def _call_async(handler: Any, event: Any, context: InvocationContext) -> tuple[bool, Any]:
    try:
        return True, await handler(event, context)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # noqa: BLE001 - see _call_sync
        return False, exc


def _describe(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a user exception whose __str__ itself fails
        return f"<{type(exc).__name__} whose str() failed>"


def _user_frames(exc: BaseException) -> list[str]:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != _HOST_FILE]
    out = []
    for frame in frames[-TRACEBACK_FRAMES:]:
        text = f'File "{frame.filename}", line {frame.lineno}, in {frame.name}'
        if frame.line:
            text += f": {frame.line}"
        out.append(text)
    return out


# --------------------------------------------------------------------------------------------------
# Specialisation: fetch, verify, unpack, import


class _StartError(Exception):
    """Specialisation failed; answered as ``instance_start_error`` and then the host exits.

    ``user_fault``: the user's code or archive is the cause (answered with ``"fault": "function"``),
    so trying again on another host would fail the same way."""

    def __init__(
        self,
        message: str,
        error_type: str,
        *,
        status: int = 502,
        frames: list[str] | None = None,
        user_fault: bool = False,
    ):
        super().__init__(message)
        self.message = message
        self.error_type = error_type
        self.status = status
        self.frames = frames
        self.user_fault = user_fault


def _bad_spec(field: str, why: str) -> _StartError:
    return _StartError(f"invalid specialize request: {field} {why}", "InvalidRequest", status=400)


def _require_int(raw: dict[str, Any], field: str, *, minimum: int | None) -> int:
    value = raw.get(field)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad_spec(field, "must be an integer")
    if minimum is not None and value < minimum:
        raise _bad_spec(field, f"must be at least {minimum}")
    return value


class _Spec:
    __slots__ = (
        "code_url",
        "sha256",
        "handler",
        "namespace",
        "function",
        "version",
        "memory_mb",
        "timeout_s",
        "concurrency",
        "environment",
        "kind",
        "readiness_path",
    )

    def __init__(self, raw: Any) -> None:
        bad = _bad_spec
        if not isinstance(raw, dict):
            raise bad("body", "must be a JSON object")
        self.kind: str = raw.get("kind") or "function"
        if self.kind not in ("function", "app"):
            raise bad("kind", "must be 'function' or 'app'")
        # A function's handler is 'module.function'; an app's entry (sent as 'handler') 'module:attr'.
        for field in ("code_url", "sha256", "handler", "namespace", "function"):
            if not isinstance(raw.get(field), str) or not raw[field]:
                raise bad(field, "must be a non-empty string")
        self.code_url: str = raw["code_url"]
        self.sha256: str = raw["sha256"].lower()
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise bad("sha256", "must be 64 hex digits")
        self.handler: str = raw["handler"]
        module, _, attr = self.handler.rpartition(":" if self.kind == "app" else ".")
        if not module or not attr:
            raise bad("handler", "must look like 'module:app'" if self.kind == "app" else "must look like 'module.function'")
        readiness = raw.get("readiness_path") or "/"
        if not isinstance(readiness, str) or not readiness.startswith("/"):
            raise bad("readiness_path", "must be a path starting with '/'")
        self.readiness_path: str = readiness
        self.namespace: str = raw["namespace"]
        self.function: str = raw["function"]
        self.version = _require_int(raw, "version", minimum=None)
        self.memory_mb = _require_int(raw, "memory_mb", minimum=1)
        self.concurrency = _require_int(raw, "concurrency", minimum=1)
        timeout_s = raw.get("timeout_s")
        if not isinstance(timeout_s, int | float) or isinstance(timeout_s, bool) or not timeout_s > 0:
            raise bad("timeout_s", "must be a positive number")
        self.timeout_s = float(timeout_s)
        environment = raw.get("environment") or {}
        if not isinstance(environment, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in environment.items()
        ):
            raise bad("environment", "must map strings to strings")
        self.environment: dict[str, str] = environment


def _download(url: str, dest: str, expected_sha256: str) -> None:
    if not url.startswith(("http://", "https://")):
        raise _StartError("cannot download the code archive: code_url must be an http(s) URL", "InvalidURL")
    digest = hashlib.sha256()
    total = 0
    give_up_at = time.monotonic() + DOWNLOAD_TIMEOUT_S
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as out:
            while chunk := response.read(DOWNLOAD_CHUNK_BYTES):
                total += len(chunk)
                if total > MAX_ARCHIVE_BYTES:
                    raise _StartError(
                        "code archive is larger than 512 MiB", "ArchiveTooLarge", user_fault=True
                    )
                if time.monotonic() > give_up_at:
                    raise _StartError(
                        f"cannot download the code archive: no complete download within {DOWNLOAD_TIMEOUT_S:g} s",
                        "DownloadError",
                    )
                digest.update(chunk)
                out.write(chunk)
    except urllib.error.HTTPError as exc:
        raise _StartError(
            f"cannot download the code archive: HTTP {exc.code} {exc.reason}", "DownloadError"
        ) from exc
    except urllib.error.URLError as exc:
        raise _StartError(f"cannot download the code archive: {exc.reason}", "DownloadError") from exc
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise _StartError(f"cannot download the code archive: {exc}", "DownloadError") from exc
    got = digest.hexdigest()
    if got != expected_sha256:
        raise _StartError(
            f"code archive sha256 mismatch: expected {expected_sha256}, got {got}", "ChecksumMismatch"
        )


def _is_unsafe_member(name: str) -> bool:
    normalised = name.replace("\\", "/")
    return (
        normalised.startswith("/")
        or (len(normalised) > 1 and normalised[1] == ":")  # a Windows drive
        or ".." in normalised.split("/")
    )


def _unpack(archive: str, dest: str) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _StartError("code archive is not a valid zip file", "BadZipFile", user_fault=True) from exc
    with zf:
        total = 0
        for info in zf.infolist():
            if _is_unsafe_member(info.filename):
                raise _StartError(
                    f"code archive contains an unsafe path: {info.filename!r}",
                    "UnsafeArchive",
                    user_fault=True,
                )
            # file_size is what extraction will produce at most: zipfile stops reading there.
            if info.file_size > RATIO_FLOOR_BYTES and info.file_size > MAX_COMPRESSION_RATIO * max(
                info.compress_size, 1
            ):
                raise _StartError(
                    f"code archive member {info.filename!r} declares {info.file_size} bytes from "
                    f"{info.compress_size} compressed (more than {MAX_COMPRESSION_RATIO}x): a likely zip bomb",
                    "UnsafeArchive",
                    user_fault=True,
                )
            total += info.file_size
        if total > MAX_UNPACKED_BYTES:
            raise _StartError(
                f"code archive unpacks to {total} bytes, more than the limit of 512 MiB",
                "ArchiveTooLarge",
                user_fault=True,
            )
        os.mkdir(dest)
        try:
            zf.extractall(dest)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
            raise _StartError(
                f"code archive is not a valid zip file: {exc}", "BadZipFile", user_fault=True
            ) from exc


def _fetch_code(cache_dir: str, code_url: str, sha256: str) -> str:
    """The unpacked code dir for ``sha256``, downloading and unpacking it unless another host did."""
    final = os.path.join(cache_dir, sha256)
    if os.path.isdir(final):
        return final
    staging = tempfile.mkdtemp(prefix=f".unpack-{sha256[:16]}-", dir=cache_dir)
    try:
        archive = os.path.join(staging, "archive.zip")
        _download(code_url, archive, sha256)
        unpacked = os.path.join(staging, "code")
        _unpack(archive, unpacked)
        try:
            os.rename(unpacked, final)
        except OSError as exc:
            # Another host renamed the same verified content into place first: use theirs.
            if not os.path.isdir(final):
                raise _StartError(f"cannot store the unpacked code archive: {exc}", "OSError") from exc
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _is_within(path: str, directory: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(directory) + os.sep)


def _load_handler(spec: _Spec, code_dir: str) -> Any:
    os.environ.update(spec.environment)
    sys.path.insert(0, code_dir)
    os.chdir(code_dir)
    importlib.invalidate_caches()
    module_name, _, attr = spec.handler.rpartition(":" if spec.kind == "app" else ".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise _StartError(
                f"handler module {module_name!r} not found in the code archive (handler {spec.handler!r})",
                "ModuleNotFoundError",
                user_fault=True,
            ) from exc
        raise _StartError(
            f"importing handler module {module_name!r} raised ModuleNotFoundError: {exc}",
            "ModuleNotFoundError",
            frames=_user_frames(exc),
            user_fault=True,
        ) from exc
    except BaseException as exc:  # noqa: BLE001 - SystemExit at import time is the user's error too
        # Whatever it raised (TimeoutError and OSError included, which the platform's own start
        # failures are also named) is the user's: user_fault says so, the type name cannot.
        raise _StartError(
            f"importing handler module {module_name!r} raised {type(exc).__name__}: {exc}",
            type(exc).__name__,
            frames=_user_frames(exc),
            user_fault=True,
        ) from exc
    origin = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", None) or ()), None)
    if origin is None or not _is_within(origin, code_dir):
        raise _StartError(
            f"handler module {module_name!r} is not in the code archive: the name resolves to "
            f"{origin or 'a built-in module'}; rename the module",
            "ImportError",
            user_fault=True,
        )
    handler = getattr(module, attr, None)
    what = "app" if spec.kind == "app" else "function"
    if handler is None:
        raise _StartError(f"module {module_name!r} has no {what} {attr!r}", "AttributeError", user_fault=True)
    if not callable(handler):
        if spec.kind == "app":
            raise _StartError(
                f"entry {spec.handler!r} is a {type(handler).__name__}, not a WSGI or ASGI app", "TypeError",
                user_fault=True,
            )
        raise _StartError(f"handler {spec.handler!r} is not callable", "TypeError", user_fault=True)
    return handler


def _load_app_host() -> Any:
    """``app_host.py`` from beside this file, under a private module name (the user's code cannot
    import it by accident: this folder is not on ``sys.path``)."""
    import importlib.util

    name = "_faas_app_host"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(os.path.dirname(os.path.abspath(_HOST_FILE)), "app_host.py")
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise _StartError(f"the app server is missing ({path})", "FileNotFoundError")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except OSError as exc:
        del sys.modules[name]
        raise _StartError(f"the app server cannot be loaded: {exc}", type(exc).__name__) from exc
    return module


def _is_async_callable(handler: Any) -> bool:
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(handler, "__call__", None)  # noqa: B004 - an object with an async __call__
    return not inspect.isfunction(handler) and inspect.iscoroutinefunction(call)


def _mapped_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _limit_malloc_arenas() -> None:
    """Keep glibc's malloc to ``MALLOC_ARENAS`` arenas however many threads there are.

    Each thread that allocates would get an arena of its own, reserving 64 MiB of address space
    (which ``RLIMIT_AS`` counts).  Under the memory cap those reservations fail, and glibc tries
    again on later allocations: measured, 6 failed ``mmap`` calls per warm call at concurrency 16, and
    twice the host's system CPU.  A no-op where the C library is not glibc."""
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (ImportError, OSError, AttributeError):
        pass


def _apply_memory_limit(memory_mb: int, concurrency: int) -> None:
    """Cap the address space at ``memory_mb`` plus the host's overhead; silently skip if refused.

    The overhead is ``MEMORY_OVERHEAD_MIB`` (interpreter, libraries, malloc arenas) plus one stack
    reservation per connection thread that runs handlers, a few spare (each thread reserves its full
    stack size up front).  It never goes
    below what is mapped already plus ``memory_mb``: heavy imports (numpy, BLAS thread pools) can
    reserve more address space than the fixed allowance before the first invocation.
    """
    try:
        stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
        if stack == resource.RLIM_INFINITY or stack <= 0:
            stack = 8 * MIB
        limit = (memory_mb + MEMORY_OVERHEAD_MIB) * MIB + (concurrency + SPARE_THREADS) * stack
        limit = max(limit, _mapped_bytes() + memory_mb * MIB)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
        pass


# --------------------------------------------------------------------------------------------------
# HTTP


class _Response:
    __slots__ = ("status", "body", "retire", "close", "exit_code", "admitted", "headers")

    def __init__(
        self,
        status: int,
        payload: Any,
        *,
        retire: bool = False,
        close: bool = False,
        exit_code: int | None = None,
        body: bytes | None = None,
        headers: bytes = b"",
    ) -> None:
        self.status = status
        self.headers = headers  # extra header lines, each ending in CRLF
        self.body = body if body is not None else json.dumps(payload).encode()
        self.retire = retire
        self.close = close or retire or exit_code is not None
        self.exit_code = exit_code
        self.admitted = False  # an admitted invocation: counted until its response is written


def _error(status: int, kind: str, error_type: str, message: str, **extra: Any) -> _Response:
    payload: dict[str, Any] = {"error": {"kind": kind, "type": error_type, "message": message}}
    payload.update(extra)
    return _Response(status, payload)


def _invoke_error(status: int, kind: str, error_type: str, message: str) -> _Response:
    """An invocation refused before its handler ran: no output, no duration."""
    body = json.dumps({"error": {"kind": kind, "type": error_type, "message": message}}).encode()
    headers = (
        b"X-Faas-Duration-Ms: 0.000\r\nX-Faas-Logs-Bytes: 0\r\nX-Faas-Error-Kind: %s\r\n" % kind.encode()
    )
    return _Response(status, None, body=body, headers=headers)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _parse_head(head: bytes) -> tuple[bytes, bytes, dict[bytes, bytes], bool]:
    lines = head[:-4].split(b"\r\n")
    while lines and not lines[0]:  # tolerate stray CRLFs between requests
        del lines[0]
    try:
        method, target, version = lines[0].split(b" ", 2)
    except (ValueError, IndexError):
        raise _BadRequest(400, "malformed request line") from None
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise _BadRequest(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    connection = headers.get(b"connection", b"").lower()
    if version == b"HTTP/1.1":
        keep_alive = connection != b"close"
    else:
        keep_alive = connection == b"keep-alive"
    path = target.split(b"?", 1)[0]
    return method, path, headers, keep_alive


# --------------------------------------------------------------------------------------------------
# The host


class FunctionHost:
    """State of one host process.

    Threads: the main thread runs an asyncio loop that specialises (imports happen there, so modules
    may install signal handlers) and runs async handlers; an acceptor thread hands every connection
    to a thread of its own, which reads requests with blocking calls and runs a sync handler itself
    (no hand-off between threads on the warm path); a watchdog thread answers sync invocations that
    overrun their budget.  ``lock`` guards the counters and ``retiring``.
    """

    def __init__(
        self, *, socket_path: str, cache_dir: str, instance_id: str, tcp_port: int | None = None
    ) -> None:
        self.socket_path = socket_path  # "" when serving on tcp_port instead
        self.tcp_port = tcp_port
        self.cache_dir = cache_dir
        self.instance_id = instance_id
        self.state = "generic"
        self.specializing = False
        self.retiring = False
        self.spec: _Spec | None = None
        self.handler: Any = None
        self.handler_is_async = False
        self.app_server: Any = None  # an app_host.AppServer once specialised as an app
        self.lock = threading.Lock()
        self.inflight = 0  # concurrency slots taken (a handler still running)
        self.open_invocations = 0  # admitted invocations whose response is not written yet
        self.invocations = 0
        self.connections = 0
        self.thread_numbers = itertools.count(1)
        self.last_active = time.monotonic()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.watchdog = _Watchdog(self)

    # -- process ------------------------------------------------------------------------------------

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        # A plain handler, not loop.add_signal_handler: it also runs while the loop thread is busy
        # (a module importing for minutes, a handler blocking the loop), so SIGTERM always ends us.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        listener = self._listen()
        threading.Thread(target=self._accept_forever, args=(listener,), name="acceptor", daemon=True).start()
        await self.loop.create_future()  # forever: the loop serves specialisation and async handlers

    def _listen(self) -> socket.socket:
        if self.tcp_port is not None:
            # For benchmarks only (load generators that speak TCP, not unix sockets): loopback, never
            # another interface, since the host has no authentication of its own.
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.tcp_port))
            where = f"127.0.0.1:{listener.getsockname()[1]}"
        else:
            try:
                if stat.S_ISSOCK(os.stat(self.socket_path).st_mode):
                    os.unlink(self.socket_path)  # a predecessor's stale socket
            except FileNotFoundError:
                pass
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(self.socket_path)
            try:
                os.chmod(self.socket_path, 0o600)
            except OSError:
                pass
            where = self.socket_path
        listener.listen(LISTEN_BACKLOG)
        _diag(f"generic host {self.instance_id} listening on {where}")
        return listener

    def _accept_forever(self, listener: socket.socket) -> None:
        tcp = listener.family == socket.AF_INET
        while True:
            try:
                conn, _ = listener.accept()
            except OSError as exc:  # out of file descriptors, for instance: try again shortly
                _diag(f"accept failed: {exc}")
                time.sleep(0.05)
                continue
            if tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                admitted = self.connections < MAX_CONNECTIONS
                if admitted:
                    self.connections += 1
            if admitted:
                try:
                    name = f"handler-{next(self.thread_numbers)}"  # the thread a sync handler runs in
                    threading.Thread(
                        target=self._serve_connection, args=(conn,), name=name, daemon=True
                    ).start()
                    continue
                except RuntimeError:  # no thread to be had (address space, pids): refuse this one
                    with self.lock:
                        self.connections -= 1
            _refuse(conn)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.exit(EXIT_SIGNALLED)

    def exit(self, code: int) -> None:
        # os._exit: a handler thread that never returns must not keep the process alive, and nothing
        # of the interpreter's orderly shutdown is needed.
        for stream in (sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError, RuntimeError):  # RuntimeError: a reentrant flush
                pass
        if self.socket_path:
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        os._exit(code)

    # -- connections --------------------------------------------------------------------------------

    def _serve_connection(self, conn: socket.socket) -> None:
        reader = _Reader(conn)
        handed_over = False
        try:
            while True:
                try:
                    head = reader.head()
                    if head is None:
                        return  # the peer closed the connection between requests
                    method, path, headers, keep_alive = _parse_head(head)
                    if self.app_server is not None and path.startswith(b"/_/app"):
                        # An app's request: the app server serves this connection from now on.
                        self.app_server.adopt(conn, head, bytes(reader.buffer))
                        handed_over = True
                        return
                    if b"transfer-encoding" in headers:
                        raise _BadRequest(501, "chunked request bodies are not supported")
                    try:
                        length = int(headers.get(b"content-length", b"0"))
                    except ValueError:
                        length = -1
                    if length < 0:
                        raise _BadRequest(400, "bad Content-Length")
                    if length > MAX_REQUEST_BODY_BYTES:
                        raise _BadRequest(413, "request body too large")
                except _BadRequest as exc:
                    kind, error_type = _BAD_REQUEST_KINDS.get(exc.status, ("invalid_request", "BadRequest"))
                    _send(conn, _error(exc.status, kind, error_type, str(exc)), False)
                    return
                body = reader.body(length)
                invocation = _Invocation(conn)
                try:
                    response = self._route(method, path, headers, body, invocation)
                except Exception as exc:  # noqa: BLE001 - a host bug answers 500, the host keeps serving
                    _diag("error handling a request:\n" + traceback.format_exc())
                    response = _error(
                        500, "platform_error", type(exc).__name__, f"function host error: {exc}"
                    )
                if not invocation.claim():
                    # The watchdog answers it (the handler overran): the socket is closed only once
                    # that answer is written, or its descriptor could be reused under the watchdog.
                    invocation.answered.wait(CLOSE_FLUSH_TIMEOUT_S + 1.0)
                    return
                keep_alive = keep_alive and not response.close
                try:
                    _send(conn, response, keep_alive)
                finally:
                    if response.admitted:
                        self._answered()
                    if response.exit_code is not None:
                        self.exit(response.exit_code)
                if not keep_alive:
                    return
        except OSError:
            return  # the client went away (reset, or closed in the middle of a request)
        finally:
            if not handed_over:
                conn.close()
            with self.lock:
                self.connections -= 1

    def _answered(self) -> None:
        """One admitted invocation's response is written: a retiring host exits after its last."""
        with self.lock:
            self.open_invocations -= 1
            last = self.retiring and self.open_invocations == 0
        if last:
            _diag("retiring: every admitted invocation is answered, exiting")
            self.exit(EXIT_RETIRED)

    def _route(
        self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes, invocation: _Invocation
    ) -> _Response:
        if path == b"/_/invoke":
            if method != b"POST":
                return _error(405, "invalid_request", "MethodNotAllowed", "use POST")
            return self._invoke(headers, body, invocation)
        if path == b"/_/health":
            if method != b"GET":
                return _error(405, "invalid_request", "MethodNotAllowed", "use GET")
            return self._health()
        if path == b"/_/specialize":
            if method != b"POST":
                return _error(405, "invalid_request", "MethodNotAllowed", "use POST")
            assert self.loop is not None
            return asyncio.run_coroutine_threadsafe(self._specialize(body), self.loop).result()
        return _error(404, "not_found", "NotFound", f"no route {path.decode(errors='replace')}")

    # -- health -------------------------------------------------------------------------------------

    def _health(self) -> _Response:
        return _Response(200, self._health_payload())

    def _health_payload(self) -> dict[str, Any]:
        server = self.app_server
        inflight = self.inflight if server is None else server.inflight
        idle_s = 0.0 if inflight else time.monotonic() - self.last_active
        return {
            "state": self.state,
            "inflight": inflight,
            "idle_s": round(idle_s, 3),
            "invocations": self.invocations if server is None else server.requests,
            "pid": os.getpid(),
        }

    # -- specialise ---------------------------------------------------------------------------------

    async def _specialize(self, body: bytes) -> _Response:
        if self.state != "generic" or self.specializing:
            return _error(409, "conflict", "AlreadySpecialized", "this host is already specialised")
        self.specializing = True
        started = time.perf_counter()
        try:
            try:
                raw = json.loads(body)
            except ValueError as exc:
                raise _StartError(
                    "invalid specialize request: body is not JSON", "InvalidRequest", status=400
                ) from exc
            spec = _Spec(raw)
            code_dir = await asyncio.to_thread(_fetch_code, self.cache_dir, spec.code_url, spec.sha256)
            # Imported on the loop thread, the main thread: modules may install signal handlers.
            handler = _load_handler(spec, code_dir)
            if spec.kind == "app":
                await self._start_app(spec, handler)
        except _StartError as exc:
            _diag(f"specialisation failed ({exc.error_type}): {exc.message}")
            return self._start_failure(exc.status, exc.error_type, exc.message, exc.frames, exc.user_fault)
        except Exception as exc:  # noqa: BLE001 - a host bug still ends as a clear start error
            _diag("specialisation failed unexpectedly:\n" + traceback.format_exc())
            return self._start_failure(502, type(exc).__name__, f"specialisation failed: {exc}", None, False)
        self.handler = handler
        self.handler_is_async = _is_async_callable(handler)
        _apply_memory_limit(spec.memory_mb, spec.concurrency)
        self.last_active = time.monotonic()
        self.spec = spec  # last: a connection thread that sees the spec sees the handler too
        self.state = "ready"
        self.specializing = False
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        _diag(
            f"specialised as {spec.namespace}/{spec.function}:{spec.version} ({spec.handler}) in {duration_ms} ms"
        )
        return _Response(200, {"state": "ready", "duration_ms": duration_ms})

    async def _start_app(self, spec: _Spec, app: Any) -> None:
        """Serve ``app`` (WSGI or ASGI): lifespan startup, then its readiness request, before the
        host says it is ready."""
        app_host = _load_app_host()
        server = app_host.AppServer(
            app, concurrency=spec.concurrency, timeout_s=spec.timeout_s, diag=_diag,
            health=lambda: (200, self._health_payload()),
        )  # fmt: skip
        try:
            await server.start(spec.readiness_path)
        except app_host.AppStartError as exc:
            raise _StartError(str(exc), "AppStartError", user_fault=True) from exc
        except BaseException as exc:  # noqa: BLE001 - whatever the app's startup raised is the user's
            raise _StartError(
                f"the app's startup raised {type(exc).__name__}: {exc}", type(exc).__name__,
                frames=_user_frames(exc), user_fault=True,
            ) from exc
        self.app_server = server

    @staticmethod
    def _start_failure(
        status: int, error_type: str, message: str, frames: list[str] | None, user_fault: bool
    ) -> _Response:
        error: dict[str, Any] = {"kind": "instance_start_error", "type": error_type, "message": message}
        if user_fault:
            error["fault"] = "function"
        if frames:
            error["traceback"] = frames
        return _Response(status, {"error": error}, exit_code=EXIT_START_FAILED)

    # -- invoke -------------------------------------------------------------------------------------

    def _invoke(self, headers: dict[bytes, bytes], body: bytes, invocation: _Invocation) -> _Response:
        spec = self.spec
        if spec is None:
            return _invoke_error(409, "conflict", "NotSpecialized", "this host is not specialised")
        if self.app_server is not None:
            return _invoke_error(409, "conflict", "NotAFunction", "this instance serves an app: send /_/app requests")
        with self.lock:
            retiring = self.retiring
            busy = self.inflight >= spec.concurrency
            if not (retiring or busy):
                # Admitted: the slot is taken and the call counted in one step, so a host retiring
                # meanwhile waits for its answer; both are given back below if the call is refused.
                self.inflight += 1
                self.open_invocations += 1
        if retiring:
            response = _invoke_error(429, "too_many_requests", "TooManyRequests", "this instance is retiring")
            response.retire = True
            response.close = True
            return response
        if busy:
            return _invoke_error(
                429,
                "too_many_requests",
                "TooManyRequests",
                f"all {spec.concurrency} concurrency slots of this instance are busy",
            )
        slot = _Slot(self)
        try:
            refused = self._check_call(headers, body, spec)
        except BaseException:  # MemoryError or RecursionError parsing the event: nothing was admitted
            self._refused(slot)
            raise
        if isinstance(refused, _Response):
            self._refused(slot)
            return refused
        event, budget, deadline_bound = refused

        request_id = headers.get(b"x-faas-request-id", b"").decode(errors="replace") or uuid.uuid4().hex
        started_monotonic = time.monotonic()
        context = InvocationContext(
            request_id=request_id,
            function_name=spec.function,
            function_version=str(spec.version),
            namespace=spec.namespace,
            memory_limit_in_mb=spec.memory_mb,
            deadline_monotonic=started_monotonic + budget,
        )
        logs = _LogBuffer()
        with self.lock:
            self.invocations += 1
        invocation.deadline = started_monotonic + budget
        invocation.timeout = (budget, deadline_bound, spec.timeout_s)
        invocation.slot = slot
        invocation.logs = logs
        started = invocation.started = time.perf_counter()
        if self.handler_is_async:
            outcome = self._run_async(event, context, logs, slot, budget)
        else:
            self.watchdog.watch(invocation)
            token = _current_log.set(logs)
            try:
                outcome = _call_sync(self.handler, event, context)
            finally:
                _current_log.reset(token)
                self.watchdog.unwatch(invocation)
                slot.release()
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        if outcome is None:
            status, payload = self._timed_out(budget, deadline_bound, spec.timeout_s, sync=False)
        else:
            status, payload = self._outcome(*outcome)
        response = self._answer(status, payload, logs.getvalue(), duration_ms)
        response.admitted = True
        return response

    def _refused(self, slot: _Slot) -> None:
        """An admitted call refused before its handler ran: its slot and its count given back."""
        slot.release()
        self._answered()

    def _check_call(
        self, headers: dict[bytes, bytes], body: bytes, spec: _Spec
    ) -> _Response | tuple[Any, float, bool]:
        """The event and the invocation's budget, or the answer refusing the call."""
        try:
            event = json.loads(body) if body.strip() else {}
        except ValueError as exc:
            return _invoke_error(400, "invalid_request", "InvalidRequest", f"event is not valid JSON: {exc}")
        except RecursionError:
            return _invoke_error(400, "invalid_request", "InvalidRequest", "event is nested too deeply to parse")
        budget = spec.timeout_s
        deadline_bound = False
        raw_deadline = headers.get(b"x-faas-deadline-ms")
        if raw_deadline:
            try:
                remaining = int(raw_deadline) / 1000 - time.time()
            except ValueError:
                return _invoke_error(400, "invalid_request", "InvalidRequest", "bad X-Faas-Deadline-Ms")
            if remaining < budget:
                budget, deadline_bound = remaining, True
        if budget <= 0:
            return _invoke_error(
                504,
                "function_timeout",
                "TimeoutError",
                "the invocation deadline passed before the function started",
            )
        return event, budget, deadline_bound

    def _run_async(
        self, event: Any, context: InvocationContext, logs: _LogBuffer, slot: _Slot, budget: float
    ) -> tuple[bool, Any] | None:
        """Run an async handler on the loop thread; None if it overran ``budget`` (it is cancelled and
        its slot given back once it has unwound)."""
        loop = self.loop
        assert loop is not None
        outcome: concurrent.futures.Future[tuple[bool, Any]] = concurrent.futures.Future()
        tasks: list[asyncio.Task[tuple[bool, Any]]] = []

        def finished(task: asyncio.Task[tuple[bool, Any]]) -> None:
            slot.release()
            if outcome.done():
                return  # it overran and was cancelled: the 504 is answered already
            if task.cancelled():  # the handler cancelled itself: a failure of the function
                outcome.set_result((False, asyncio.CancelledError("the handler's task was cancelled")))
            else:
                outcome.set_result(task.result())

        def start() -> None:
            if outcome.cancelled():
                slot.release()
                return
            run_context = contextvars.copy_context()
            run_context.run(_current_log.set, logs)
            task = loop.create_task(_call_async(self.handler, event, context), context=run_context)
            task.add_done_callback(finished)
            tasks.append(task)

        loop.call_soon_threadsafe(start)
        try:
            return outcome.result(timeout=budget)
        except concurrent.futures.TimeoutError:
            if not outcome.cancel():  # it finished just now
                return outcome.result()
            unwound = threading.Event()

            def cancel() -> None:
                if tasks:
                    tasks[0].add_done_callback(lambda _task: unwound.set())
                    tasks[0].cancel()
                else:
                    unwound.set()  # never started: start() sees the cancelled outcome

            loop.call_soon_threadsafe(cancel)
            if not unwound.wait(ASYNC_UNWIND_GRACE_S):
                # The loop did not get to the cancellation: a handler blocks it (time.sleep, a busy
                # loop).  Nothing async can run on this host any more: retire it, as for a sync overrun.
                slot.release()
                self._retire("an async handler blocked the event loop past its timeout")
            return None

    def _answer(self, status: int, payload: dict[str, Any], logs: str, duration_ms: float) -> _Response:
        """An invocation's answer: the body the caller gets (the result's JSON, or ``{"error": ...}``),
        after the invocation's captured output (``X-Faas-Logs-Bytes`` long)."""
        try:
            final = json.dumps(payload["result"] if status == 200 else payload, allow_nan=False).encode()
        except MemoryError:
            status, payload = self._out_of_memory()
            final = json.dumps(payload).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            status, payload = (
                500,
                _function_error(type(exc).__name__, f"the function's result is not JSON serialisable: {exc}"),
            )
            final = json.dumps(payload).encode()
        prefix = logs.encode("utf-8", "replace")
        head = b"X-Faas-Duration-Ms: %.3f\r\nX-Faas-Logs-Bytes: %d\r\n" % (duration_ms, len(prefix))
        if status != 200:
            head += b"X-Faas-Error-Kind: %s\r\n" % payload["error"]["kind"].encode()
        return _Response(
            status, None, body=prefix + final if prefix else final, retire=self.retiring, headers=head
        )

    def _outcome(self, ok: bool, value: Any) -> tuple[int, dict[str, Any]]:
        if ok:
            if not inspect.isawaitable(value):
                return 200, {"result": value}
            if inspect.iscoroutine(value):
                value.close()  # never awaited: close it to avoid the "never awaited" warning
            return 500, _function_error(
                "TypeError", "the handler returned an awaitable; declare it with 'async def'"
            )
        exc: BaseException = value
        if isinstance(exc, MemoryError):
            return self._out_of_memory()
        return 500, _function_error(type(exc).__name__, _describe(exc), _user_frames(exc))

    def _out_of_memory(self) -> tuple[int, dict[str, Any]]:
        assert self.spec is not None
        self._retire("the function ran out of memory")
        message = f"the function exceeded its memory limit of {self.spec.memory_mb} MB"
        return 507, {"error": {"kind": "out_of_memory", "type": "MemoryError", "message": message}}

    def _timed_out(
        self, budget: float, deadline_bound: bool, timeout_s: float, *, sync: bool
    ) -> tuple[int, dict[str, Any]]:
        if deadline_bound:
            message = f"the invocation deadline passed after {budget:.3g} s (the function's timeout is {timeout_s:g} s)"
        else:
            message = f"function exceeded its timeout of {timeout_s:g} s"
        if sync:
            # The thread cannot be stopped: its slot stops counting, and the process retires.
            self._retire("a sync handler overran its timeout")
        return 504, {"error": {"kind": "function_timeout", "type": "TimeoutError", "message": message}}

    def overran(self, invocation: _Invocation) -> None:
        """The watchdog's answer to a sync invocation past its budget, written in its stead."""
        if not invocation.claim():
            return  # the handler returned in the same instant: its own answer goes out
        assert invocation.slot is not None and invocation.timeout is not None
        invocation.slot.release()
        budget, deadline_bound, timeout_s = invocation.timeout
        status, payload = self._timed_out(budget, deadline_bound, timeout_s, sync=True)
        duration_ms = round((time.perf_counter() - invocation.started) * 1000, 3)
        response = self._answer(status, payload, invocation.logs.getvalue(), duration_ms)
        try:
            invocation.conn.settimeout(CLOSE_FLUSH_TIMEOUT_S)
            _send(invocation.conn, response, False)
        except OSError:
            pass
        finally:
            invocation.answered.set()
            self._answered()

    def _retire(self, why: str) -> None:
        with self.lock:
            if self.retiring:
                return
            self.retiring = True
        _diag(f"retiring: {why}")
        assert self.spec is not None
        # Backstop: admitted invocations are answered within their budget, so this only fires if a
        # client stops reading its response.
        backstop = threading.Timer(self.spec.timeout_s + 5.0, self.exit, (EXIT_RETIRED,))
        backstop.daemon = True
        backstop.start()


_BAD_REQUEST_KINDS = {
    413: ("payload_too_large", "PayloadTooLarge"),
}


def _send(conn: socket.socket, response: _Response, keep_alive: bool) -> None:
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s%s%s" % (
        response.status,
        _REASONS.get(response.status, b"Unknown"),
        len(response.body),
        response.headers,
        b"X-Faas-Retire: 1\r\n" if response.retire else b"",
        b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n",
    )
    conn.sendall(head + response.body)
    if not keep_alive:
        # What is written is flushed by the kernel after close; shutting down first tells the peer
        # at once, before the process possibly exits.
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _refuse(conn: socket.socket) -> None:
    """Answer a connection the host has no thread for, and close it."""
    try:
        conn.settimeout(CLOSE_FLUSH_TIMEOUT_S)
        _send(
            conn,
            _error(503, "unavailable", "TooManyConnections", "the function host has too many connections"),
            False,
        )
    except OSError:
        pass
    finally:
        conn.close()


class _Reader:
    """Blocking reads of requests from one connection: heads up to ``MAX_HEAD_BYTES``, then bodies."""

    __slots__ = ("conn", "buffer")

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = bytearray()

    def head(self) -> bytes | None:
        """The next request head, CRLFCRLF included; None if the peer closed before sending one."""
        searched = 0
        while True:
            end = self.buffer.find(b"\r\n\r\n", max(0, searched - 3))
            if end >= 0:
                head = bytes(self.buffer[: end + 4])
                del self.buffer[: end + 4]
                return head
            if len(self.buffer) > MAX_HEAD_BYTES:
                raise _BadRequest(431, "headers too large")
            searched = len(self.buffer)
            data = self.conn.recv(READ_CHUNK_BYTES)
            if not data:
                if self.buffer.strip():
                    raise ConnectionResetError("the peer closed in the middle of a request head")
                return None
            self.buffer += data

    def body(self, length: int) -> bytes:
        while len(self.buffer) < length:
            data = self.conn.recv(min(max(READ_CHUNK_BYTES, length - len(self.buffer)), MIB))
            if not data:
                raise ConnectionResetError("the peer closed in the middle of a request body")
            self.buffer += data
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return body


class _Invocation:
    """One request on one connection; answered exactly once, by its connection thread or, for a
    sync handler past its budget, by the watchdog (``claim`` decides which)."""

    __slots__ = ("conn", "deadline", "timeout", "slot", "logs", "started", "answered", "_claim")

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.deadline = math.inf
        self.timeout: tuple[float, bool, float] | None = None
        self.slot: _Slot | None = None
        self.logs = _LogBuffer()
        self.started = 0.0
        self.answered = threading.Event()  # set once the watchdog's answer is written
        self._claim = threading.Lock()

    def claim(self) -> bool:
        return self._claim.acquire(blocking=False)


class _Watchdog:
    """Answers sync invocations that overrun their budget (their thread cannot be stopped).

    Watching costs two uncontended lock round trips per invocation; the thread is woken only when an
    invocation's deadline is earlier than the one it sleeps towards (rare: most share the timeout)."""

    def __init__(self, host: FunctionHost) -> None:
        self.host = host
        self.condition = threading.Condition(threading.Lock())
        self.watched: set[_Invocation] = set()
        self.wake_at = math.inf
        self.thread: threading.Thread | None = None

    def watch(self, invocation: _Invocation) -> None:
        with self.condition:
            self.watched.add(invocation)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
                self.thread.start()
            if invocation.deadline < self.wake_at:
                self.condition.notify()

    def unwatch(self, invocation: _Invocation) -> None:
        with self.condition:
            self.watched.discard(invocation)

    def _run(self) -> None:
        while True:
            with self.condition:
                now = time.monotonic()
                overrun = [i for i in self.watched if i.deadline <= now]
                self.watched.difference_update(overrun)
                self.wake_at = min((i.deadline for i in self.watched), default=math.inf)
                if not overrun:
                    self.condition.wait(None if self.wake_at == math.inf else self.wake_at - now)
                    continue
            for invocation in overrun:
                try:
                    self.host.overran(invocation)
                except Exception:  # noqa: BLE001 - the watchdog must outlive any one answer
                    _diag("error answering an overrun invocation:\n" + traceback.format_exc())


def _function_error(error_type: str, message: str, frames: list[str] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"kind": "function_error", "type": error_type, "message": message}
    if frames is not None:
        error["traceback"] = frames
    return {"error": error}


class _Slot:
    """One concurrency slot, released exactly once: when the handler ends or when it is abandoned."""

    __slots__ = ("host", "released")

    def __init__(self, host: FunctionHost) -> None:
        self.host = host
        self.released = False

    def release(self) -> None:
        host = self.host
        with host.lock:
            if self.released:
                return
            self.released = True
            host.inflight -= 1
            host.last_active = time.monotonic()


def _drop_script_dir_from_path() -> None:
    # ``python host.py`` puts faas/runtime first on sys.path; the platform's modules must not be
    # importable by (or shadow) the user's code.
    here = os.path.dirname(os.path.abspath(_HOST_FILE))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FaaS function host")
    listen = parser.add_mutually_exclusive_group(required=True)
    listen.add_argument("--socket", help="unix socket path to serve on (how the platform runs hosts)")
    listen.add_argument(
        "--tcp-port", type=int, help="serve on 127.0.0.1:PORT instead (benchmarks; 0 picks a free port)"
    )
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--instance-id", required=True)
    args = parser.parse_args(argv)
    _drop_script_dir_from_path()
    _limit_malloc_arenas()
    os.makedirs(args.cache_dir, exist_ok=True)
    sys.stdout = _CapturingStream(sys.stdout)
    sys.stderr = _CapturingStream(sys.stderr)
    host = FunctionHost(
        socket_path=args.socket or "",
        cache_dir=os.path.abspath(args.cache_dir),
        instance_id=args.instance_id,
        tcp_port=args.tcp_port,
    )
    try:
        asyncio.run(host.serve())
    except KeyboardInterrupt:
        pass
    host.exit(EXIT_SIGNALLED)


if __name__ == "__main__":
    main()
