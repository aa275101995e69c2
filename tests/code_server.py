"""A local HTTP server that serves code archives, standing in for presigned S3 URLs in the tests of the
function host and the runtime backends (the S3 path itself is tested end to end elsewhere)."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from faas.runtime.backend import InstanceSpec
from tests.helpers import make_zip


class CodeServer:
    """Serves archives on 127.0.0.1 and counts downloads per path."""

    def __init__(self, *, function: str = "echo", version: int = 1) -> None:
        self.function = function
        self.version = version
        self.files: dict[str, bytes] = {}
        self.hits: Counter[str] = Counter()
        files, hits = self.files, self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits[self.path] += 1
                data = files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_port
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def publish(self, archive: bytes) -> tuple[str, str, str]:
        """Serve ``archive``; returns (url, path, sha256)."""
        path = f"/code/{uuid.uuid4().hex}.zip"
        self.files[path] = archive
        return f"http://127.0.0.1:{self.port}{path}", path, hashlib.sha256(archive).hexdigest()

    def spec(self, files: dict[str, str], **overrides: Any) -> InstanceSpec:
        """An instance spec for an archive of ``files`` served from here."""
        archive = make_zip(files)
        url, _, sha256 = self.publish(archive)
        fields: dict[str, Any] = {
            "instance_id": f"i-{uuid.uuid4().hex[:8]}",
            "namespace": "default",
            "function": self.function,
            "version": self.version,
            "handler": "app.handler",
            "code_url": url,
            "sha256": sha256,
            "size": len(archive),
            "memory_mb": 128,
            "timeout_s": 5.0,
            "concurrency": 1,
        }
        fields.update(overrides)
        return InstanceSpec(**fields)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
