"""A tiny kopf operator for the envtest: it reports `spec.size * 2` in `status.doubled`."""

import kopf


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: object) -> None:
    # Short server-side watch timeouts let the runner stop within a few seconds.
    settings.watching.server_timeout = 5
    settings.posting.enabled = False


@kopf.on.create("envtest.loraplex.dev", "v1", "widgets")
@kopf.on.update("envtest.loraplex.dev", "v1", "widgets")
def report_size(spec: kopf.Spec, patch: kopf.Patch, **_: object) -> None:
    patch.status["doubled"] = spec["size"] * 2
    patch.status["phase"] = "Ready"
