"""The operator's own configuration, read once from the environment at start (never mutated)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from loraplex.operator.engine_client import EngineTimeouts
from loraplex.operator.render import RenderOptions


@dataclass(frozen=True)
class OperatorConfig:
    server_image: str = RenderOptions.default_image
    tick_s: float = 30.0  # fallback cycle period when nothing wakes a daemon
    quick_tick_s: float = 1.0  # after a cycle that loaded or unloaded something
    pod_concurrency: int = 8  # pods one daemon talks to at once
    timeouts: EngineTimeouts = field(default_factory=EngineTimeouts)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        """LORAPLEX_SERVER_IMAGE, LORAPLEX_TICK_SECONDS, LORAPLEX_POD_CONCURRENCY,
        LORAPLEX_CONNECT_TIMEOUT, LORAPLEX_REQUEST_TIMEOUT, LORAPLEX_LOAD_TIMEOUT."""
        env = os.environ if env is None else env
        defaults, timeouts = cls(), EngineTimeouts()
        return cls(
            server_image=env.get("LORAPLEX_SERVER_IMAGE", defaults.server_image),
            tick_s=float(env.get("LORAPLEX_TICK_SECONDS", defaults.tick_s)),
            pod_concurrency=int(env.get("LORAPLEX_POD_CONCURRENCY", defaults.pod_concurrency)),
            timeouts=EngineTimeouts(
                connect_s=float(env.get("LORAPLEX_CONNECT_TIMEOUT", timeouts.connect_s)),
                request_s=float(env.get("LORAPLEX_REQUEST_TIMEOUT", timeouts.request_s)),
                load_s=float(env.get("LORAPLEX_LOAD_TIMEOUT", timeouts.load_s)),
            ),
        )

    def render_options(self, pdb_api_version: str) -> RenderOptions:
        return RenderOptions(default_image=self.server_image, pdb_api_version=pdb_api_version)
