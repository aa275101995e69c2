"""Code archives in the S3-compatible object store, addressed by sha256.

Guarantees: an archive is stored under ``archives/<sha256>.zip`` and never overwritten with other
bytes (same key, same content); storing it again refreshes its modification time, which the garbage
collector (``delete_if_older``) reads, so an archive a deploy just stored is never collected; a presigned URL lets an instance read exactly one archive for a short
time without holding credentials.  boto3 is synchronous, so calls run in a worker thread; every S3 or
network failure surfaces as ``Unavailable`` naming the endpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import datetime
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from faas.core.errors import Unavailable
from faas.core.models import CodeRef
from faas.core.settings import Settings


def s3_client(settings: Settings, *, connect_timeout_s: float, read_timeout_s: float, attempts: int) -> Any:
    """A boto3 S3 client for the platform's object store (path-style addressing, SigV4)."""
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        aws_access_key_id=settings.s3_access_key,
        aws_secret_access_key=settings.s3_secret_key,
        region_name=settings.s3_region,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": attempts, "mode": "standard"},
        ),
    )


class CodeStore:
    def __init__(self, settings: Settings) -> None:
        self.endpoint = settings.s3_endpoint
        self.bucket = settings.s3_bucket
        self.presign_ttl_s = settings.presign_ttl_s
        self._s3 = s3_client(settings, connect_timeout_s=3, read_timeout_s=30, attempts=2)

    def _fail(self, what: str, exc: Exception) -> Unavailable:
        return Unavailable(f"object store at {self.endpoint} failed to {what}: {exc}")

    async def ensure_bucket(self) -> None:
        def _ensure() -> None:
            try:
                self._s3.head_bucket(Bucket=self.bucket)
            except botocore.exceptions.ClientError:
                self._s3.create_bucket(Bucket=self.bucket)

        try:
            await asyncio.to_thread(_ensure)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._fail(f"create bucket {self.bucket!r}", exc) from exc

    async def put_archive(self, data: bytes) -> CodeRef:
        sha = hashlib.sha256(data).hexdigest()
        key = f"archives/{sha}.zip"

        def _put() -> None:
            # Always written, even when present: the new modification time keeps the garbage
            # collector off an archive a version is about to refer to.
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType="application/zip")

        try:
            await asyncio.to_thread(_put)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._fail("store the code archive", exc) from exc
        return CodeRef(key=key, sha256=sha, size=len(data))

    async def list_archives(self) -> list[tuple[str, datetime]]:
        """Every archive key with its modification time."""

        def _list() -> list[tuple[str, datetime]]:
            out = []
            for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix="archives/"):
                out += [(obj["Key"], obj["LastModified"]) for obj in page.get("Contents", [])]
            return out

        try:
            return await asyncio.to_thread(_list)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._fail("list code archives", exc) from exc

    async def delete_if_older(self, key: str, cutoff: datetime) -> bool:
        """Delete one archive unless it was (re)written after ``cutoff``; True if deleted."""

        def _delete() -> bool:
            try:
                head = self._s3.head_object(Bucket=self.bucket, Key=key)
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
            if head["LastModified"] >= cutoff:
                return False
            self._s3.delete_object(Bucket=self.bucket, Key=key)
            return True

        try:
            return await asyncio.to_thread(_delete)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._fail(f"delete {key}", exc) from exc

    def presign_get(self, key: str) -> str:
        """A GET URL for one archive, valid for ``presign_ttl_s`` (computed locally, no I/O)."""
        return str(
            self._s3.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.presign_ttl_s
            )
        )
