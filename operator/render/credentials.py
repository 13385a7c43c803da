"""The operator-owned Secret `<bmd>-credentials`: the object-store keys of the adapters that name a
`source.credentialsSecretRef`, copied key by key (never the whole user Secret).

Mounted at `CREDENTIALS_DIR`; file `<served name>.<key>` (server/adapters/credentials.py reads
it at load time). The pod template never depends on which adapters carry keys, so adding one
hot-loads without a rollout; the kubelet's Secret refresh brings new keys into running pods.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any

from loraplex.operator.bmd import BaseModelDeployment
from loraplex.operator.render.meta import child_metadata

CREDENTIALS_DIR = "/var/run/loraplex/credentials"
# scheme -> (key, required): what the server's fetcher for that scheme reads, nothing else.
SCHEME_KEYS: dict[str, tuple[tuple[str, bool], ...]] = {
    "gs": (("service-account.json", True),),
    "s3": (("AWS_ACCESS_KEY_ID", True), ("AWS_SECRET_ACCESS_KEY", True), ("AWS_SESSION_TOKEN", False)),
    "hf": (("token", True),),
    "https": (("token", True),),
}


def credentials_secret_name(bmd: BaseModelDeployment) -> str:
    return f"{bmd.name}-credentials"


def credential_file(served_name: str, key: str) -> str:
    """`<served name>.<key>`, with what a Secret key can't hold (`/` of qualified names, `:`) as `_xx`
    hex escapes: served names never contain `_`, so the mapping is one to one."""
    safe = re.sub(r"[^A-Za-z0-9.-]", lambda m: f"_{ord(m.group()):02x}", served_name)
    return f"{safe}.{key}"


def source_scheme(uri: str) -> str:
    """The fetcher a source URI goes to (bare hub ids are hf)."""
    scheme, sep, _ = uri.partition("://")
    if not sep:
        return "file" if uri.startswith(("/", ".")) else "hf"
    return "https" if scheme == "http" else scheme


def build_credentials_secret(bmd: BaseModelDeployment, files: Mapping[str, str]) -> dict[str, Any]:
    """`files`: `credential_file(...)` -> value, from `loraplex.operator.credentials.read_credentials`."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": child_metadata(bmd, credentials_secret_name(bmd)),
        "data": {name: base64.b64encode(value.encode()).decode() for name, value in sorted(files.items())},
    }


def credentials_volume(bmd: BaseModelDeployment) -> dict[str, Any]:
    return {
        "name": "credentials",
        "secret": {"secretName": credentials_secret_name(bmd), "defaultMode": 0o440},
    }


def credentials_mount() -> dict[str, Any]:
    return {"name": "credentials", "mountPath": CREDENTIALS_DIR, "readOnly": True}
