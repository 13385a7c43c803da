"""Kubernetes I/O for the operator: apply rendered children, patch status and pod conditions,
read Secrets. A thin async facade over the `kubernetes` client; calls run in worker threads.

Children are written with server-side apply (field manager `loraplex-operator`, forced), so a
reconcile both creates and corrects drift on the fields we own, and leaves others' fields alone.
"""

from __future__ import annotations

import asyncio
import base64
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import kubernetes
from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError

from loraplex.operator.asynckube import AsyncKube
from loraplex.operator.common import GROUP, VERSION

FIELD_MANAGER = "loraplex-operator"
THREADS = 32  # blocking client calls in flight (applies, reads, deletes, pod conditions)
WRITES = 32  # status and metadata PATCHes in flight on the async pool (the API server's pace:
# 1000 PATCHes took the same time at 32 and 64 on the local control plane, bench/operator_apipace.py)
T = TypeVar("T")


class Kube:
    def __init__(self, api_client: ApiClient, field_manager: str = FIELD_MANAGER) -> None:
        self._api_client = api_client
        self._field_manager = field_manager
        self._core = CoreV1Api(api_client)
        self._custom = CustomObjectsApi(api_client)
        self._dynamic: DynamicClient | None = None
        self._discovery = threading.Lock()
        self._kinds: dict[tuple[str, str], Any] = {}
        self._threads = ThreadPoolExecutor(THREADS, thread_name_prefix="kube")
        # the bulk writes (a status per adapter) on aiohttp: about half the client CPU per PATCH
        self._writes = AsyncKube(api_client.configuration, WRITES, field_manager)

    @property
    def api_client(self) -> ApiClient:
        return self._api_client

    @classmethod
    def from_environment(cls) -> Kube:
        """In-cluster service account when running in a pod, else KUBECONFIG / ~/.kube/config."""
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        configuration = kubernetes.client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = THREADS  # one connection per thread, reused
        return cls(ApiClient(configuration))

    async def _run(self, call: Callable[[], T]) -> T:
        """In our own threads: the default executor is small (CPUs + 4) and kopf's, too."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, call)

    def _resource(self, api_version: str, kind: str) -> Any:
        """The dynamic client's resource for a kind, looked up once. Discovery is not thread-safe
        (its lazy cache raced into `KeyError: 'apis'` from concurrent worker threads): one lock,
        and a cache file of this process only."""
        with self._discovery:
            if (api_version, kind) not in self._kinds:
                if self._dynamic is None:
                    # kept for the client's life (an empty file would log a cache error)
                    self._cache_dir = tempfile.TemporaryDirectory(prefix="loraplex-discovery-")
                    cache = f"{self._cache_dir.name}/discovery.json"
                    self._dynamic = DynamicClient(self._api_client, cache_file=cache)
                self._kinds[(api_version, kind)] = self._dynamic.resources.get(
                    api_version=api_version, kind=kind
                )
            return self._kinds[(api_version, kind)]

    async def served(self, api_version: str, kind: str) -> bool:
        """Whether the API server knows this kind (policy/v1 on 1.21+, InferencePool if installed)."""

        def lookup() -> bool:
            try:
                self._resource(api_version, kind)
                return True
            except ResourceNotFoundError:
                return False

        return await self._run(lookup)

    async def apply(self, body: dict[str, Any]) -> None:
        def call() -> None:
            resource = self._resource(body["apiVersion"], body["kind"])
            resource.server_side_apply(body=body, field_manager=self._field_manager, force_conflicts=True)

        await self._run(call)

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        """Delete if present; an absent object or an unknown kind is already the desired state."""

        def call() -> None:
            try:
                resource = self._resource(api_version, kind)
                resource.delete(name=name, namespace=namespace)
            except (NotFoundError, ResourceNotFoundError):
                pass

        await self._run(call)

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch one of our resources' status subresource (lists are replaced whole)."""
        await self._writes.patch_status(plural, namespace, name, status)

    async def patch_metadata(self, plural: str, namespace: str, name: str, ops: list[dict[str, Any]]) -> None:
        """JSON-patch one of our resources (its finalizers and annotations)."""
        await self._writes.patch_metadata(plural, namespace, name, ops)

    async def close(self) -> None:
        """The async pool's connections (the threads' pool closes with the process)."""
        await self._writes.close()

    async def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        def call() -> dict[str, Any] | None:
            try:
                return self._custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
            except ApiException as error:
                if error.status == 404:
                    return None
                raise

        return await self._run(call)

    async def set_pod_condition(self, namespace: str, name: str, condition: dict[str, Any]) -> None:
        """Strategic merge on pods/status: conditions merge by type, others stay untouched."""
        body = {"status": {"conditions": [condition]}}
        await self._run(
            lambda: self._core.patch_namespaced_pod_status(
                name, namespace, body, _content_type="application/strategic-merge-patch+json"
            )
        )

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str | None:
        def call() -> str | None:
            try:
                secret = self._core.read_namespaced_secret(name, namespace)
            except ApiException as error:
                if error.status == 404:
                    return None
                raise
            value = (secret.data or {}).get(key)
            return base64.b64decode(value).decode() if value is not None else None

        return await self._run(call)
