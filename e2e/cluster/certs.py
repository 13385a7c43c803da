"""Certificates and keys for a local control plane, made with the `openssl` CLI.

One CA signs the apiserver's serving certificate (so clients verify TLS for real) and is the
root CA the controller-manager hands to service accounts; a separate RSA key pair signs
service-account tokens.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# The apiserver is reached on loopback, and in-cluster as the first service IP.
SERVING_SANS = (
    "IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
)
VALID_DAYS = "3650"


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    sa_key: Path
    sa_pub: Path


def _openssl(directory: Path, command: str) -> None:
    """Run `openssl <command>` inside `directory` (file names in `command` are relative to it)."""
    result = subprocess.run(["openssl", *command.split()], cwd=directory, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {command} failed: {result.stderr.strip()}")


def generate_pki(directory: Path) -> Pki:
    """Write a fresh CA, apiserver serving pair and service-account key pair into `directory`."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl CLI is required (apt-get install openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "apiserver.ext").write_text(f"subjectAltName={SERVING_SANS}\nextendedKeyUsage=serverAuth\n")
    for command in (
        f"req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days {VALID_DAYS} -subj /CN=loraplex-local-ca",
        "req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj /CN=kube-apiserver",
        f"x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt "
        f"-days {VALID_DAYS} -extfile apiserver.ext",
        "genrsa -out sa.key 2048",
        "rsa -in sa.key -pubout -out sa.pub",
    ):
        _openssl(directory, command)
    for leftover in ("apiserver.csr", "apiserver.ext", "ca.srl"):
        (directory / leftover).unlink(missing_ok=True)
    names = ("ca.crt", "ca.key", "apiserver.crt", "apiserver.key", "sa.key", "sa.pub")
    return Pki(*(directory / name for name in names))
