"""A counting reverse proxy in front of the API server, for one client (the operator under test).

The API server's `apiserver_request_total` counts every client together (the pod runner, the
benchmark's own polling); the operator's kubeconfig points here instead, so its requests are
counted alone, by verb and resource. Responses are streamed (watches stay open).
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

COUNTS_PATH = "/_proxy/counts"  # answered by the proxy itself (no API path starts like this)
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


def request_kind(method: str, path: str, query: str) -> tuple[str, str]:
    """(verb, resource[/subresource]) in the API server's vocabulary."""
    parts = [part for part in path.split("/") if part]
    parts = parts[2:] if parts[:1] == ["api"] else parts[3:] if parts[:1] == ["apis"] else parts
    if parts[:1] == ["namespaces"] and len(parts) > 2:
        parts = parts[2:]
    resource = "/".join(parts[::2][:1] + parts[2:3]) if parts else path
    named = len(parts) >= 2
    watch = "watch=true" in query or "watch=1" in query
    verbs = {"GET": "GET" if named else "LIST", "POST": "CREATE", "PUT": "UPDATE", "DELETE": "DELETE"}
    verb = "WATCH" if watch else verbs.get(method, method)
    return verb, resource


class CountingProxy:
    def __init__(self, kubeconfig: Path) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        self.upstream = config["clusters"][0]["cluster"]["server"]
        self.token = config["users"][0]["user"]["token"]
        import base64
        import tempfile

        ca = tempfile.NamedTemporaryFile(suffix=".pem", delete=False)  # noqa: SIM115
        ca.write(base64.b64decode(config["clusters"][0]["cluster"]["certificate-authority-data"]))
        ca.close()
        self._ssl = ssl.create_default_context(cafile=ca.name)
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.failures: collections.Counter[tuple[str, str]] = collections.Counter()  # (verb resource, code)
        self._lock = threading.Lock()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()

    def snapshot(self) -> collections.Counter[tuple[str, str]]:
        with self._lock:
            return collections.Counter(self.counts)

    def kubeconfig(self, path: Path) -> Path:
        return write_kubeconfig(path, self.port, self.token)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())
        self._loop.run_forever()

    async def _serve(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl, limit=0), timeout=aiohttp.ClientTimeout(total=None)
        )
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get(COUNTS_PATH, self._counts)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()

    def failed(self) -> collections.Counter[tuple[str, str]]:
        with self._lock:
            return collections.Counter(self.failures)

    async def _counts(self, request: web.Request) -> web.Response:
        """The counters as JSON, for the process that started this proxy (`ProxyProcess`)."""
        with self._lock:
            counts = [[*key, n] for key, n in self.counts.items()]
            failures = [[*key, n] for key, n in self.failures.items()]
        return web.json_response({"counts": counts, "failures": failures})

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        kind = request_kind(request.method, request.path, request.query_string)
        with self._lock:
            self.counts[kind] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        body = await request.read()
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body or None
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            if upstream.status >= 400:
                with self._lock:
                    self.failures[(" ".join(kind), str(upstream.status))] += 1
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_HEADERS and key.lower() != "content-encoding":
                    response.headers[key] = value
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (ConnectionResetError, aiohttp.ClientError):
                pass
            return response


class ProxyProcess:
    """A `CountingProxy` in a process of its own (`python apiproxy.py KUBECONFIG PORT_FILE`):
    its TLS and copying never compete for a GIL with the benchmark's own threads."""

    def __init__(self, kubeconfig: Path) -> None:
        self._kubeconfig = kubeconfig
        self._token = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        port_file = Path(tempfile.mkdtemp(prefix="apiproxy-")) / "port"
        argv = [sys.executable, str(Path(__file__).resolve()), str(self._kubeconfig), str(port_file)]
        self._process = subprocess.Popen(argv, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self._process.poll() is not None:
                raise RuntimeError("the API proxy did not start")
            time.sleep(0.05)
        self.port = int(port_file.read_text())

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)

    def _read(self) -> dict[str, list[list[Any]]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{COUNTS_PATH}", timeout=30) as response:
            return json.load(response)

    def snapshot(self) -> collections.Counter[tuple[str, str]]:
        return collections.Counter({(verb, kind): n for verb, kind, n in self._read()["counts"]})

    def failed(self) -> collections.Counter[tuple[str, str]]:
        return collections.Counter({(kind, code): n for kind, code, n in self._read()["failures"]})

    def kubeconfig(self, path: Path) -> Path:
        return write_kubeconfig(path, self.port, self._token)


def _die_with_parent() -> None:
    """SIGTERM the proxy when the benchmark dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)


def write_kubeconfig(path: Path, port: int, token: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "proxy", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "proxy", "user": {"token": token}}],
        "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "proxy"}}],
        "current-context": "proxy",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def main(argv: list[str]) -> None:
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # for sigwait, in all threads
    proxy = CountingProxy(Path(argv[0]))
    proxy.start()
    Path(argv[1]).write_text(str(proxy.port))
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__":
    main(sys.argv[1:])
