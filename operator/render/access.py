"""The operator-owned Secret `<bmd>-access`: per served adapter name, digests of its access keys.

Mounted into the pods (`ADAPTER_KEYS_FILE`); a Secret and never a ConfigMap, although it holds
no plain key: digests of low-entropy keys could still be guessed offline.
"""

from __future__ import annotations

import base64
from typing import Any

from loraplex.operator.bmd import BaseModelDeployment
from loraplex.operator.render.meta import child_metadata

ACCESS_KEY = "keys.json"


def access_secret_name(bmd: BaseModelDeployment) -> str:
    return f"{bmd.name}-access"


def build_access_secret(bmd: BaseModelDeployment, document: str) -> dict[str, Any]:
    """`document` is `loraplex.operator.access.access_document`'s text."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": child_metadata(bmd, access_secret_name(bmd)),
        "data": {ACCESS_KEY: base64.b64encode(document.encode()).decode()},
    }
