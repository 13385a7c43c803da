"""`loraplex` command line: a thin dispatcher over subcommands that live with their parts.

Each entry of SUBCOMMANDS names a module exposing `add_arguments(parser)` and `run(args) -> int`.
The module is imported only when its subcommand runs, so `loraplex serve` never imports the
operator's dependencies and vice versa.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from loraplex.version import __version__

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": (
        "loraplex.server.serve_cli",
        "Serve a base model and its LoRA adapters over HTTP (TGI, OpenAI and vLLM-compatible APIs)",
    ),
    "operator": (
        "loraplex.operator.main",
        "Run the Kubernetes operator (kopf): BaseModelDeployments and LoraAdapters",
    ),
    "cluster": ("loraplex.localcluster.cli", "Run a local Kubernetes control plane: up, down, status"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplex",
        description="Serve many LoRA fine-tunes from one base-model deployment on Kubernetes.",
    )
    parser.add_argument("--version", action="version", version=f"loraplex {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
