"""The node's cache of unpacked code archives, ``<cache_dir>/<sha256>/``, and its eviction.

Writers: the process backend's hosts (``host._fetch_code``) and the Docker backend
(``code_views.CodeFetcher``).  Both unpack into a staging dir ``.unpack-*`` and rename it
into place, so a ``<sha256>/`` dir is always complete and verified.  The backend owns one
``CodeCache`` and runs ``sweep_forever`` while it runs.

Guarantees:

- A ``<sha256>/`` dir is never evicted while an instance of this node runs that code or a launch of
  this node for it is under way.  The backend ``acquire``s the sha when a launch starts, before any
  host can read the dir, and ``release``s it when the launch fails or the instance it became is
  stopped or exits.
- A dir is evicted only once it has not been used for ``ttl_s``.  "Used" is the last ``acquire`` or
  ``release`` of its sha on this node, kept in memory, or the dir's mtime if that is later (so a dir
  left by a previous agent counts from about when it was unpacked).
- Eviction is atomic: the in-use check and the rename of ``<sha256>`` to
  ``.evict-<sha256>-<random>`` run on the event loop with no ``await`` between them.  A launch
  either acquires the sha first (the dir is kept) or starts after the rename, finds no dir and
  downloads the archive again.  No reader ever sees a half-deleted tree; the renamed tree is deleted
  in a thread.
- ``.unpack-*`` and ``.evict-*`` dirs older than ``STAGING_MAX_AGE_S`` (an hour, far beyond a
  download's time limit) are left by a crash and removed; an ``.unpack-*`` dir whose sha is in use
  is left alone whatever its age.
- With a quota (``max_bytes``), a launch of code not in the cache first evicts unused code, least
  recently used first, until the cache holds less than the quota; when what remains is all in use, the
  launch fails with ``Unavailable`` (503) instead of filling the disk.  The new archive may take the
  cache past the quota by its own size (at most the unpacked limit, 512 MiB).
- Every eviction is logged.  ``sweep_forever`` never ends on an error: a failed sweep is logged and
  the next one runs on time.

Caveats:

- The cache belongs to one node agent.  Two agents sharing one cache dir do not see each other's
  instances, and may evict code that the other one runs.
- Last-use times live in memory.  After an agent restart, code in frequent use before it may be
  evicted at the first sweep (its mtime is old) and is then downloaded again at its next launch.
- Sizes are measured once per code dir (the dirs never change) by walking it in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import secrets
import shutil
import stat
import time
from pathlib import Path
from typing import NoReturn

from faas.core.errors import Unavailable

__all__ = ["CodeCache", "DEFAULT_SWEEP_INTERVAL_S", "DEFAULT_TTL_S", "STAGING_MAX_AGE_S"]

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 24 * 3600.0
DEFAULT_SWEEP_INTERVAL_S = 600.0
STAGING_MAX_AGE_S = 3600.0
UNPACK_PREFIX = ".unpack-"  # host._fetch_code and code_views._fetch_into_cache use it
EVICT_PREFIX = ".evict-"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CodeCache:
    """Which cached archives this node uses, and the sweep that evicts the others.

    ``acquire``, ``release`` and ``sweep`` must be called on the event loop that runs the backend.
    """

    def __init__(
        self,
        root: Path,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        sweep_interval_s: float = DEFAULT_SWEEP_INTERVAL_S,
        max_bytes: int = 0,
    ) -> None:
        self.root = Path(root)
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes  # 0: no quota
        self._sizes: dict[str, int] = {}  # sha256 -> bytes its dir holds (measured once)
        self.sweep_interval_s = sweep_interval_s
        self._users: dict[str, int] = {}  # sha256 -> launches under way + instances running
        self._last_used: dict[str, float] = {}  # sha256 -> wall-clock time of its last acquire/release
        self._sweeping = asyncio.Lock()

    def acquire(self, sha256: str) -> None:
        """A launch of ``sha256`` starts: keep its code until the matching ``release``."""
        self._users[sha256] = self._users.get(sha256, 0) + 1
        self._last_used[sha256] = time.time()

    def release(self, sha256: str) -> None:
        """A launch of ``sha256`` failed, or the instance it became is gone."""
        left = self._users.get(sha256, 0) - 1
        if left > 0:
            self._users[sha256] = left
        else:
            self._users.pop(sha256, None)
        self._last_used[sha256] = time.time()

    def users(self, sha256: str) -> int:
        """How many launches and instances of this node use ``sha256`` now."""
        return self._users.get(sha256, 0)

    async def sweep(self, *, now: float | None = None) -> list[str]:
        """Evict every archive unused for ``ttl_s`` and remove stale staging dirs; return the evicted shas.

        ``now`` (wall-clock seconds) defaults to the current time.  Raises ``OSError`` only if the
        cache dir cannot be listed; a dir that cannot be renamed or removed is logged and skipped.
        """
        async with self._sweeping:
            entries = await asyncio.to_thread(_scan, self.root)
            now = time.time() if now is None else now
            # From here to the last rename there is no await: no launch can acquire in between.
            doomed: list[Path] = []
            evicted: list[str] = []
            for name, mtime in entries:
                if _SHA256.fullmatch(name):
                    if self._users.get(name):
                        continue
                    last_used = max(self._last_used.get(name, mtime), mtime)
                    if now - last_used < self.ttl_s:
                        continue
                    doomed_path = self.root / f"{EVICT_PREFIX}{name}-{secrets.token_hex(4)}"
                    try:
                        os.rename(self.root / name, doomed_path)
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        logger.warning("cannot evict code %s from %s: %s", name, self.root, exc)
                        continue
                    self._last_used.pop(name, None)
                    doomed.append(doomed_path)
                    evicted.append(name)
                    logger.info(
                        "evicted code %s from the node cache (unused for %.1f h)", name, (now - last_used) / 3600
                    )
                elif name.startswith((UNPACK_PREFIX, EVICT_PREFIX)) and now - mtime > STAGING_MAX_AGE_S:
                    if name.startswith(UNPACK_PREFIX) and self._downloading(name):
                        continue
                    logger.info("removing stale staging dir %s from the node cache", name)
                    doomed.append(self.root / name)
            if doomed:
                await asyncio.to_thread(_remove_trees, doomed)
            return evicted

    async def make_room(self, sha256: str) -> None:
        """Before a launch of ``sha256``: if its code is not cached and the cache is at its quota, evict
        unused code (least recently used first) until it is under; ``Unavailable`` if it cannot be."""
        if not self.max_bytes or (self.root / sha256).is_dir():
            return
        async with self._sweeping:
            entries = [(name, mtime) for name, mtime in await asyncio.to_thread(_scan, self.root) if _SHA256.fullmatch(name)]
            unknown = [name for name, _ in entries if name not in self._sizes]
            if unknown:
                self._sizes.update(await asyncio.to_thread(_sizes_of, self.root, unknown))
            # From here to the last rename there is no await: no launch can acquire in between.
            total = sum(self._sizes.get(name, 0) for name, _ in entries)
            unused = sorted(
                (max(self._last_used.get(name, mtime), mtime), name) for name, mtime in entries if not self._users.get(name)
            )
            doomed: list[Path] = []
            for _, name in unused:
                if total < self.max_bytes:
                    break
                doomed_path = self.root / f"{EVICT_PREFIX}{name}-{secrets.token_hex(4)}"
                try:
                    os.rename(self.root / name, doomed_path)
                except OSError:
                    continue
                total -= self._sizes.pop(name, 0)
                self._last_used.pop(name, None)
                doomed.append(doomed_path)
                logger.info("evicted code %s from the node cache to stay under its quota of %d bytes", name, self.max_bytes)
            if doomed:
                await asyncio.to_thread(_remove_trees, doomed)
            if total >= self.max_bytes:
                raise Unavailable(
                    f"the node's code cache holds {total} bytes of code in use, at its quota of {self.max_bytes}: "
                    "no room to unpack another archive (set FAAS_CODE_CACHE_MAX_BYTES higher, or add a node)"
                )

    async def sweep_forever(self) -> NoReturn:
        """Sweep every ``sweep_interval_s`` (with 10 % jitter), for as long as the backend runs."""
        while True:
            await asyncio.sleep(self.sweep_interval_s * random.uniform(0.9, 1.1))
            try:
                await self.sweep()
            except Exception:
                logger.exception("sweeping the code cache %s failed; trying again later", self.root)

    def _downloading(self, staging_name: str) -> bool:
        """Whether a staging dir ``.unpack-<first 16 hex of the sha>-…`` may belong to a launch under way."""
        prefix = staging_name.removeprefix(UNPACK_PREFIX)[:16]
        return any(sha256.startswith(prefix) for sha256, users in self._users.items() if users)


def _scan(root: Path) -> list[tuple[str, float]]:
    """(name, mtime) of every directory directly in ``root``; nothing if ``root`` does not exist."""
    found: list[tuple[str, float]] = []
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        found.append((entry.name, entry.stat(follow_symlinks=False).st_mtime))
                except OSError:
                    continue  # removed meanwhile
    except FileNotFoundError:
        return []
    return found


def _sizes_of(root: Path, names: list[str]) -> dict[str, int]:
    """Bytes each named dir under ``root`` holds (its files' sizes)."""
    sizes: dict[str, int] = {}
    for name in names:
        total = 0
        for folder, _, files in os.walk(root / name):
            for file in files:
                try:
                    total += os.lstat(os.path.join(folder, file)).st_size
                except OSError:
                    continue
        sizes[name] = total
    return sizes


def _remove_trees(paths: list[Path]) -> None:
    for path in paths:
        try:
            _remove_tree(path)
        except OSError as exc:
            logger.warning("cannot remove %s from the node cache: %s", path, exc)


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except PermissionError:
        # A process-backend handler runs in its code dir as the agent's user, and may have made part
        # of it read-only: give the owner its rights back, then try again.
        _make_removable(path)
        shutil.rmtree(path)


def _make_removable(root: Path) -> None:
    os.chmod(root, stat.S_IRWXU)
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            child = os.path.join(dirpath, name)
            # Never through a symlink: chmod would follow it out of the tree.
            if stat.S_ISDIR(os.lstat(child).st_mode):
                os.chmod(child, stat.S_IRWXU)
