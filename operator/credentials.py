"""Object-store keys of adapters (`LoraAdapter.spec.source.credentialsSecretRef`): the operator reads
only the keys the source's scheme needs (render/credentials.py `SCHEME_KEYS`) from the Secret in
the adapter's namespace, and copies them into the base's `<bmd>-credentials` Secret.

Like the access keys (access.py), the daemon renders this every cycle, so a rotated Secret lands
within one tick plus the kubelet's refresh; a Secret or key that is missing is logged and left
out, and the pod's load then fails with the store's own typed `credentials` error in the status.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from loraplex.operator.admission import Verdict
from loraplex.operator.bmd import BaseModelDeployment
from loraplex.operator.k8s import Kube
from loraplex.operator.lora import LoraAdapterSpec
from loraplex.operator.render.credentials import (
    SCHEME_KEYS,
    build_credentials_secret,
    credential_file,
    source_scheme,
)
from loraplex.operator.render.meta import content_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CredentialRef:
    served_name: str
    namespace: str
    secret: str
    scheme: str


def credential_refs(verdicts: Sequence[Verdict], bodies: Sequence[Mapping[str, Any]]) -> list[CredentialRef]:
    """Accepted adapters whose source names a credentials Secret, in a scheme that takes keys."""
    specs = {(body["metadata"]["namespace"], body["metadata"]["name"]): body.get("spec") for body in bodies}
    refs = []
    for verdict in verdicts:
        if verdict.adapter is None:
            continue
        try:
            source = LoraAdapterSpec.model_validate(specs[(verdict.namespace, verdict.name)] or {}).source
        except ValidationError:
            continue
        scheme = source_scheme(source.uri)
        if source.credentials_secret_ref is not None and scheme in SCHEME_KEYS:
            refs.append(
                CredentialRef(
                    verdict.adapter.name, verdict.namespace, source.credentials_secret_ref.name, scheme
                )
            )
    return refs


async def read_credentials(kube: Kube, refs: Sequence[CredentialRef]) -> dict[str, str]:
    """`<served name>.<key>` -> value for the named keys found; missing required ones are logged."""
    files: dict[str, str] = {}
    for ref in refs:
        for key, required in SCHEME_KEYS[ref.scheme]:
            value = await kube.read_secret_key(ref.namespace, ref.secret, key)
            if value:
                files[credential_file(ref.served_name, key)] = value
            elif required:
                log.warning(
                    "adapter %s: Secret %s/%s has no key %r", ref.served_name, ref.namespace, ref.secret, key
                )
    return files


async def render_credentials(
    kube: Kube, bmd: BaseModelDeployment, verdicts: Sequence[Verdict], bodies: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    return build_credentials_secret(bmd, await read_credentials(kube, credential_refs(verdicts, bodies)))


async def apply_credentials(
    kube: Kube,
    bmd: BaseModelDeployment,
    verdicts: Sequence[Verdict],
    bodies: Sequence[Mapping[str, Any]],
    last_hash: str | None,
) -> str:
    """Apply the credentials Secret when its content changed; returns the hash to remember."""
    secret = await render_credentials(kube, bmd, verdicts, bodies)
    if (digest := content_hash(secret)) != last_hash:
        await kube.apply(secret)
    return digest
