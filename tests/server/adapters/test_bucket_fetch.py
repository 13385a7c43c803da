"""gs:// and s3:// adapter sources against real storage servers on loopback (tests/server/conftest.py):
gcp-storage-emulator through google-cloud-storage, moto's S3 server (signatures checked) through boto3."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from loraplex.server.adapters.errors import SourceError
from loraplex.server.adapters.sources import FetchOptions, fetch, parse_source

WEIGHTS = "adapter_model.safetensors"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_files(fetched: Path, original: Path) -> None:
    for name in ("adapter_config.json", WEIGHTS):
        assert (fetched / name).read_bytes() == (original / name).read_bytes(), name


@pytest.fixture
def llama_adapters(tiny_assets) -> dict[str, Path]:
    return tiny_assets.adapters["llama"]


# ---- gs:// ---------------------------------------------------------------------------------------


def test_gs_prefix_with_several_adapters(gcs_bucket, gcs_upload, llama_adapters, tmp_path: Path) -> None:
    for name, path in llama_adapters.items():
        gcs_upload(gcs_bucket, path, f"team/adapters/{name}")
    for name, path in llama_adapters.items():
        got = fetch(parse_source(f"gs://{gcs_bucket.name}/team/adapters/{name}"), FetchOptions(tmp_path))
        _same_files(got, path)
    with pytest.raises(SourceError) as info:
        fetch(parse_source(f"gs://{gcs_bucket.name}/team/adapters"), FetchOptions(tmp_path))
    assert info.value.error_type == "validation"
    assert all(name in str(info.value) for name in llama_adapters)


def test_gs_generation_and_sha256_pinning(gcs_bucket, gcs_upload, llama_adapters, tmp_path: Path) -> None:
    first, second = list(llama_adapters.values())[:2]
    generations = gcs_upload(gcs_bucket, first, "pinned")
    old = str(generations[f"pinned/{WEIGHTS}"])
    got = fetch(
        parse_source(f"gs://{gcs_bucket.name}/pinned", old),
        FetchOptions(tmp_path, sha256=_sha(first / WEIGHTS)),
    )
    _same_files(got, first)
    with pytest.raises(SourceError) as wrong_sha:
        fetch(parse_source(f"gs://{gcs_bucket.name}/pinned", old), FetchOptions(tmp_path, sha256="0" * 64))
    assert wrong_sha.value.error_type == "integrity"

    gcs_bucket.blob(f"pinned/{WEIGHTS}").upload_from_filename(str(second / WEIGHTS))  # a new generation
    new = str(gcs_bucket.get_blob(f"pinned/{WEIGHTS}").generation)
    assert new != old
    latest = fetch(parse_source(f"gs://{gcs_bucket.name}/pinned"), FetchOptions(tmp_path))
    assert (latest / WEIGHTS).read_bytes() == (
        second / WEIGHTS
    ).read_bytes()  # the cache did not serve the old one
    pinned_new = fetch(parse_source(f"gs://{gcs_bucket.name}/pinned", new), FetchOptions(tmp_path))
    assert _sha(pinned_new / WEIGHTS) == _sha(second / WEIGHTS)
    # The emulator keeps no history: an overwritten generation is gone, as on a bucket without versioning.
    with pytest.raises(SourceError) as gone:
        fetch(parse_source(f"gs://{gcs_bucket.name}/pinned", str(int(old) - 1)), FetchOptions(tmp_path / "x"))
    assert gone.value.error_type == "adapter_not_found" and "generation" in str(gone.value)


def test_gs_missing_object(gcs_bucket, tmp_path: Path) -> None:
    with pytest.raises(SourceError) as info:
        fetch(parse_source(f"gs://{gcs_bucket.name}/nothing/here"), FetchOptions(tmp_path))
    assert info.value.error_type == "adapter_not_found"
    with pytest.raises(SourceError) as no_bucket:
        fetch(parse_source("gs://no-such-bucket-anywhere/a"), FetchOptions(tmp_path))
    assert no_bucket.value.error_type == "adapter_not_found"


class _RefusingTokenEndpoint(BaseHTTPRequestHandler):
    """What oauth2.googleapis.com answers for a deleted or revoked service-account key."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def revoked_key(tmp_path: Path):
    """A real service-account key file whose token endpoint refuses it (the emulator checks no auth)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    server = HTTPServer(("127.0.0.1", 0), _RefusingTokenEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key = {
        "type": "service_account",
        "project_id": "p",
        "private_key_id": "1",
        "private_key": pem.decode(),
        "client_email": "loraplex@p.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": f"http://127.0.0.1:{server.server_address[1]}/token",
    }
    yield {"service-account.json": json.dumps(key)}
    server.shutdown()


def test_gs_refused_credentials_are_typed(
    gcs_bucket, gcs_upload, llama_adapters, revoked_key, tmp_path
) -> None:
    gcs_upload(gcs_bucket, llama_adapters["a4"], "a4")
    with pytest.raises(SourceError) as info:
        fetch(
            parse_source(f"gs://{gcs_bucket.name}/a4"),
            FetchOptions(tmp_path, credentials=revoked_key),
        )
    assert info.value.error_type == "credentials" and "invalid_grant" in str(info.value)


# ---- s3:// ---------------------------------------------------------------------------------------


def test_s3_prefix_with_several_adapters(s3_bucket, s3_upload, llama_adapters, tmp_path: Path) -> None:
    for name, path in llama_adapters.items():
        s3_upload(s3_bucket, path, f"adapters/{name}")
    for name, path in llama_adapters.items():
        _same_files(fetch(parse_source(f"s3://{s3_bucket}/adapters/{name}"), FetchOptions(tmp_path)), path)
    with pytest.raises(SourceError) as info:
        fetch(parse_source(f"s3://{s3_bucket}/adapters/"), FetchOptions(tmp_path))
    assert info.value.error_type == "validation" and all(name in str(info.value) for name in llama_adapters)


def test_s3_version_id_and_sha256_pinning(
    s3_env, s3_bucket, s3_upload, llama_adapters, tmp_path: Path
) -> None:
    first, second = list(llama_adapters.values())[:2]
    old = s3_upload(s3_bucket, first, "p")[f"p/{WEIGHTS}"]
    s3_env.client().put_object(Bucket=s3_bucket, Key=f"p/{WEIGHTS}", Body=(second / WEIGHTS).read_bytes())
    latest = fetch(parse_source(f"s3://{s3_bucket}/p"), FetchOptions(tmp_path))
    assert _sha(latest / WEIGHTS) == _sha(second / WEIGHTS)
    pinned = fetch(
        parse_source(f"s3://{s3_bucket}/p", old), FetchOptions(tmp_path, sha256=_sha(first / WEIGHTS))
    )
    assert _sha(pinned / WEIGHTS) == _sha(first / WEIGHTS)  # the old version, while a newer one is live
    with pytest.raises(SourceError) as wrong_sha:
        fetch(
            parse_source(f"s3://{s3_bucket}/p", old),
            FetchOptions(tmp_path / "y", sha256=_sha(second / WEIGHTS)),
        )
    assert wrong_sha.value.error_type == "integrity"
    with pytest.raises(SourceError) as no_version:
        fetch(parse_source(f"s3://{s3_bucket}/p", "not-a-version"), FetchOptions(tmp_path))
    assert no_version.value.error_type in {"adapter_not_found", "validation"}


def test_s3_missing_object(s3_bucket, tmp_path: Path) -> None:
    with pytest.raises(SourceError) as info:
        fetch(parse_source(f"s3://{s3_bucket}/missing"), FetchOptions(tmp_path))
    assert info.value.error_type == "adapter_not_found"


def _keys(access: str, secret: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}


def test_s3_explicit_keys(s3_env, s3_bucket, s3_upload, llama_adapters, tmp_path, monkeypatch) -> None:
    s3_upload(s3_bucket, llama_adapters["a4"], "a4")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")  # the adapter's keys win over the env
    good = _keys(s3_env.access_key, s3_env.secret_key)
    got = fetch(parse_source(f"s3://{s3_bucket}/a4"), FetchOptions(tmp_path / "c1", credentials=good))
    _same_files(got, llama_adapters["a4"])
    bad = _keys(s3_env.access_key, "not-the-secret")
    with pytest.raises(SourceError) as info:
        fetch(parse_source(f"s3://{s3_bucket}/a4"), FetchOptions(tmp_path / "c2", credentials=bad))
    assert info.value.error_type == "credentials" and "403" in str(info.value)  # HEAD: no error body
    unknown = _keys("AKIANOBODYNOBODY0000", "x")
    with pytest.raises(SourceError) as who:
        fetch(parse_source(f"s3://{s3_bucket}/a4"), FetchOptions(tmp_path / "c3", credentials=unknown))
    assert who.value.error_type == "credentials"


def test_credentials_refusal_is_a_403() -> None:
    from loraplex.server.engine_api import AdapterLoadError
    from loraplex.server.routes.errors import from_engine_error

    error = from_engine_error(AdapterLoadError("adapter 'a': s3://b/a: credentials refused", "credentials"))
    assert (error.status, error.error_type) == (403, "credentials")


def test_loader_uses_the_keys_the_operator_copied(
    s3_env, s3_bucket, s3_upload, llama_adapters, tmp_path, monkeypatch
):
    """CREDENTIALS_DIR holds `<served name>.<key>` files (operator/render/credentials.py); another
    adapter's keys are never used, and without files the default chain (here: wrong env keys) runs."""
    from loraplex.server.adapters.loader import LoaderConfig, SourceLoader
    from loraplex.server.engine_api import AdapterLoadError, LoadAdapterSpec

    s3_upload(s3_bucket, llama_adapters["a4"], "a4")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    mounted = tmp_path / "credentials"
    mounted.mkdir()
    (mounted / "team-a.AWS_ACCESS_KEY_ID").write_text(s3_env.access_key)
    (mounted / "team-a.AWS_SECRET_ACCESS_KEY").write_text(s3_env.secret_key + "\n")
    monkeypatch.setenv("CREDENTIALS_DIR", str(mounted))
    loader = SourceLoader(LoaderConfig(cache_dir=tmp_path / "cache"))
    got = loader.resolve(LoadAdapterSpec("team-a", f"s3://{s3_bucket}/a4"))
    _same_files(got, llama_adapters["a4"])
    with pytest.raises(AdapterLoadError) as info:
        loader.resolve(LoadAdapterSpec("team-b", f"s3://{s3_bucket}/a4"))
    assert info.value.error_type == "credentials"


@pytest.mark.parametrize("uri", ["file:///data/a", "/data/a", "https://example.org/a.tar.gz"])
def test_a_revision_nothing_can_honour_is_refused(uri: str) -> None:
    with pytest.raises(SourceError) as info:
        parse_source(uri, revision="v2")
    assert info.value.error_type == "validation" and "sha256" in str(info.value)
