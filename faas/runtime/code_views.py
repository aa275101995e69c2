"""Code given to hosts that cannot fetch it themselves: the Docker backend's containers and the
process backend's sandboxed hosts (no network, no S3 credentials, no presigned URL).

- ``CodeFetcher.fetch`` downloads an archive by its presigned URL on the node, checks its sha256 and
  unpacks it into the node's cache, ``<cache_dir>/<sha256>/``, with host.py's own download and unpack
  functions (size and ratio caps, unsafe paths refused), through a staging dir and an atomic rename.
  Concurrent fetches of one archive share one download; one caller's cancellation does not cancel
  the others'.  Every file is made world-readable: the host's user is not the agent's.
- ``link_tree`` hard-links one cached ``<sha256>/`` tree into a host's own read-only view; the host
  is told ``file://<view>/<sha256>`` and finds the code there (``host._fetch_code`` reuses an
  existing dir).  A host therefore sees exactly the one verified archive it runs, and the cache's
  eviction never takes code from under it: the view holds its own links.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

from faas.core.errors import InstanceStartError
from faas.core.tasks import TaskSet
from faas.runtime import host as _host
from faas.runtime.backend import InstanceSpec

__all__ = ["CodeFetcher", "link_tree"]


class CodeFetcher:
    """Fetches archives into the node cache for a backend, one download per archive at a time."""

    def __init__(self, cache_dir: Path, tasks: TaskSet) -> None:
        self._cache_dir = cache_dir
        self._tasks = tasks
        self._fetches: dict[str, asyncio.Task[Path | BaseException]] = {}

    async def fetch(self, spec: InstanceSpec) -> Path:
        """The verified, unpacked code of ``spec`` in the node cache; ``InstanceStartError`` if not."""
        final = self._cache_dir / spec.sha256
        if final.is_dir():
            return final
        task = self._fetches.get(spec.sha256)
        if task is None:
            task = self._tasks.spawn(
                asyncio.to_thread(_fetch_into_cache, self._cache_dir, spec.code_url, spec.sha256),
                name=f"prefetch-{spec.sha256[:12]}",
            )
            self._fetches[spec.sha256] = task
            sha256 = spec.sha256

            def forget(_task: asyncio.Task[Path | BaseException]) -> None:
                self._fetches.pop(sha256, None)

            task.add_done_callback(forget)
        # Shielded: one caller's cancellation must not cancel the others' download.
        outcome = await asyncio.shield(task)
        if isinstance(outcome, _host._StartError):
            raise InstanceStartError(
                outcome.message, error_type=outcome.error_type, fault="function" if outcome.user_fault else None
            )
        if isinstance(outcome, BaseException):
            raise InstanceStartError(
                f"cannot fetch the code archive: {outcome}", error_type=type(outcome).__name__
            )
        return outcome


def _fetch_into_cache(cache_dir: Path, code_url: str, sha256: str) -> Path | BaseException:
    """Download, verify and unpack an archive into ``cache_dir/<sha256>``, as the host would.

    Returns the exception instead of raising it: the task is shared by every waiter and an expected
    failure (a bad archive) is theirs to report, not the task guard's to log.
    """
    final = cache_dir / sha256
    if final.is_dir():
        return final
    try:
        staging = tempfile.mkdtemp(prefix=f".unpack-{sha256[:16]}-", dir=cache_dir)
    except OSError as exc:
        return exc
    try:
        archive = os.path.join(staging, "archive.zip")
        _host._download(code_url, archive, sha256)
        unpacked = os.path.join(staging, "code")
        _host._unpack(archive, unpacked)
        _make_world_readable(unpacked)  # the host's user is not the agent's user
        try:
            os.rename(unpacked, final)
        except OSError as exc:
            if not final.is_dir():  # another agent thread renamed the same verified content first
                return exc
        return final
    except (_host._StartError, OSError) as exc:
        return exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_world_readable(root: str) -> None:
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            os.chmod(path, 0o644 | (os.stat(path).st_mode & 0o111))


def link_tree(source: Path, dest: Path) -> None:
    """Hard-link ``source`` into ``dest`` (a copy when they are on different file systems)."""
    try:
        shutil.copytree(source, dest, copy_function=os.link)
    except shutil.Error:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source, dest)
    except OSError as exc:
        if exc.errno != 18:  # EXDEV
            raise
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source, dest)
