"""Where the CLI finds its API key, and where ``faas login`` keeps it.

In order: ``--api-key`` (or ``$FAAS_API_KEY``); the key ``faas login`` saved for the gateway URL in
``$FAAS_CONFIG_DIR/credentials.json`` (default ``~/.config/faas``; the folder mode 0700, the file
0600); the admin key of the embedded platform ``faas up`` started under ``$FAAS_HOME`` (default
``.faas``), ``<home>/admin.key``, when the URL is that platform's gateway.  None when there is none: the gateway then answers 401 with what
to send.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from faas.core.settings import Settings
from faas.launcher.embedded import ADMIN_KEY_FILE


def config_dir() -> Path:
    return Path(os.environ.get("FAAS_CONFIG_DIR") or Path.home() / ".config" / "faas")


def _credentials_path() -> Path:
    return config_dir() / "credentials.json"


def _saved() -> dict[str, str]:
    try:
        data = json.loads(_credentials_path().read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def find_api_key(url: str, explicit: str | None = None) -> str | None:
    if explicit:
        return explicit.strip()
    saved = _saved().get(url.rstrip("/"))
    if saved:
        return saved
    settings = Settings()
    if url.rstrip("/") != settings.gateway_url:
        return None  # the local platform's admin key goes to the local platform only
    try:
        text = (settings.home / ADMIN_KEY_FILE).read_text().strip()
    except OSError:
        return None
    return text or None


def save_api_key(url: str, key: str) -> Path:
    """Keep ``key`` for ``url`` (replacing the one kept before); the file's path."""
    path = _credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    saved = _saved()
    saved[url.rstrip("/")] = key
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(saved, out, indent=2)
    os.replace(tmp, path)
    return path
