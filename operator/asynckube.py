"""The operator's bulk writes (status merge-PATCHes, finalizer JSON-patches) on aiohttp: one
keep-alive connection pool on the event loop, no thread per request and no model objects.

A thousand adapters' statuses change when a pod dies; through the threaded `kubernetes` client
each PATCH costs a thread hop, urllib3 and the client's (de)serialisation. Here a PATCH is one
request on a pooled connection and its answer is read and dropped. The credentials are the
ones the `kubernetes` client loaded (`Configuration`: server, CA, client certificate, bearer
token, refreshed through its hook), so both clients talk to the same server as the same user.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

import aiohttp
from kubernetes.client import Configuration
from kubernetes.client.exceptions import ApiException

from loraplex.operator.common import GROUP, VERSION

MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


def ssl_context(configuration: Configuration) -> ssl.SSLContext | bool:
    """TLS as the `kubernetes` client would verify it (False for a plain-HTTP server)."""
    if not configuration.host.startswith("https"):
        return False
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif configuration.assert_hostname is False:
        context.check_hostname = False
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file)
    return context


class AsyncKube:
    """Status and metadata PATCHes of our resources; raises `ApiException` like the client."""

    def __init__(self, configuration: Configuration, concurrency: int = 64, field_manager: str = "") -> None:
        self._configuration = configuration
        self._concurrency = concurrency
        self._field_manager = field_manager
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _open(self) -> aiohttp.ClientSession:
        """The pool of the running loop (a session belongs to the loop it was made on)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            self._loop = loop
            connector = aiohttp.TCPConnector(
                ssl=ssl_context(self._configuration), limit=self._concurrency, keepalive_timeout=60
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=60)
            )
        return self._session

    def _headers(self, content_type: str) -> dict[str, str]:
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        for setting in self._configuration.auth_settings().values():  # runs the token's refresh hook
            if setting["in"] == "header" and setting["value"]:
                headers[setting["key"]] = setting["value"]
        return headers

    def _url(self, plural: str, namespace: str, name: str, subresource: str = "") -> str:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}/{name}"
        return self._configuration.host.rstrip("/") + path + (f"/{subresource}" if subresource else "")

    async def _patch(self, url: str, content_type: str, body: Any) -> None:
        params = {"fieldManager": self._field_manager} if self._field_manager else None
        data = json.dumps(body, separators=(",", ":"))
        headers, proxy = self._headers(content_type), self._configuration.proxy or None
        async with self._open().patch(url, data=data, headers=headers, params=params, proxy=proxy) as r:
            text = await r.read()
            if r.status >= 400:
                error = ApiException(status=r.status, reason=r.reason)
                error.body = text.decode(errors="replace")
                raise error

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the status subresource (lists are replaced whole)."""
        await self._patch(self._url(plural, namespace, name, "status"), MERGE, {"status": status})

    async def patch_metadata(self, plural: str, namespace: str, name: str, ops: list[dict[str, Any]]) -> None:
        """JSON-patch the object itself (its finalizers and annotations)."""
        await self._patch(self._url(plural, namespace, name), JSON_PATCH, ops)

    async def close(self) -> None:
        if self._session is not None and self._loop is asyncio.get_running_loop():
            await self._session.close()
            self._session = None
