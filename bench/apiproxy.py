"""A counting reverse proxy in front of the API server, for one client (the operator under test).

The API server's `apiserver_request_total` counts every client together (the pod runner, the
benchmark's own polling); the operator's kubeconfig points here instead, so its requests are
counted alone, by verb and resource. Responses are streamed (watches stay open).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import threading
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

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
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "proxy", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "proxy", "user": {"token": self.token}}],
            "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "proxy"}}],
            "current-context": "proxy",
        }
        path.write_text(yaml.safe_dump(config))
        return path

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
