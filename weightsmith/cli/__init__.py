"""The ``weightsmith`` command line, one module per kind of command:

- :mod:`~weightsmith.cli.local`: ``merge``, ``edit``, ``extract-lora``, ``moe`` — the engine
  in this process, no service;
- :mod:`~weightsmith.cli.operations`: ``serve``, ``worker``, ``beat``, ``keys`` — running
  the service; :mod:`~weightsmith.cli.tenants`: ``tenants``, ``secrets`` — the operator's
  administration of its database;
- remote commands, talking to a service through :mod:`weightsmith.client`
  (:mod:`~weightsmith.cli.remote`): :mod:`~weightsmith.cli.jobs` (``submit``, ``jobs``,
  ``job``, ``cancel``), :mod:`~weightsmith.cli.artifacts` (``artifacts``, ``pull``,
  ``push``), :mod:`~weightsmith.cli.account` (``tenant``, ``hub-token``).

:mod:`~weightsmith.cli.common` holds the exit codes (2 bad input, 1 any other failure), the
one-line error and the output helpers. Each subcommand imports what it needs when it runs,
so ``weightsmith --help`` and the service commands never import torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from weightsmith.cli import account, artifacts, jobs, local, operations, tenants
from weightsmith.cli.common import HelpFormatter
from weightsmith.cli.remote import Remote


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; each sets ``func``, which returns the exit code."""
    from weightsmith import __version__

    parser = argparse.ArgumentParser(
        prog="weightsmith",
        description="Merge and patch LLM checkpoints.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"weightsmith {__version__}")
    parser.add_argument("--url", default=None, help="service URL (default: $WEIGHTSMITH_URL)")
    parser.add_argument("--token", default=None, help="API key (default: $WEIGHTSMITH_TOKEN)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    local.add_commands(sub, HelpFormatter)
    operations.add_commands(sub, HelpFormatter)
    tenants.add_commands(sub, HelpFormatter)
    remote = Remote(sub, HelpFormatter)
    account.add_commands(remote)
    jobs.add_commands(remote)
    artifacts.add_commands(remote)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (see weightsmith.cli.common)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
