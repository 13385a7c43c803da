"""The object-store keys of one adapter, as the operator copies them into the pod.

The operator reads only the keys named below from the Secret in `source.credentialsSecretRef`
and writes them into its own Secret `<base>-credentials` as `<served name>.<key>`, mounted at
`CREDENTIALS_DIR` (operator/render/credentials.py). The whole user Secret never reaches the pod.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from loraplex.server.adapters.object_store import AWS_KEY_FILES, GCS_KEY_FILE

CREDENTIAL_KEYS = (GCS_KEY_FILE, *AWS_KEY_FILES, "token")  # token: hf:// and https:// sources


def credential_file(served_name: str, key: str) -> str:
    """`<served name>.<key>`, with what a Secret key can't hold (`/` of qualified names, `:`) as `_xx`
    hex escapes: served names never contain `_`, so the mapping is one to one."""
    safe = re.sub(r"[^A-Za-z0-9.-]", lambda m: f"_{ord(m.group()):02x}", served_name)
    return f"{safe}.{key}"


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
