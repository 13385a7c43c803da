"""pytest plugin: real object-store servers on loopback for gs:// and s3:// tests (no mock of the
storage protocol). Enabled in tests/conftest.py next to `pytest_plugin` (the control plane).

- `gcs_server`: `gcp-storage-emulator` (the GCS JSON API over HTTP), reached by
  `google-cloud-storage` through `STORAGE_EMULATOR_HOST`.
- `s3_server`: moto's standalone S3 server (`ThreadedMotoServer`) with request signing checked
  against IAM keys it issued, reached by `boto3` through `AWS_ENDPOINT_URL_S3`.
Both start once per session; tests get fresh buckets from `gcs_bucket` / `s3_bucket`.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_names = itertools.count()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[str]:
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    try:
        yield os.environ["STORAGE_EMULATOR_HOST"]
    finally:
        server.stop()
        _restore("STORAGE_EMULATOR_HOST", previous)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
        )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """Moto on loopback; an IAM user with s3:* is created, then every request must be signed by it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="setup",
        aws_secret_access_key="x",
    )
    iam.create_user(UserName="loraplex")
    iam.put_user_policy(
        UserName="loraplex",
        PolicyName="s3",
        PolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}',
    )
    key = iam.create_access_key(UserName="loraplex")["AccessKey"]
    _check_signatures(True)  # from now on, every request must be signed by a key moto issued
    env = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        _check_signatures(False)
        server.stop()
        for name, value in previous.items():
            _restore(name, value)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The IAM user's keys in the environment: the server's default credential chain finds them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


@pytest.fixture
def gcs_bucket(gcs_server: str):
    from google.cloud import storage

    return storage.Client().create_bucket(f"gcs-{next(_names)}")


@pytest.fixture
def s3_bucket(s3_env: S3Server) -> str:
    name = f"s3-{next(_names)}"
    client = s3_env.client()
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


@pytest.fixture
def gcs_upload():
    return upload_dir_gcs


@pytest.fixture
def s3_upload(s3_env: S3Server):
    return lambda bucket, local, prefix: upload_dir_s3(s3_env.client(), bucket, local, prefix)


def upload_dir_gcs(bucket, local: Path, prefix: str) -> dict[str, int]:
    """Upload every file of `local` under `prefix/`; returns key -> generation."""
    generations = {}
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        blob = bucket.blob(f"{prefix}/{path.relative_to(local)}")
        blob.upload_from_filename(str(path))
        generations[blob.name] = blob.generation
    return generations


def upload_dir_s3(client, bucket: str, local: Path, prefix: str) -> dict[str, str]:
    """Upload every file of `local` under `prefix/`; returns key -> version id."""
    versions = {}
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(local)}"
        versions[key] = client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())["VersionId"]
    return versions


def _check_signatures(on: bool) -> None:
    """Moto's own switch (what its /moto-api/reset-auth sets): auth after N unauthenticated actions."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0 if on else float("inf")
    ActionAuthenticatorMixin.request_count = 0


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
