"""`loraplex operator`: run the kopf operator (standalone: one replica, no peering), or explain
what it would do for one base.

loraplex operator --all-namespaces
loraplex operator --namespace llm --namespace team-a
loraplex operator explain tiny-llama --namespace llm
loraplex operator release --all-namespaces --operator-deployment loraplex-system/loraplex-operator
"""

from __future__ import annotations

import argparse
import logging

import kopf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", nargs="?", choices=("run", "explain", "release"), default="run", help="[%(default)s]"
    )
    parser.add_argument("target", nargs="?", help="explain: the BaseModelDeployment's name")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)"
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch the whole cluster [default]"
    )
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="liveness endpoint for the operator's pod probe [%(default)s]",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--operator-deployment",
        metavar="NAMESPACE/NAME",
        help="release: scale this operator Deployment to zero first (the chart's uninstall hook)",
    )


def run(args: argparse.Namespace) -> int:
    if args.action == "explain":
        return _explain(args)
    if args.action == "release":
        from loraplex.operator.release import release

        print(release(args.namespace, args.operator_deployment))
        return 0
    from loraplex.operator import handlers  # noqa: F401 - registers the handlers with kopf

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.JSON)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if not args.verbose:
        logging.getLogger("kopf.objects").addFilter(quiet_event_handlers)
    kopf.run(
        standalone=True,
        liveness_endpoint=args.liveness,
        namespaces=args.namespace,
        clusterwide=not args.namespace,
    )
    return 0


# Handlers that only wake a base run once per watch event: a thousand adapters' writes would
# log a thousand "Handler 'adapter_event' succeeded." lines (JSON-formatted, on the loop).
QUIET_HANDLERS = ("'adapter_event'", "'pod_changed'", "'namespace_changed'")


def quiet_event_handlers(record: logging.LogRecord) -> bool:
    """False for an info line saying a wake-only handler succeeded (failures still log)."""
    if record.levelno > logging.INFO:
        return True
    message = record.getMessage()
    return not (message.endswith(" succeeded.") and any(name in message for name in QUIET_HANDLERS))


def _explain(args: argparse.Namespace) -> int:
    from loraplex.operator.explain import explain

    if not args.target:
        raise SystemExit("loraplex operator explain: name the BaseModelDeployment")
    print(explain(args.namespace[0] if args.namespace else "default", args.target))
    return 0
