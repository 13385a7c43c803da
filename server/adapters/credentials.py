"""The object-store keys of one adapter, as the operator copies them into the pod.

The operator reads only the keys named below from the Secret in `source.credentialsSecretRef`
and writes them into its own Secret `<base>-credentials` as `<served name>.<key>`, mounted at
`CREDENTIALS_DIR` (operator/render/credentials.py). The whole user Secret never reaches the pod.
"""

from __future__ import annotations

import os
from pathlib import Path

from loraplex.server.adapters.object_store import AWS_KEY_FILES, GCS_KEY_FILE

CREDENTIAL_KEYS = (GCS_KEY_FILE, *AWS_KEY_FILES)


def credential_file(name: str, key: str) -> str:
    """The file (and operator Secret key) holding `key` for the adapter served as `name`."""
    return f"{name}.{key}"


def read_credentials(name: str, directory: str | Path | None = None) -> dict[str, str]:
    """The keys present for adapter `name` (empty: the library's own chain, e.g. Workload Identity)."""
    directory = directory or os.environ.get("CREDENTIALS_DIR")
    if not directory:
        return {}
    found = {}
    for key in CREDENTIAL_KEYS:
        path = Path(directory) / credential_file(name, key)
        if path.is_file():
            found[key] = path.read_text().strip()
    return found
