"""Object-store keys of adapters (`LoraAdapter.spec.source.credentialsSecretRef`): the operator reads
only the keys the source's scheme needs (render/credentials.py `SCHEME_KEYS`) from the Secret in
the adapter's namespace, and copies them into the base's `<bmd>-credentials` Secret.

Observe reads the named keys through the daemon's Secret cache (`credential_secret_refs`), and
decide renders the Secret from those values (`credential_files`, pure), like the access keys: a
rotated Secret lands within one tick plus the kubelet's refresh; a Secret or key that is missing is
logged and left out, and the pod's load then fails with the store's own typed `credentials` error
in the status.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from loraplex.operator.admission import Verdict
from loraplex.operator.lora import spec_of
from loraplex.operator.render.credentials import SCHEME_KEYS, credential_file, source_scheme

log = logging.getLogger(__name__)
SecretRef = tuple[str, str, str]  # (namespace, secret, key), as observe.SecretRef


@dataclass(frozen=True)
class CredentialRef:
    served_name: str
    namespace: str
    secret: str
    scheme: str


def _source_ref(body: Mapping[str, Any]) -> tuple[str, str] | None:
    """(secret name, scheme) of an adapter whose source names a credentials Secret it can use."""
    try:
        source = spec_of(body).source
    except ValidationError:
        return None
    scheme = source_scheme(source.uri)
    if source.credentials_secret_ref is None or scheme not in SCHEME_KEYS:
        return None
    return source.credentials_secret_ref.name, scheme


def credential_refs(verdicts: Sequence[Verdict], bodies: Sequence[Mapping[str, Any]]) -> list[CredentialRef]:
    """Accepted adapters whose source names a credentials Secret, in a scheme that takes keys."""
    by_key = {(body["metadata"]["namespace"], body["metadata"]["name"]): body for body in bodies}
    refs = []
    for verdict in verdicts:
        body = by_key.get((verdict.namespace, verdict.name))
        if verdict.adapter is None or body is None or (found := _source_ref(body)) is None:
            continue
        refs.append(CredentialRef(verdict.adapter.name, verdict.namespace, *found))
    return refs


def credential_secret_refs(bodies: Sequence[Mapping[str, Any]]) -> set[SecretRef]:
    """Every Secret key the adapters' sources may need (read by observe, admitted or not)."""
    refs: set[SecretRef] = set()
    for body in bodies:
        if (found := _source_ref(body)) is not None:
            secret, scheme = found
            refs.update((body["metadata"]["namespace"], secret, key) for key, _ in SCHEME_KEYS[scheme])
    return refs


def credential_files(
    refs: Sequence[CredentialRef], secrets: Mapping[SecretRef, str | None]
) -> dict[str, str]:
    """`<served name>.<key>` -> value for the named keys observed; missing required ones are logged."""
    files: dict[str, str] = {}
    for ref in refs:
        for key, required in SCHEME_KEYS[ref.scheme]:
            if value := secrets.get((ref.namespace, ref.secret, key)):
                files[credential_file(ref.served_name, key)] = value
            elif required:
                log.warning(
                    "adapter %s: Secret %s/%s has no key %r", ref.served_name, ref.namespace, ref.secret, key
                )
    return files
