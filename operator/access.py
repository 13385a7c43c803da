"""Per-adapter access keys (`LoraAdapter.spec.access.apiKeySecretRefs`): the operator reads the
referenced Secrets in each adapter's namespace and hands the pods only digests of the keys.

Digest: HMAC-SHA256 of the key under one random 16-byte salt per BaseModelDeployment, kept in
the `<bmd>-access` Secret itself and reused, so an unchanged key set renders the same Secret.
Why not scrypt/PBKDF2 with a salt per entry: the server checks a Bearer token on every
request, against every key of the adapter; a slow KDF would cost milliseconds of CPU per
request (and per key) for no gain on machine-generated keys, whose entropy makes offline
guessing hopeless anyway. What the salt buys: digests cannot be precomputed and differ between
deployments, so one leaked file says nothing about another base's keys. Low-entropy keys stay
guessable from a leaked file: that is why the file is a Secret, mounted only into the pods.

The daemon renders this every cycle (rotation of a referenced Secret lands within one tick,
then the kubelet's Secret refresh, then the server's file poll), never in a handler: no extra
watch on Secrets, and one place that writes the file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from loraplex.operator.admission import Verdict
from loraplex.operator.bmd import BaseModelDeployment
from loraplex.operator.common import Condition, SecretKeyRef
from loraplex.operator.conditions import condition
from loraplex.operator.k8s import Kube
from loraplex.operator.lora import spec_of
from loraplex.operator.render.access import ACCESS_KEY, access_secret_name, build_access_secret

SALT_BYTES = 16
# (namespace, refs) of each protected adapter, by served name
KeyRefs = dict[str, tuple[str, list[SecretKeyRef]]]


def new_salt() -> bytes:
    return secrets.token_bytes(SALT_BYTES)


def digest_key(salt: bytes, key: str) -> str:
    """Must equal `loraplex.server.auth.digest_key` (a contract test checks both)."""
    return hmac.new(salt, key.encode(), hashlib.sha256).hexdigest()


def access_document(salt: bytes, keys: Mapping[str, Iterable[str]], open_names: Iterable[str]) -> str:
    """The file the server reads: stable text, so unchanged keys never rewrite the Secret."""
    adapters = {name: sorted({digest_key(salt, key) for key in values}) for name, values in keys.items()}
    document = {"salt": salt.hex(), "adapters": adapters, "open": sorted(set(open_names))}
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def salt_of(document: str | None) -> bytes | None:
    try:
        return bytes.fromhex(json.loads(document or "")["salt"])
    except (ValueError, KeyError, TypeError):
        return None


def key_refs(verdicts: Sequence[Verdict], bodies: Sequence[Mapping[str, Any]]) -> tuple[KeyRefs, list[str]]:
    """Protected adapters' key references, and the served names of the open (unprotected) ones."""
    by_key = {(body["metadata"]["namespace"], body["metadata"]["name"]): body for body in bodies}
    protected: KeyRefs = {}
    open_names: list[str] = []
    for verdict in verdicts:
        if verdict.adapter is None:
            continue
        try:
            access = spec_of(by_key[(verdict.namespace, verdict.name)]).access
        except ValidationError:
            continue  # cannot happen for an accepted verdict; never open it by accident
        if access is None:
            open_names.append(verdict.adapter.name)
        else:  # an empty list protects too: nobody may call it
            protected[verdict.adapter.name] = (verdict.namespace, list(access.api_key_secret_refs))
    return protected, open_names


@dataclass(frozen=True)
class FoundKeys:
    keys: dict[str, list[str]]  # served name -> plain keys (kept in memory only, to digest them)
    missing: dict[str, list[str]]  # served name -> `secret[key]` references not found


async def read_keys(kube: Kube, refs: KeyRefs) -> FoundKeys:
    """The plain keys, by served name; a missing Secret or key just contributes none."""
    found = FoundKeys({}, {})
    for name, (namespace, secret_refs) in refs.items():
        found.keys[name] = []
        for ref in secret_refs:
            value = await kube.read_secret_key(namespace, ref.name, ref.key)
            if value:
                found.keys[name].append(value.strip())
            else:
                found.missing.setdefault(name, []).append(f"{ref.name}[{ref.key}]")
    return found


def access_condition(name: str, refs: KeyRefs, found: FoundKeys, generation: int) -> Condition | None:
    """`AccessKeys` on a protected adapter: are its keys all there? (names only, never values)"""
    if name not in refs:
        return None
    if missing := found.missing.get(name):
        message = f"Secret keys not found in {refs[name][0]}: {', '.join(missing)}; the others still work"
        return condition("AccessKeys", False, "SecretNotFound", message, generation)
    if not refs[name][1]:
        return condition(
            "AccessKeys", False, "NoKeys", "access lists no keys: nobody may call it", generation
        )
    return condition("AccessKeys", True, "KeysFound", f"{len(refs[name][1])} key(s)", generation)


async def read_salt(kube: Kube, bmd: BaseModelDeployment) -> bytes:
    """The salt of the existing access Secret (digests stay stable across restarts), else a new one."""
    existing = await kube.read_secret_key(bmd.namespace, access_secret_name(bmd), ACCESS_KEY)
    return salt_of(existing) or new_salt()


async def render_access_secret(
    kube: Kube,
    bmd: BaseModelDeployment,
    verdicts: Sequence[Verdict],
    bodies: Sequence[Mapping[str, Any]],
    salt: bytes,
) -> dict[str, Any]:
    secret, _ = await render_access(kube, bmd, verdicts, bodies, salt)
    return secret


async def render_access(
    kube: Kube,
    bmd: BaseModelDeployment,
    verdicts: Sequence[Verdict],
    bodies: Sequence[Mapping[str, Any]],
    salt: bytes,
) -> tuple[dict[str, Any], dict[str, Condition]]:
    """The access Secret, and an `AccessKeys` condition per protected adapter (by served name)."""
    refs, open_names = key_refs(verdicts, bodies)
    found = await read_keys(kube, refs)
    conditions = {
        verdict.adapter.name: item
        for verdict in verdicts
        if verdict.adapter is not None
        and (item := access_condition(verdict.adapter.name, refs, found, verdict.generation)) is not None
    }
    return build_access_secret(bmd, access_document(salt, found.keys, open_names)), conditions
