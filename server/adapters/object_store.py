"""gs:// and s3:// buckets: stat, list and download objects (resumable, size-checked).

One small interface over `google-cloud-storage` and `boto3`, used for adapters
(`sources.py`) and base models (`model_loader.py`). Credentials, in order:
- explicit keys (`credentials.py` reads the ones the operator copied from
  `source.credentialsSecretRef`): `service-account.json` for gs://, `AWS_ACCESS_KEY_ID` +
  `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`) for s3://;
- else the library's own chain: on GKE, Workload Identity through the metadata server (no key);
  `STORAGE_EMULATOR_HOST` / `AWS_ENDPOINT_URL_S3` point the clients at other endpoints.

`version` is the GCS object generation or the S3 version id. Every failure is a `SourceError`
whose `error_type` says whose fault it is: `credentials` (401/403), `adapter_not_found` (404),
`integrity` (size), `unsupported` (extra not installed), `adapter_download` (the store failed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from loraplex.server.adapters.errors import SourceError

GCS_KEY_FILE = "service-account.json"
AWS_KEY_FILES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    version: str | None  # generation (gs) / version id (s3); None where the bucket keeps none


class ObjectStore(Protocol):
    url: str

    def stat(self, key: str, version: str | None = None) -> StoredObject: ...

    def list(self, prefix: str) -> list[StoredObject]: ...

    def read_into(self, obj: StoredObject, start: int, out: BinaryIO) -> None: ...


def open_store(scheme: str, bucket: str, credentials: Mapping[str, str] | None = None) -> ObjectStore:
    opener = {"gs": GcsStore, "s3": S3Store}.get(scheme)
    if opener is None:
        raise SourceError(f"{scheme}:// is not an object store", "validation")
    return opener(bucket, credentials or {})


def download(store: ObjectStore, obj: StoredObject, dest: Path, progress: Progress | None = None) -> Path:
    """Fetch `obj` to `dest` through `dest.partial`, resuming what an earlier attempt left there."""
    partial = dest.with_name(dest.name + ".partial")
    have = partial.stat().st_size if partial.exists() else 0
    if have > obj.size:
        partial.unlink()
        have = 0
    if have < obj.size:
        with partial.open("ab") as out:
            store.read_into(obj, have, out)
    got = partial.stat().st_size if partial.exists() else 0
    if got != obj.size:
        partial.unlink(missing_ok=True)
        raise SourceError(f"{store.url}/{obj.key}: got {got} bytes, the store lists {obj.size}", "integrity")
    if progress:
        progress(got, obj.size)
    os.replace(partial, dest)
    return dest


class GcsStore:
    def __init__(self, bucket: str, credentials: Mapping[str, str]) -> None:
        try:
            from google.cloud import storage
        except ImportError as exc:
            raise SourceError(
                "gs:// needs the `gcs` extra: pip install 'loraplex[gcs]'", "unsupported"
            ) from exc
        self.url = f"gs://{bucket}"
        with _gcs_errors(self.url):
            if GCS_KEY_FILE in credentials:
                client = storage.Client.from_service_account_info(json.loads(credentials[GCS_KEY_FILE]))
            else:
                client = storage.Client()  # ADC: Workload Identity on GKE, emulator when configured
        self._bucket = client.bucket(bucket)

    def stat(self, key: str, version: str | None = None) -> StoredObject:
        with _gcs_errors(f"{self.url}/{key}"):
            blob = self._bucket.get_blob(key, generation=int(version) if version else None)
        if blob is None or (version and str(blob.generation) != str(version)):
            at = f" at generation {version}" if version else ""
            raise SourceError(f"{self.url}/{key}{at}: no such object", "adapter_not_found")
        return StoredObject(key, int(blob.size), str(blob.generation))

    def list(self, prefix: str) -> list[StoredObject]:
        with _gcs_errors(f"{self.url}/{prefix}"):
            blobs = list(self._bucket.client.list_blobs(self._bucket, prefix=prefix))
        return [StoredObject(b.name, int(b.size), str(b.generation)) for b in blobs]

    def read_into(self, obj: StoredObject, start: int, out: BinaryIO) -> None:
        blob = self._bucket.blob(obj.key, generation=int(obj.version) if obj.version else None)
        with _gcs_errors(f"{self.url}/{obj.key}"):
            blob.download_to_file(out, start=start or None, if_generation_match=blob.generation)


class _gcs_errors:
    """Translate google-cloud-storage and google-auth failures into typed `SourceError`s."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, SourceError):
            return False
        from google.api_core import exceptions as api
        from google.auth import exceptions as auth

        if isinstance(exc, api.NotFound):
            raise SourceError(f"{self.where}: not found", "adapter_not_found") from exc
        if isinstance(exc, api.Unauthorized | api.Forbidden | auth.GoogleAuthError):
            raise SourceError(f"{self.where}: credentials refused: {exc}", "credentials") from exc
        if isinstance(exc, api.PreconditionFailed):
            raise SourceError(f"{self.where}: changed while downloading: {exc}", "adapter_download") from exc
        if isinstance(exc, api.GoogleAPIError | OSError | ValueError):
            raise SourceError(f"{self.where}: {exc}", "adapter_download") from exc
        return False


class S3Store:
    def __init__(self, bucket: str, credentials: Mapping[str, str]) -> None:
        try:
            import boto3
        except ImportError as exc:
            raise SourceError(
                "s3:// needs the `s3` extra: pip install 'loraplex[s3]'", "unsupported"
            ) from exc
        self.url = f"s3://{bucket}"
        self.bucket = bucket
        session = boto3.session.Session(
            aws_access_key_id=credentials.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=credentials.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=credentials.get("AWS_SESSION_TOKEN"),
        )
        # boto3 itself honours AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (MinIO, moto, other clouds).
        self._client = session.client("s3")

    def stat(self, key: str, version: str | None = None) -> StoredObject:
        extra = {"VersionId": version} if version else {}
        with _s3_errors(f"{self.url}/{key}"):
            head = self._client.head_object(Bucket=self.bucket, Key=key, **extra)
        return StoredObject(key, int(head["ContentLength"]), _version(head.get("VersionId")))

    def list(self, prefix: str) -> list[StoredObject]:
        found: list[StoredObject] = []
        with _s3_errors(f"{self.url}/{prefix}"):
            for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            ):
                found += [StoredObject(o["Key"], int(o["Size"]), None) for o in page.get("Contents", [])]
        return found

    def read_into(self, obj: StoredObject, start: int, out: BinaryIO) -> None:
        extra = {"VersionId": obj.version} if obj.version else {}
        if start:
            extra["Range"] = f"bytes={start}-"
        with _s3_errors(f"{self.url}/{obj.key}"):
            body = self._client.get_object(Bucket=self.bucket, Key=obj.key, **extra)["Body"]
            for chunk in body.iter_chunks(1 << 20):
                out.write(chunk)


def _version(version_id: str | None) -> str | None:
    return None if version_id in (None, "null") else version_id


class _s3_errors(_gcs_errors):
    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, SourceError):
            return False
        from botocore import exceptions as boto

        if isinstance(exc, boto.NoCredentialsError | boto.PartialCredentialsError):
            raise SourceError(f"{self.where}: no credentials: {exc}", "credentials") from exc
        if isinstance(exc, boto.ClientError):
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            code = exc.response.get("Error", {}).get("Code", "")
            if status == 404 or code in {"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "404"}:
                raise SourceError(f"{self.where}: not found ({code})", "adapter_not_found") from exc
            if status in (401, 403):
                raise SourceError(
                    f"{self.where}: credentials refused ({code}): {exc}", "credentials"
                ) from exc
            raise SourceError(f"{self.where}: {exc}", "adapter_download") from exc
        if isinstance(exc, boto.BotoCoreError | OSError):
            raise SourceError(f"{self.where}: {exc}", "adapter_download") from exc
        return False
