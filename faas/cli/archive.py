"""Building a function's code archive: the project's files plus its vendored requirements, as a zip.

Invariants:

- Deterministic: entries are sorted by path and carry a fixed timestamp (1980-01-01) and mode (0644,
  or 0755 for executables), so the same files give the same bytes and the same sha256 (the code store
  is addressed by that hash, so an unchanged project is not stored twice).
- Never packed: ``.git``, ``.faas`` (the local platform's data), ``__pycache__``, ``*.pyc``/``*.pyo``,
  ``.venv`` and tool caches.  The manifest's ``exclude`` globs drop more; its ``include`` globs, when
  given, keep only the project files that match (vendored packages are always kept).
- When ``requirements.txt`` has a requirement line, ``pip install --target`` vendors the packages at
  the archive root (where the function host puts them on ``sys.path``).  A project file wins over a
  vendored file of the same path.
- The handler's module must be in the archive (``pkg/mod.py`` or ``pkg/mod/__init__.py`` for handler
  ``pkg.mod.func``): a missing module is reported here rather than as a failed cold start.

Caveat: pip resolves wheels for the interpreter running the CLI; packages with compiled extensions
therefore need the CLI to run on the same Python version and platform as the functions (python3.11).
"""

from __future__ import annotations

import fnmatch
import io
import os
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from faas.core.errors import FaasError, InvalidRequest

from .manifest import Manifest

Progress = Callable[[str], None]

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
REQUIREMENTS_FILE = "requirements.txt"
ALWAYS_EXCLUDED_DIRS = frozenset(
    {".git", ".hg", ".svn", ".faas", "__pycache__", ".venv", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
)
ALWAYS_EXCLUDED_SUFFIXES = (".pyc", ".pyo")
PIP_TAIL_LINES = 25


class ArchiveError(FaasError):
    """The archive could not be built (unreadable files, pip failed)."""

    kind = "archive_error"


class HandlerModuleNotFound(InvalidRequest):
    """The manifest's handler names a module the archive does not contain."""


def build_archive(project_dir: str | Path, manifest: Manifest, *, progress: Progress | None = None) -> bytes:
    """The zip of ``project_dir`` for ``manifest`` (see the module docstring for what goes in)."""
    report = progress or (lambda _message: None)
    root = Path(project_dir)
    files = collect_project_files(root, include=manifest.include, exclude=manifest.exclude)
    handler = manifest.config.handler
    requirements = root / REQUIREMENTS_FILE
    has_requirements = requirements.is_file() and bool(requirement_lines(requirements))
    if not has_requirements:
        check_handler_module(files, handler, root)

    entries: dict[str, Path] = dict(files)
    with tempfile.TemporaryDirectory(prefix="faas-vendor-") as vendor_dir:
        if has_requirements:
            report("vendoring requirements (pip)…")
            vendor_requirements(requirements, Path(vendor_dir))
            vendored = collect_project_files(Path(vendor_dir), include=(), exclude=manifest.exclude)
            for arcname, path in vendored.items():
                entries.setdefault(arcname, path)
            check_handler_module(entries, handler, root)
        data = zip_files(entries)
    report(f"packaged {len(entries)} files ({_size(len(data))})")
    return data


def collect_project_files(
    root: Path, *, include: Iterable[str] = (), exclude: Iterable[str] = ()
) -> dict[str, Path]:
    """Archive name (posix, relative) -> file, for every regular file under ``root`` that is packed."""
    include = tuple(_clean_glob(g) for g in include)
    exclude = tuple(_clean_glob(g) for g in exclude)
    if not root.is_dir():
        raise ArchiveError(f"project folder {str(root)!r} does not exist or is not a folder")
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_walk_error):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        # Pruning in place stops os.walk from descending into excluded folders.
        dirnames[:] = sorted(
            d for d in dirnames if d not in ALWAYS_EXCLUDED_DIRS and not _matches(_join(rel_dir, d), exclude)
        )
        for filename in sorted(filenames):
            arcname = _join(rel_dir, filename)
            if filename.endswith(ALWAYS_EXCLUDED_SUFFIXES) or _matches(arcname, exclude):
                continue
            if include and not _matches(arcname, include):
                continue
            path = Path(dirpath) / filename
            if path.is_file():  # skips sockets, fifos and broken symbolic links
                found[arcname] = path
    return found


def requirement_lines(requirements: Path) -> list[str]:
    """The lines of a requirements file that ask for something (not blank, not a comment)."""
    try:
        text = requirements.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"cannot read {requirements}: {exc}") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def vendor_requirements(requirements: Path, target: Path) -> None:
    """``pip install -r requirements --target target``; a failure raises ArchiveError with pip's output."""
    command = [
        sys.executable, "-m", "pip", "install",
        "-r", requirements.name,
        "--target", str(target),
        "--disable-pip-version-check", "--no-input", "--quiet",
        "--no-compile",  # the archive drops *.pyc anyway; compiling would only cost time
    ]  # fmt: skip
    try:
        result = subprocess.run(  # noqa: S603 - fixed argv, no shell
            command, cwd=requirements.parent, capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise ArchiveError(f"cannot run pip ({sys.executable} -m pip): {exc}") from None
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip()).splitlines()
        tail = "\n".join("  " + line for line in output[-PIP_TAIL_LINES:])
        raise ArchiveError(
            f"pip could not install {requirements} (exit status {result.returncode}):\n{tail}"
            if tail
            else f"pip could not install {requirements} (exit status {result.returncode})"
        )


def handler_module_paths(handler: str) -> tuple[str, str]:
    """The two archive paths that can hold the module of ``handler`` (``a.b.func`` -> a/b.py, a/b/__init__.py)."""
    module_path = handler.rsplit(".", 1)[0].replace(".", "/")
    return f"{module_path}.py", f"{module_path}/__init__.py"


def check_handler_module(arcnames: Iterable[str], handler: str, project_dir: Path) -> None:
    names = set(arcnames)
    candidates = handler_module_paths(handler)
    if not any(candidate in names for candidate in candidates):
        module = handler.rsplit(".", 1)[0]
        raise HandlerModuleNotFound(
            f"handler module {module!r} not found in {project_dir} (handler {handler!r}): "
            f"expected {candidates[0]} or {candidates[1]}",
            error_type="HandlerModuleNotFound",
        )


def zip_files(entries: dict[str, Path]) -> bytes:
    """A deterministic zip of ``entries`` (archive name -> file)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for arcname in sorted(entries):
            path = entries[arcname]
            try:
                data = path.read_bytes()
                executable = bool(path.stat().st_mode & stat.S_IXUSR)
            except OSError as exc:
                raise ArchiveError(f"cannot read {path}: {exc.strerror or exc}") from None
            info = zipfile.ZipInfo(arcname, date_time=ZIP_EPOCH)
            info.create_system = 3  # unix, so external_attr carries the mode
            info.external_attr = (stat.S_IFREG | (0o755 if executable else 0o644)) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data, compresslevel=6)
    return buffer.getvalue()


def _clean_glob(pattern: str) -> str:
    pattern = pattern.strip()
    while pattern.startswith("./"):
        pattern = pattern[2:]
    return pattern.rstrip("/")


def _matches(arcname: str, patterns: tuple[str, ...]) -> bool:
    """gitignore-like: a pattern matches the path, one of its parent folders, or (without '/') any part."""
    if not patterns:
        return False
    parts = arcname.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return True
        if "/" not in pattern and any(fnmatch.fnmatchcase(part, pattern) for part in parts):
            return True
    return False


def _join(rel_dir: str, name: str) -> str:
    return f"{rel_dir}/{name}" if rel_dir else name


def _raise_walk_error(exc: OSError) -> None:
    raise ArchiveError(f"cannot read {exc.filename}: {exc.strerror or exc}")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"
