"""The runtime image of the Docker backend, built locally without a registry.

Two kinds of image can carry the tag the backend runs (``faas-runtime:py311`` by default):

- **local** (what ``ensure_runtime_image`` builds): ``FROM scratch`` plus a tiny root file system
  (``/etc/passwd`` and ``/etc/group`` with the user ``faas`` uid/gid 10001, ``/tmp``, ``/code``,
  ``/run/faas``, mount points) and *no* interpreter.  The node's own Python is bind-mounted read-only
  at the same path as on the node (its binary finds ``libpython`` through an RPATH to its own prefix),
  with the system library dirs (libc, libssl, zlib ...), ``host.py`` and ``app_host.py``, also read-only.  It builds in
  under a second, needs no network, and weighs nothing.
- **image** (what real users build, see ``docs/docker.md``): ``FROM python:3.11-slim`` with
  ``host.py`` and ``app_host.py`` copied in; nothing is bind-mounted.

The image describes how to run it in its labels, so the backend needs no knowledge of the kind:
``faas.runtime.python`` (interpreter path inside the container), ``faas.runtime.host`` (the host
script inside the container) and ``faas.runtime.binds`` (a JSON list of ``src:dst:ro`` binds, empty
for a self-contained image).

Invariants and caveats:

- The build context is deterministic (fixed mtimes and owners); its sha256 is stored in the label
  ``faas.runtime.digest``.  A local image whose digest differs from what this node would build (the
  Python moved, the repository moved) is rebuilt; an image of another kind under the tag is reused as
  it is, so an operator's ``python:3.11-slim`` image wins.
- The intermediate directories of the bind-mounted Python prefix (``/root`` is mode 700 on the node)
  exist in the image with mode 755.  Permissions inside a container are those of the container's own
  directories, and the bind mount is set up by the daemon as root, so uid 10001 can traverse to the
  interpreter without any change on the node.
- ``/lib``, ``/lib64`` ... that are symlinks on the node (merged ``/usr``) are the same symlinks in
  the image; only real directories are bind-mounted.
- A local image only works with a daemon on the same machine: the binds name the node's paths.
- There is no shell, no ``/usr/bin`` and no CA bundle in a local image: user code that runs
  ``subprocess`` with a command line fails.  Real deployments use the ``python:3.x-slim`` image.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiodocker

from faas.core.errors import Unavailable

__all__ = [
    "DEFAULT_TAG",
    "FAAS_GID",
    "FAAS_UID",
    "HOST_IN_CONTAINER",
    "RuntimeLayout",
    "ensure_runtime_image",
    "local_build_context",
    "runtime_layout",
]

logger = logging.getLogger(__name__)

DEFAULT_TAG = "faas-runtime:py311"
FAAS_UID = 10001
FAAS_GID = 10001
HOST_SCRIPT = Path(__file__).with_name("host.py")
HOST_IN_CONTAINER = "/opt/faas/host.py"
APP_HOST_SCRIPT = HOST_SCRIPT.with_name("app_host.py")
APP_HOST_IN_CONTAINER = "/opt/faas/app_host.py"  # beside it: the host loads it when it serves an app
SOCKET_DIR_IN_CONTAINER = "/run/faas"
CODE_DIR_IN_CONTAINER = "/code"

LABEL_KIND = "faas.runtime.kind"
LABEL_DIGEST = "faas.runtime.digest"
LABEL_PYTHON = "faas.runtime.python"
LABEL_HOST = "faas.runtime.host"
LABEL_BINDS = "faas.runtime.binds"

# Candidate system library dirs: bound read-only when they are directories, recreated as the same
# symlink when they are symlinks (merged /usr).
_LIBRARY_DIRS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32")
_BUILD_TIMEOUT_S = 120.0
_PASSWD = "root:x:0:0:root:/root:/sbin/nologin\nfaas:x:10001:10001:faas:/tmp:/sbin/nologin\n"
_GROUP = "root:x:0:\nfaas:x:10001:\n"


@dataclass(frozen=True)
class RuntimeLayout:
    """How to run the function host in an image: read from the image's labels."""

    image: str  # the image id
    python: str
    host_script: str
    binds: tuple[str, ...]


@dataclass(frozen=True)
class _LocalContext:
    tar: bytes
    digest: str


def _local_python() -> tuple[str, str]:
    """(prefix, interpreter) of the Python running this process, resolved past any venv."""
    prefix = os.path.realpath(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    executable = os.path.realpath(sys.executable)
    if not executable.startswith(prefix + os.sep):
        # A venv whose interpreter is not a symlink into the base prefix: use the base's own binary.
        executable = os.path.join(prefix, "bin", version)
    if not os.path.isfile(executable):
        raise Unavailable(f"cannot find the Python interpreter to mount into containers: {executable}")
    return prefix, executable


def _is_within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _tar_entry(
    name: str, *, mode: int, data: bytes | None = None, link: str | None = None
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.mtime = 0  # deterministic: the same inputs give the same digest
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if link is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = link
    elif data is None:
        info.type = tarfile.DIRTYPE
    else:
        info.size = len(data)
    return info, data


def _write_tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def local_build_context() -> _LocalContext:
    """The deterministic ``docker build`` context of the local image (a tar with a Dockerfile)."""
    prefix, executable = _local_python()
    binds: list[str] = []
    symlinks: dict[str, str] = {}
    bound: list[str] = []
    for path in _LIBRARY_DIRS:
        if os.path.islink(path):
            symlinks[path] = os.readlink(path)
        elif os.path.isdir(path):
            binds.append(f"{path}:{path}:ro")
            bound.append(path)
    if not any(_is_within(prefix, directory) for directory in bound):
        binds.append(f"{prefix}:{prefix}:ro")
    binds.append(f"{HOST_SCRIPT}:{HOST_IN_CONTAINER}:ro")
    binds.append(f"{APP_HOST_SCRIPT}:{APP_HOST_IN_CONTAINER}:ro")

    directories = {"etc", "run", "opt"}
    # Mount points, and every directory above them, readable and traversable by uid 10001.
    for target in (*(b.split(":")[1] for b in binds), SOCKET_DIR_IN_CONTAINER, CODE_DIR_IN_CONTAINER):
        parts = Path(target).parts[1:]
        limit = len(parts) - 1 if target in (HOST_IN_CONTAINER, APP_HOST_IN_CONTAINER) else len(parts)
        for depth in range(1, limit + 1):
            directories.add("/".join(parts[:depth]))
    rootfs = [_tar_entry(f"rootfs/{directory}", mode=0o755) for directory in sorted(directories)]
    rootfs += [
        _tar_entry("rootfs/tmp", mode=0o1777),
        _tar_entry("rootfs/etc/passwd", mode=0o644, data=_PASSWD.encode()),
        _tar_entry("rootfs/etc/group", mode=0o644, data=_GROUP.encode()),
        _tar_entry("rootfs" + HOST_IN_CONTAINER, mode=0o644, data=b""),  # bind-mount targets
        _tar_entry("rootfs" + APP_HOST_IN_CONTAINER, mode=0o644, data=b""),
        *(_tar_entry("rootfs" + path, mode=0o777, link=target) for path, target in sorted(symlinks.items())),
    ]
    labels = {
        LABEL_KIND: "local",
        LABEL_PYTHON: executable,
        LABEL_HOST: HOST_IN_CONTAINER,
        LABEL_BINDS: json.dumps(binds),
    }
    digest = hashlib.sha256(_write_tar(rootfs) + json.dumps(labels, sort_keys=True).encode()).hexdigest()
    labels[LABEL_DIGEST] = digest
    # Few instructions: the classic builder commits a layer per instruction (~0.6 s each on vfs).
    # Environment and working dir come with each container, not from the image.
    dockerfile = "\n".join(
        [
            "FROM scratch",
            "COPY rootfs/ /",
            f"USER {FAAS_UID}:{FAAS_GID}",
            "LABEL " + " ".join(f"{key}={json.dumps(value)}" for key, value in sorted(labels.items())),
            "",
        ]
    )
    tar_bytes = _write_tar([_tar_entry("Dockerfile", mode=0o644, data=dockerfile.encode()), *rootfs])
    return _LocalContext(tar=tar_bytes, digest=digest)


async def _inspect(docker: aiodocker.Docker, name: str) -> dict[str, Any] | None:
    try:
        return await docker.images.inspect(name)
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return None
        raise Unavailable(f"cannot inspect the runtime image {name}: {exc}") from exc


def _labels(image: dict[str, Any]) -> dict[str, str]:
    return (image.get("Config") or {}).get("Labels") or {}


async def ensure_runtime_image(docker: aiodocker.Docker, *, tag: str = DEFAULT_TAG) -> str:
    """The id of the runtime image ``tag``, building the local kind first if it is missing or stale.

    Reused as is when the tag names an image of another kind (an operator's ``python:3.x-slim``
    build).  Raises ``Unavailable`` when the image cannot be built.
    """
    existing = await _inspect(docker, tag)
    if existing is not None and _labels(existing).get(LABEL_KIND) not in (None, "local"):
        return str(existing["Id"])
    context = local_build_context()
    if existing is not None and _labels(existing).get(LABEL_DIGEST) == context.digest:
        return str(existing["Id"])
    logger.info("building runtime image %s (local Python, digest %s)", tag, context.digest[:12])
    try:
        await docker.images.build(
            fileobj=io.BytesIO(context.tar),
            encoding="identity",
            tag=tag,
            rm=True,
            forcerm=True,
            timeout=_BUILD_TIMEOUT_S,
        )
    except (aiodocker.DockerError, OSError, TimeoutError) as exc:
        raise Unavailable(f"cannot build the runtime image {tag}: {exc}") from exc
    built = await _inspect(docker, tag)
    if built is None or _labels(built).get(LABEL_DIGEST) != context.digest:
        raise Unavailable(f"building the runtime image {tag} did not produce it")
    if existing is not None and existing["Id"] != built["Id"]:
        # The superseded build, unless containers still use it (409): it is only a few bytes anyway.
        with contextlib.suppress(aiodocker.DockerError):
            await docker.images.delete(existing["Id"])
    return str(built["Id"])


async def runtime_layout(docker: aiodocker.Docker, image: str) -> RuntimeLayout:
    """How to run the host in ``image`` (see the module docstring for the labels)."""
    info = await _inspect(docker, image)
    if info is None:
        raise Unavailable(f"runtime image {image} not found")
    labels = _labels(info)
    try:
        binds = tuple(json.loads(labels.get(LABEL_BINDS) or "[]"))
    except ValueError as exc:
        raise Unavailable(f"runtime image {image} has a malformed {LABEL_BINDS} label") from exc
    python = labels.get(LABEL_PYTHON)
    if not python:
        raise Unavailable(f"runtime image {image} lacks the {LABEL_PYTHON} label: not a faas runtime image")
    return RuntimeLayout(
        image=str(info["Id"]),
        python=python,
        host_script=labels.get(LABEL_HOST) or HOST_IN_CONTAINER,
        binds=binds,
    )
