"""`loraplex cluster up|down|status` (and `python -m loraplex.localcluster ...`).

`up` leaves etcd, kube-apiserver and kube-controller-manager running in the background with their
files (certs, etcd data, logs, kubeconfig, pids) in one state directory; `down` stops them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from loraplex.localcluster.binaries import BinariesMissing, cache_root
from loraplex.localcluster.control_plane import STATE_FILE, ClusterStartError, LocalCluster


def default_state_dir() -> Path:
    return cache_root() / "cluster"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("up", "down", "status"), help="start, stop or inspect the cluster")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the cluster keeps its files [~/.cache/loraplex/cluster]",
    )
    parser.add_argument(
        "--no-controllers", action="store_true", help="up: run without kube-controller-manager"
    )


def run(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir or default_state_dir()
    actions = {"up": _up, "down": _down, "status": _status}
    return actions[args.action](state_dir, args)


def _attached(state_dir: Path) -> LocalCluster | None:
    return LocalCluster.attach(state_dir) if (state_dir / STATE_FILE).is_file() else None


def _up(state_dir: Path, args: argparse.Namespace) -> int:
    running = _attached(state_dir)
    if running is not None and running.is_ready():
        print(f"already running: {running.server}\nexport KUBECONFIG={running.kubeconfig}")
        return 0
    if running is not None:  # a half-dead cluster from an earlier run
        running.stop()
    shutil.rmtree(state_dir, ignore_errors=True)
    try:
        cluster = LocalCluster.start(
            with_controllers=not args.no_controllers, workdir=state_dir, tie_to_parent=False
        )
    except (BinariesMissing, ClusterStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"local cluster up: {cluster.server} (pids {cluster.pids})")
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    return 0


def _down(state_dir: Path, args: argparse.Namespace) -> int:
    running = _attached(state_dir)
    if running is None:
        print("no local cluster running")
    else:
        pids = running.pids
        running.stop()
        print(f"local cluster stopped (pids {pids})")
    shutil.rmtree(state_dir, ignore_errors=True)
    return 0


def _status(state_dir: Path, args: argparse.Namespace) -> int:
    running = _attached(state_dir)
    if running is None:
        print("down")
        return 1
    alive = {name: p.is_alive() for name, p in running.processes.items()}
    ready = running.is_ready()
    print(f"{'ready' if ready else 'not ready'}: {running.server}")
    for name, process in running.processes.items():
        print(f"  {name:<24} pid {process.pid:<8} {'running' if alive[name] else 'dead'}")
    print(f"export KUBECONFIG={running.kubeconfig}")
    return 0 if ready else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraplex.localcluster", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
